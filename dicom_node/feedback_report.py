"""Agreement with the radiologists, reported: the `pacsai status` line and the Prometheus families per model version."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

from prometheus_client.core import GaugeMetricFamily, HistogramMetricFamily, Metric

from pacsai.feedback_table import Agreement
from pacsai.state import State

DICE_BUCKETS = (0.5, 0.7, 0.8, 0.9, 0.95, 0.98, 1.0)


def status_line(agreements: Sequence[Agreement]) -> str:
    """'feedback    corrected=2  rejected=1  mean Dice ct-organs-tiny 0.1.0 0.912' ('none' without feedback)."""
    if not agreements:
        return "feedback    none"
    corrected, rejected = sum(a.corrected for a in agreements), sum(a.rejected for a in agreements)
    means = [f"{a.model} {a.model_version} {a.mean_dice:.3f}" for a in agreements if a.mean_dice is not None]
    return f"feedback    corrected={corrected}  rejected={rejected}" + (
        f"  mean Dice {', '.join(means)}" if means else ""
    )


def as_json(agreements: Sequence[Agreement]) -> dict[str, dict[str, object]]:
    """`pacsai status --json`: per 'model version', the counts and the mean Dice (null without corrections)."""
    return {
        f"{a.model} {a.model_version}": {"corrected": a.corrected, "rejected": a.rejected, "mean_dice": a.mean_dice}
        for a in agreements
    }


def metrics(state: State) -> Iterator[Metric]:
    """pacsai_feedback (results by kind), pacsai_feedback_dice_mean and the pacsai_feedback_dice histogram, per
    model and version: a new version's agreement next to the old one's shows drift."""
    agreements = state.agreement()
    labels = ["model", "version"]
    results = GaugeMetricFamily(
        "pacsai_feedback", "Results corrected or rejected by a radiologist", labels=[*labels, "kind"]
    )
    mean = GaugeMetricFamily("pacsai_feedback_dice_mean", "Mean Dice of corrected segments against ours", labels=labels)
    histogram = HistogramMetricFamily(
        "pacsai_feedback_dice", "Dice of each corrected segment against ours", labels=labels
    )
    for a in agreements:
        results.add_metric([a.model, a.model_version, "corrected"], a.corrected)
        results.add_metric([a.model, a.model_version, "rejected"], a.rejected)
        if a.mean_dice is not None:
            mean.add_metric([a.model, a.model_version], a.mean_dice)
        buckets = [(str(bound), sum(d <= bound for d in a.dices)) for bound in DICE_BUCKETS]
        histogram.add_metric([a.model, a.model_version], [*buckets, ("+Inf", len(a.dices))], sum_value=sum(a.dices))
    yield from (results, mean, histogram)
