"""The node process: SCP + assembler + enqueue, wired from settings."""

from __future__ import annotations

import logging
import signal
import threading
from dataclasses import dataclass, field

from pynetdicom.transport import ThreadedAssociationServer

from dicom_node import audit, incoming
from dicom_node.assemble import Assembler
from dicom_node.audit import AuditTrail
from dicom_node.metrics import record_peer, serve_metrics
from dicom_node.peers_check import watch_peers
from dicom_node.receive import Associations, serve
from dicom_node.reconcile import Queues, purge_expired, recover_spool, requeue_lost
from dicom_node.route import load_rules
from dicom_node.spool import Spool
from worker.celery_app import create_app
from worker.enqueue import broker_diagnosis, enqueue_delivery, enqueue_job, queue_depth
from worker.settings import Settings
from worker.state import State

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class RunningNode:
    servers: tuple[ThreadedAssociationServer, ...]    # the plain port, the TLS port, or both
    assembler: Assembler
    state: State
    settings: Settings
    trail: AuditTrail
    peer_checks: threading.Event = field(default_factory=threading.Event)   # set: stop checking the peers

    def stop(self) -> None:
        self.peer_checks.set()
        for server in self.servers:
            server.shutdown()
        self.assembler.stop()
        self.state.close()
        self.trail.record(audit.application(self.settings, started=False))


def start_node(settings: Settings) -> RunningNode:
    """Start listening and assembling; returns at once."""
    rules = load_rules(settings.routes_file)
    spool = Spool(settings.spool_dir, settings.log_key, reserve_bytes=settings.spool_reserve_mb * 1024 * 1024)
    spool.check_writable()      # S5: a read-only or unwritable spool stops the node here, naming the directory
    if incoming.remove_leftovers(settings.data_dir / "incoming"):
        log.warning("removed partial instances of transfers cut off when the node last stopped")
    state = State(settings.database)
    app = create_app(settings)
    recover_spool(state, spool)
    queues = Queues(depth=lambda queue: queue_depth(app, queue), enqueue_job=lambda job: enqueue_job(app, job),
                    enqueue_delivery=lambda delivery: enqueue_delivery(app, delivery))

    def maintain(now: float) -> None:
        requeue_lost(state, settings, queues, now)
        purge_expired(state, spool, settings, now)

    associations = Associations()
    assembler = Assembler(settings, state, spool, rules, enqueue=queues.enqueue_job,
                          open_series=associations.open_series, maintain=maintain,
                          diagnose=lambda: broker_diagnosis(app))
    trail = audit.trail_for(settings)
    servers = serve(settings, state, spool, associations, on_released=state.mark_released, trail=trail)
    trail.record(audit.application(settings, started=True))
    if settings.metrics_port:
        serve_metrics(state, settings.metrics_host, settings.metrics_port, settings.send_alert_after)
        log.info("metrics on http://%s:%d/metrics", settings.metrics_host, settings.metrics_port)
    assembler.start()
    running = RunningNode(servers=tuple(servers), assembler=assembler, state=state, settings=settings, trail=trail)
    if settings.peers:      # E7: C-ECHO every peer now (in the background: we listen already) and every 5 min
        watch_peers(settings, record_peer, running.peer_checks)
    return running


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
