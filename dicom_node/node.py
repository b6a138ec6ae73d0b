"""The node process: SCP + assembler + enqueue, wired from settings."""

from __future__ import annotations

import logging
import multiprocessing
import signal
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field

from celery import Celery
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node import stream_to_disk
from dicom_node.assemble import Assembler
from dicom_node.audit_gaps import audit_unrecorded
from dicom_node.echo_peers import watch_peers
from dicom_node.metrics import RECEIVERS, peer_recorder, serve_metrics
from dicom_node.receive import Associations, serve
from dicom_node.receivers import Receivers, incoming_dir
from dicom_node.reconcile import Queues, purge_expired, recover_spool, requeue_lost, resume_orphaned, resume_waiting
from dicom_node.route import Rule, load_rules
from dicom_node.shared_limits import SharedLimits
from dicom_node.verify_results import watch as watch_verifications
from pacsai import audit
from pacsai.audit import AuditTrail
from pacsai.celery_app import create_app
from pacsai.enqueue import broker_diagnosis, broker_queues, enqueue_delivery, enqueue_job, queue_depth, queue_depths
from pacsai.settings import Settings
from pacsai.state import State
from pacsai.storage import Spool, protect_tree, receiving_spool

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RunningNode:
    servers: tuple[ThreadedAssociationServer, ...]  # the plain port, the TLS port, or both
    assembler: Assembler
    state: State
    settings: Settings
    trail: AuditTrail
    receivers: Receivers | None = None  # receiver processes 1..N-1 beside this one (PACSAI_RECEIVERS > 1)
    peer_checks: threading.Event = field(default_factory=threading.Event)  # set: stop checking the peers

    def stop(self) -> None:
        self.peer_checks.set()
        if self.receivers is not None:
            self.receivers.stop()
        for server in self.servers:
            server.shutdown()
        RECEIVERS.dec()
        self.assembler.stop()
        self.state.close()
        self.trail.record(audit.application(self.settings, started=False))


def start_node(settings: Settings) -> RunningNode:
    """Start listening and assembling; returns at once."""
    rules = load_rules(settings.node.routes_file)
    spool = prepare_data_dir(settings)
    state = State(settings.storage.database)
    app = create_app(settings)
    recover_spool(state, spool)
    queues = Queues(
        depth=lambda queue: queue_depth(app, queue),
        enqueue_job=lambda job: enqueue_job(app, job),
        enqueue_delivery=lambda delivery: enqueue_delivery(app, delivery),
    )

    def maintain(now: float) -> None:  # the first run is on the assembler's first tick, right after start
        resume_orphaned(state, queues)  # a killed worker's job or delivery: at once, not after the back-off
        requeue_lost(state, settings, queues, now)
        resume_waiting(state, settings, queues, now)
        purge_expired(state, spool, settings, now)

    associations = Associations()
    receivers: Receivers | None = None
    shared: SharedLimits | None = None
    if settings.node.receivers > 1:
        shared = SharedLimits(settings.node.receivers, multiprocessing.get_context("spawn"))
        receivers = Receivers(settings, shared, on_released=lambda: assembler.nudge())

    def open_series() -> set[str]:  # the series open associations are still sending, in every receiver process
        return associations.open_series() | (receivers.open_series() if receivers is not None else set())

    assembler = Assembler(
        settings,
        state,
        spool,
        rules,
        enqueue=queues.enqueue_job,
        open_series=open_series,
        maintain=maintain,
        diagnose=lambda: broker_diagnosis(app),
    )
    trail = audit.trail_for(settings)
    audit_unrecorded(state, settings, trail)  # instances a killed node acknowledged but never audited (issue 9)
    trail.record(audit.application(settings, started=True))  # before listening: what follows belongs to this run

    def released(series_keys: list[str]) -> None:
        state.mark_released(series_keys)
        assembler.nudge()  # complete at once when the series holds as many instances as it declares

    if receivers is not None:  # they listen first: once this process listens too, new connections spread at once
        receivers.start()
    servers = serve(settings, state, spool, associations, on_released=released, trail=trail, shared=shared)
    RECEIVERS.inc()  # this process listens too
    if settings.node.metrics_port:
        start_metrics(settings, state, app, rules)
    assembler.start()
    running = RunningNode(
        servers=tuple(servers), assembler=assembler, state=state, settings=settings, trail=trail, receivers=receivers
    )
    if settings.delivery.peers or settings.delivery.web_peers:  # E7: C-ECHO (DICOMweb: QIDO-RS) every peer now
        watch_peers(settings, peer_recorder(state), running.peer_checks)  # in the background, and every 5 min
    watch_verifications(settings, state, spool, running.peer_checks)  # proof of delivery follow-ups (profile verify)
    if settings.node.web_port:  # the operator console beside the node (else: `pacsai web`)
        from dicom_node.console.cli import serve_in_thread

        serve_in_thread(settings)
        log.info("console on %s:%d", settings.node.web_host, settings.node.web_port)
    return running


def prepare_data_dir(settings: Settings) -> Spool:
    """The spool, checked writable (S5), with private modes and no partial transfers left from the last run."""
    spool = receiving_spool(settings)
    spool.check_writable()  # S5: a read-only or unwritable spool stops the node here, naming the directory
    if changed := protect_tree(settings.storage.data_dir):  # folders 0700, files 0600 (data of older releases)
        log.warning("made %d file(s) and folder(s) in the data directory private to this user", changed)
    incoming = incoming_dir(settings, 0)
    if sum(stream_to_disk.remove_leftovers(folder) for folder in (incoming, *incoming.glob("r*"))):
        log.warning("removed partial instances of transfers cut off when the node last stopped")
    return spool


def start_metrics(settings: Settings, state: State, app: Celery, rules: Sequence[Rule]) -> None:
    """The Prometheus endpoint, with the depth of every queue the rules' models use (one broker connection)."""
    serve_metrics(
        state,
        settings.node.metrics_host,
        settings.node.metrics_port,
        settings.delivery.send_alert_after,
        settings=settings,
        depths=lambda names: queue_depths(app, names),
        queues=tuple(broker_queues(rule.model for rule in rules)),
    )
    log.info("metrics on http://%s:%d/metrics", settings.node.metrics_host, settings.node.metrics_port)


def run_node(settings: Settings) -> int:
    """Run until SIGTERM/SIGINT."""
    node = start_node(settings)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    log.info("stopping")
    node.stop()
    return 0
