"""Stage durations of jobs, from the job timeline (node-side stages) and the times workers recorded (worker-side).

Node-side stages come from `job_events`: receive_to_complete (first instance of the series → job created),
complete_to_queued (pending → queued), queued_to_started (queued → running) and end_to_end (first instance →
delivered). Worker-side stages (load, model, encode, delivery) are rows of `job_stages`.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from pacsai.state import State

STAGES = (
    "receive_to_complete",
    "complete_to_queued",
    "queued_to_started",
    "load",
    "model",
    "encode",
    "delivery",
    "end_to_end",
)
_EVENTS = (
    "SELECT e.event_id, j.model, e.at, e.from_state, e.to_state, e.reason,"
    " (SELECT MAX(p.at) FROM job_events p WHERE p.job_id=e.job_id AND p.event_id<e.event_id"
    " AND p.to_state=e.from_state),"
    " (SELECT MIN(i.received_at) FROM instances i WHERE i.series_key=j.series_key)"
    " FROM job_events e JOIN jobs j ON j.job_id=e.job_id WHERE {where} ORDER BY e.event_id LIMIT ?"
)


@dataclass(frozen=True, slots=True)
class Observation:
    stage: str
    model: str
    seconds: float


@dataclass(frozen=True, slots=True)
class Failure:
    reason: str  # a reason class (reason_class), few distinct values
    model: str


@dataclass(frozen=True, slots=True)
class Batch:
    """What happened after a cursor: stage observations, failures, and the cursor to continue from."""

    observations: tuple[Observation, ...]
    failures: tuple[Failure, ...]
    last_event_id: int
    last_stage_id: int


def reason_class(reason: str) -> str:
    """A job's failure reason as a label: its words before any detail (no numbers, ids or peer answers)."""
    head = re.split(r"[:(;,\[]", reason, maxsplit=1)[0]
    words = re.sub(r"[^a-z ]+", " ", head.lower()).split()
    return " ".join(words)[:48] or "unknown"


def _from_event(row: Sequence[Any]) -> tuple[Observation | None, Failure | None]:
    _, model, at, old, new, reason, previous_at, first_at = row
    stage, since = "", None
    if old == "" and new == "pending":
        stage, since = "receive_to_complete", first_at
    elif old == "pending" and new == "queued":
        stage, since = "complete_to_queued", previous_at
    elif old == "queued" and new == "running":
        stage, since = "queued_to_started", previous_at
    elif new == "delivered":
        stage, since = "end_to_end", first_at
    observation = Observation(stage, str(model), max(0.0, float(at) - float(since))) if since is not None else None
    failure = Failure(reason_class(str(reason)), str(model)) if new in ("failed", "dead") else None
    return (observation if stage else None), failure


def events_after(state: State, event_id: int, stage_id: int, limit: int = 5000) -> Batch:
    """Everything recorded after the cursors (event_id of job_events, stage_id of job_stages), oldest first."""
    rows = state._query(_EVENTS.format(where="e.event_id > ?"), (event_id, limit))
    observations: list[Observation] = []
    failures: list[Failure] = []
    for row in rows:
        observation, failure = _from_event(row)
        observations += [observation] if observation else []
        failures += [failure] if failure else []
    stages = state.stages_since(stage_id, limit)
    observations += [Observation(s.stage, s.model, s.seconds) for s in stages]
    last_event = int(rows[-1][0]) if rows else event_id
    last_stage = stages[-1].stage_id if stages else stage_id
    return Batch(tuple(observations), tuple(failures), last_event, last_stage)


def observations_since(state: State, since: float, limit: int = 50_000) -> list[Observation]:
    """Stage observations of events and stage times recorded after the time `since`."""
    rows = state._query(_EVENTS.format(where="e.at > ?"), (since, limit))
    found = [observation for observation, _ in map(_from_event, rows) if observation]
    stage_rows = state._query(
        "SELECT stage, model, seconds FROM job_stages WHERE at > ? ORDER BY stage_id LIMIT ?", (since, limit)
    )
    return found + [Observation(str(r[0]), str(r[1]), float(r[2])) for r in stage_rows]


def percentile(values: Sequence[float], fraction: float) -> float:
    """Nearest-rank percentile of sorted `values` (non-empty)."""
    index = max(0, min(len(values) - 1, round(fraction * len(values) + 0.5) - 1))
    return values[index]


@dataclass(frozen=True, slots=True)
class StageSummary:
    stage: str
    count: int
    p50_s: float
    p95_s: float


def summarize(observations: Iterable[Observation]) -> list[StageSummary]:
    """p50 and p95 per stage (all models together), in pipeline order; stages without observations are left out."""
    by_stage: dict[str, list[float]] = defaultdict(list)
    for observation in observations:
        by_stage[observation.stage].append(observation.seconds)
    summaries = []
    for stage in STAGES:
        values = sorted(by_stage.get(stage, ()))
        if values:
            summaries.append(StageSummary(stage, len(values), percentile(values, 0.5), percentile(values, 0.95)))
    return summaries


def stage_summary(state: State, window_s: float, now: float | None = None) -> list[StageSummary]:
    return summarize(observations_since(state, (now or time.time()) - window_s))
