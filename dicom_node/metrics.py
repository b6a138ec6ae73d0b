"""Prometheus metrics of the node: counters of what arrived, and what the system of record says.

Stage times, failures, worker heartbeats and peer checks are read from the database on each scrape (workers record
their stage times and heartbeats there), so nothing is lost when a worker restarts. Each recorded stage time is
observed into `pacsai_stage_seconds` exactly once per node process: the collector keeps the last job event and
stage row it exported. A node that restarts observes the database's history again (a counter reset to Prometheus).
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from dicom_node import feedback_report
from dicom_node.console.stages import STAGES, events_after
from dicom_node.echo_peers import PeerCheck
from pacsai.console_db import ConsoleTables, PeerStatus
from pacsai.errors import Resource
from pacsai.jobs import JobState
from pacsai.settings import Settings
from pacsai.state import State

log = logging.getLogger(__name__)
REGISTRY = CollectorRegistry()
INSTANCES = Counter(
    "pacsai_instances_received", "C-STORE requests answered, by outcome", ["outcome"], registry=REGISTRY
)
ASSOCIATIONS = Counter("pacsai_associations", "Associations requested, by result", ["result"], registry=REGISTRY)
RECEIVERS = Gauge(
    "pacsai_receivers",
    "Processes listening on the DICOM port (PACSAI_RECEIVERS, fewer while one restarts)",
    registry=REGISTRY,
)
RECEIVER_RESTARTS = Counter(
    "pacsai_receiver_restarts", "Receiver processes that ended by themselves and were started again", registry=REGISTRY
)
PEER_REACHABLE = Gauge(
    "pacsai_peer_reachable",
    "1 when the peer answered our last C-ECHO (E7) or DICOMweb check, else 0",
    ["peer"],
    registry=REGISTRY,
)
BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 4 * 3600)
STAGE_SECONDS = Histogram(
    "pacsai_stage_seconds",
    f"Time each stage of a job took ({', '.join(STAGES)})",
    ["stage", "model"],
    buckets=BUCKETS_S,
    registry=None,  # collected by StateCollector right after it observed what is new
)
FAILURES = Counter("pacsai_failures", "Jobs that failed or died, by reason class", ["reason"], registry=None)
Depths = Callable[[Sequence[str]], Mapping[str, int | None]]  # every queue over one connection (enqueue.queue_depths)
WAITING_STATES = (JobState.PENDING, JobState.QUEUED, JobState.RETRYING, JobState.WAITING, JobState.ENCODED)


def record_peer(ae_title: str, reachable: bool) -> None:
    PEER_REACHABLE.labels(peer=ae_title).set(1 if reachable else 0)


def peer_recorder(state: State) -> Callable[[PeerCheck], None]:
    """`record(check)` for each peer check (C-ECHO or DICOMweb): the gauge, and the peer_status row of the console."""
    tables = ConsoleTables(state)

    def record(check: PeerCheck) -> None:
        record_peer(check.peer.ae_title, check.reachable)
        status = PeerStatus(check.peer.ae_title, check.address, check.reachable, check.detail, time.time())
        tables.record_peer(status)

    return record


class StageExporter:
    """Observes stage times and failures recorded in the database since the last call, once each."""

    def __init__(self, state: State) -> None:
        self._state, self._event_id, self._stage_id = state, 0, 0
        self._lock = threading.Lock()

    def export(self) -> None:
        with self._lock:
            while True:
                batch = events_after(self._state, self._event_id, self._stage_id)
                for observation in batch.observations:
                    STAGE_SECONDS.labels(stage=observation.stage, model=observation.model).observe(observation.seconds)
                for failure in batch.failures:
                    FAILURES.labels(reason=failure.reason).inc()
                done = (batch.last_event_id, batch.last_stage_id) == (self._event_id, self._stage_id)
                self._event_id, self._stage_id = batch.last_event_id, batch.last_stage_id
                if done:
                    return


class StateCollector(Collector):
    """Reads the database on each scrape, so worker-side progress shows here too."""

    def __init__(
        self,
        state: State,
        alert_after_failures: int,
        settings: Settings | None = None,
        depths: Depths | None = None,
        queues: tuple[str, ...] = (),
    ) -> None:
        self._state, self._alert_after = state, alert_after_failures
        self._settings, self._depths, self._queues = settings, depths, queues
        self._tables = ConsoleTables(state)
        self._stages = StageExporter(state)

    def collect(self) -> Iterator[Metric]:
        try:
            self._stages.export()
        except Exception as exc:  # a scrape must still answer with what it has
            log.warning("stage times not exported (%s)", type(exc).__name__)
        yield from STAGE_SECONDS.collect()
        yield from FAILURES.collect()
        yield from self._counts()
        yield self._oldest_waiting()
        yield self._resource_waiting()
        yield from self._queue_depths()
        yield from self._spool()
        yield from self._workers()
        yield self._verifications()
        yield from feedback_report.metrics(self._state)  # agreement with radiologists per model version

    def _counts(self) -> Iterator[GaugeMetricFamily]:
        counts = self._state.counts()
        for table, help_text in (
            ("series", "Series by state"),
            ("jobs", "Jobs by state"),
            ("deliveries", "Delivered result files by last outcome"),
            ("notices", "HL7/FHIR notices to the RIS/EHR by channel and outcome (hl7_sent, fhir_failed, ...)"),
        ):
            family = GaugeMetricFamily(f"pacsai_{table}", help_text, labels=["state"])
            for state, count in sorted(counts[table].items()):
                family.add_metric([state], count)
            yield family
        failing = GaugeMetricFamily(
            "pacsai_deliveries_failing", "Jobs whose results could not be delivered after the alert threshold"
        )
        failing.add_metric([], self._state.failing_deliveries(self._alert_after))
        yield failing

    def _verifications(self) -> GaugeMetricFamily:
        """Proof of delivery (profile `verify`): jobs verifying, committed, or failed (given up, ALERT logged)."""
        family = GaugeMetricFamily(
            "pacsai_verifications",
            "Jobs whose delivery is being verified, was confirmed (committed) or could not be (failed)",
            labels=["state"],
        )
        for state, count in self._state.verification_counts().items():
            family.add_metric([state], count)
        return family

    def _oldest_waiting(self) -> GaugeMetricFamily:
        family = GaugeMetricFamily(
            "pacsai_jobs_oldest_waiting_seconds", "Age of the oldest job in each waiting state", labels=["state"]
        )
        now = time.time()
        marks = ",".join("?" for _ in WAITING_STATES)
        rows = self._state._query(
            f"SELECT state, MIN(updated_at) FROM jobs WHERE state IN ({marks}) GROUP BY state",
            [s.value for s in WAITING_STATES],
        )
        oldest = {str(r[0]): float(r[1]) for r in rows}
        for state in WAITING_STATES:
            family.add_metric([state.value], max(0.0, now - oldest[state.value]) if state.value in oldest else 0.0)
        return family

    def _resource_waiting(self) -> GaugeMetricFamily:
        """Jobs parked in `waiting` per resource (disk, memory, broker): they resume by themselves when it is back."""
        family = GaugeMetricFamily(
            "pacsai_resource_waiting",
            "Jobs waiting for a resource to come back (disk, memory, broker)",
            labels=["resource"],
        )
        waiting = [Resource.of_reason(row.reason) or Resource.BROKER for row in self._state.jobs_in(JobState.WAITING)]
        for resource in Resource:
            family.add_metric([resource.value], waiting.count(resource))
        return family

    def _queue_depths(self) -> Iterator[GaugeMetricFamily]:
        """Asked over one connection: with the broker down a scrape costs one connect timeout, not one per queue."""
        if self._depths is None or not self._queues:
            return
        depths = self._depths(self._queues)
        family = GaugeMetricFamily("pacsai_queue_depth", "Messages waiting in each broker queue", labels=["queue"])
        for queue, depth in depths.items():
            if depth is not None:
                family.add_metric([queue], depth)
        yield family
        up = GaugeMetricFamily("pacsai_broker_up", "1 when the broker answered this scrape's queue-depth query, else 0")
        up.add_metric([], 0 if any(depth is None for depth in depths.values()) else 1)
        yield up

    def _spool(self) -> Iterator[GaugeMetricFamily]:
        if self._settings is None:
            return
        storage = self._settings.storage
        free = GaugeMetricFamily("pacsai_spool_free_bytes", "Free disk space where the spool is")
        try:
            free.add_metric([], shutil.disk_usage(storage.data_dir).free)
        except OSError:
            return
        yield free
        reserve = GaugeMetricFamily("pacsai_spool_reserve_bytes", "Free space the node keeps (PACSAI_SPOOL_RESERVE_MB)")
        reserve.add_metric([], storage.spool_reserve_bytes)
        yield reserve

    def _workers(self) -> Iterator[GaugeMetricFamily]:
        online = self._tables.workers_online(time.time())
        count = GaugeMetricFamily("pacsai_workers_online", "Worker processes with a heartbeat in the last 30 s")
        count.add_metric([], len(online))
        loaded = GaugeMetricFamily(
            "pacsai_worker_model_loaded", "1 for each model a worker keeps loaded", labels=["worker", "model", "device"]
        )
        memory = GaugeMetricFamily(
            "pacsai_gpu_memory_bytes", "GPU memory a worker process has allocated", labels=["worker", "device"]
        )
        for worker in online:
            for model in worker.models:
                loaded.add_metric([worker.worker, model, worker.device], 1)
            if worker.device.startswith("cuda"):
                memory.add_metric([worker.worker, worker.device], worker.gpu_memory_bytes)
        yield from (count, loaded, memory)


def serve_metrics(
    state: State,
    host: str,
    port: int,
    alert_after_failures: int,
    *,
    settings: Settings | None = None,
    depths: Depths | None = None,
    queues: tuple[str, ...] = (),
) -> None:
    REGISTRY.register(StateCollector(state, alert_after_failures, settings, depths, queues))
    start_http_server(port, addr=host, registry=REGISTRY)
