"""Prometheus metrics of the node: counters of what arrived, and the state counts of the system of record."""

from __future__ import annotations

from collections.abc import Iterator

from prometheus_client import CollectorRegistry, Counter, Gauge, start_http_server
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from worker.state import State

REGISTRY = CollectorRegistry()
INSTANCES = Counter("pacsai_instances_received", "C-STORE requests answered, by outcome", ["outcome"],
                    registry=REGISTRY)
ASSOCIATIONS = Counter("pacsai_associations", "Associations requested, by result", ["result"], registry=REGISTRY)
PEER_REACHABLE = Gauge("pacsai_peer_reachable", "1 when the peer answered our last C-ECHO check (E7), else 0",
                       ["peer"], registry=REGISTRY)


def record_peer(ae_title: str, reachable: bool) -> None:
    PEER_REACHABLE.labels(peer=ae_title).set(1 if reachable else 0)


class StateCollector(Collector):
    """Reads counts from the database on each scrape, so worker-side progress shows here too."""

    def __init__(self, state: State, alert_after_failures: int) -> None:
        self._state, self._alert_after = state, alert_after_failures

    def collect(self) -> Iterator[GaugeMetricFamily]:
        counts = self._state.counts()
        for table, help_text in (("series", "Series by state"), ("jobs", "Jobs by state"),
                                 ("deliveries", "Delivered result files by last outcome")):
            family = GaugeMetricFamily(f"pacsai_{table}", help_text, labels=["state"])
            for state, count in sorted(counts[table].items()):
                family.add_metric([state], count)
            yield family
        failing = GaugeMetricFamily("pacsai_deliveries_failing",
                                    "Jobs whose results could not be delivered after the alert threshold")
        failing.add_metric([], self._state.failing_deliveries(self._alert_after))
        yield failing


def serve_metrics(state: State, host: str, port: int, alert_after_failures: int) -> None:
    REGISTRY.register(StateCollector(state, alert_after_failures))
    start_http_server(port, addr=host, registry=REGISTRY)
