"""Several receiver processes on the DICOM port(s), `PACSAI_RECEIVERS` (SO_REUSEPORT).

One association is served by one process, and its Python work (pynetdicom's PDUs and state machine, our checks of
each data set) holds that process's GIL: one process serves at most about one core of associations, and more
associations at once only share it. With N receivers every process binds the same port(s); the kernel hands each new
connection to one of the N listening sockets (a hash of its addresses and ports, not their load).

The node process is receiver 0 and keeps everything else (assembler, maintenance, metrics, console). Receivers 1..N-1
are spawned processes that store, record and audit on their own: the spool takes files by rename, the database by
transaction, the audit trail by O_APPEND lines, so they need no one in between. They tell the node process, over a
pipe, what only it acts on: the series their open associations are sending (the assembler does not complete those),
releases (complete at once when the declared count is there), and their instance and association counts (metrics).

The limits that span processes are counted in shared memory, one row per receiver, under one lock:
PACSAI_MAX_ASSOCIATIONS (associations admitted) and PACSAI_MAX_CONNECTIONS_PER_ADDRESS (connections per source
address). The pending-connection budget stays per process: it protects each process's own threads. A receiver that
dies is started again; the node clears its row, its open series and its partial files first. Instances it had
acknowledged are in the spool and the database; their audit message is written at the node's next start
(audit_gaps), as for a node killed with associations open.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

from billiard.util import set_pdeathsig

from dicom_node import stream_to_disk
from dicom_node.guard import GuardedServer
from dicom_node.metrics import ASSOCIATIONS, INSTANCES, RECEIVER_RESTARTS, RECEIVERS
from dicom_node.shared_limits import SharedLimits
from dicom_node.tls import TlsServer
from pacsai import logs
from pacsai.settings import Settings

log = logging.getLogger(__name__)
_COUNTED = {"pacsai_instances_received": INSTANCES, "pacsai_associations": ASSOCIATIONS}
_RESTART_AFTER_S = 1.0
_READY_TIMEOUT_S = 60.0


def incoming_dir(settings: Settings, index: int) -> Path:
    """Where receiver `index` streams data sets as they arrive (receiver 0, the node process: incoming/ itself)."""
    incoming = settings.storage.data_dir / "incoming"
    return incoming if index == 0 else incoming / f"r{index}"


class SharedPortServer(GuardedServer):
    """The guarded server of one of several receiver processes on the same port."""

    reuse_port = True


class SharedPortTlsServer(TlsServer):
    """The TLS server of one of several receiver processes on the same port."""

    reuse_port = True


@dataclass(slots=True)
class _Receiver:
    index: int
    open_series: frozenset[str] = frozenset()
    process: Any = None
    ready: threading.Event = field(default_factory=threading.Event)


class Receivers:
    """The node process's side: starts receivers 1..N-1, listens to them, starts a dead one again."""

    def __init__(self, settings: Settings, shared: SharedLimits, on_released: Callable[[], None]) -> None:
        self._settings, self._shared, self._on_released = settings, shared, on_released
        self._context = multiprocessing.get_context("spawn")  # no fork of a process with threads
        self._receivers = [_Receiver(index) for index in range(1, settings.node.receivers)]
        self._lock = threading.Lock()
        self._stopping = threading.Event()

    def start(self) -> None:
        """Start every receiver and wait until each listens (the node's port then spreads over all of them)."""
        for receiver in self._receivers:
            name = f"pacsai-receiver-{receiver.index}"
            threading.Thread(target=self._keep, args=(receiver,), name=name, daemon=True).start()
        deadline = time.monotonic() + _READY_TIMEOUT_S
        for receiver in self._receivers:
            if not receiver.ready.wait(max(0.0, deadline - time.monotonic())):
                log.error("receiver %d did not start listening within %.0f s", receiver.index, _READY_TIMEOUT_S)
        log.info("%d receiver processes share the DICOM port", len(self._receivers) + 1)

    def open_series(self) -> set[str]:
        with self._lock:
            return set().union(*(receiver.open_series for receiver in self._receivers))

    def stop(self) -> None:
        with self._lock:  # no receiver is started after this
            self._stopping.set()
        for receiver in self._receivers:
            if receiver.process is not None and receiver.process.is_alive():
                receiver.process.terminate()  # SIGTERM: the receiver stops listening and ends its associations
        for receiver in self._receivers:
            if receiver.process is not None:
                receiver.process.join(timeout=10)
                if receiver.process.is_alive():
                    receiver.process.kill()

    def _keep(self, receiver: _Receiver) -> None:
        """This thread starts the receiver (it dies with this thread: PDEATHSIG), hears it, and restarts it."""
        while True:
            ours, theirs = self._context.Pipe(duplex=False)
            process = self._context.Process(
                target=serve_as_receiver,
                args=(self._settings, receiver.index, theirs, self._shared, os.getpid()),
                name=f"pacsai-receiver-{receiver.index}",
                daemon=True,
            )
            with self._lock:
                if self._stopping.is_set():
                    ours.close()
                    theirs.close()
                    return
                process.start()
                receiver.process = process
            theirs.close()
            self._hear(receiver, ours)
            ours.close()
            process.join()
            self._forget(receiver)
            if self._stopping.is_set():
                return
            RECEIVER_RESTARTS.inc()
            log.error(
                "receiver %d (pid %d) ended with exit code %s; starting it again",
                receiver.index,
                process.pid,
                process.exitcode,
            )
            time.sleep(_RESTART_AFTER_S)

    def _hear(self, receiver: _Receiver, messages: Connection) -> None:
        while True:
            try:
                kind, payload = messages.recv()
            except (EOFError, OSError):  # the receiver ended
                return
            if kind == "ready":
                receiver.ready.set()
                RECEIVERS.inc()
            elif kind == "open":
                with self._lock:
                    receiver.open_series = frozenset(payload)
            elif kind == "released":
                self._on_released()
            elif kind == "counts":
                for name, labels, delta in payload:
                    _COUNTED[name].labels(**labels).inc(delta)

    def _forget(self, receiver: _Receiver) -> None:
        if receiver.ready.is_set():
            RECEIVERS.dec()
        receiver.ready.clear()
        self._shared.recover()
        self._shared.clear(receiver.index)
        with self._lock:
            receiver.open_series = frozenset()
        if stream_to_disk.remove_leftovers(incoming_dir(self._settings, receiver.index)):
            log.warning("removed the partial instances of receiver %d's cut-off transfers", receiver.index)
        if not self._stopping.is_set():
            self._on_released()  # its series are no longer open: let the assembler look again


class _Reporter:
    """A receiver's messages to the node process (one writer at a time: association threads share the pipe)."""

    def __init__(self, connection: Connection) -> None:
        self._connection, self._lock = connection, threading.Lock()
        self._sent: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

    def send(self, kind: str, payload: Any = None) -> None:
        with self._lock, contextlib.suppress(OSError):  # the node process is gone: this receiver ends shortly
            self._connection.send((kind, payload))

    def counts(self) -> None:
        """What the metrics counted since the last call."""
        deltas = []
        for name, metric in _COUNTED.items():
            for sample in next(iter(metric.collect())).samples:
                if not sample.name.endswith("_total"):
                    continue
                key = (name, tuple(sorted(sample.labels.items())))
                if delta := sample.value - self._sent.get(key, 0.0):
                    deltas.append((name, dict(key[1]), delta))
                    self._sent[key] = sample.value
        if deltas:
            self.send("counts", deltas)


def serve_as_receiver(settings: Settings, index: int, connection: Connection, shared: SharedLimits, node: int) -> None:
    """Receiver `index`'s process: serve the DICOM port(s) beside the node process until SIGTERM or its end."""
    set_pdeathsig(signal.SIGKILL)
    if os.getppid() != node:  # the node died before the signal was set
        os._exit(1)
    logs.configure(settings.log_level)
    from dicom_node.receive import Associations, serve  # here: the node process imports this module from receive's
    from pacsai import audit
    from pacsai.state import State
    from pacsai.storage import receiving_spool

    shared.index = index
    reporter = _Reporter(connection)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    incoming = incoming_dir(settings, index)
    incoming.mkdir(mode=0o700, parents=True, exist_ok=True)
    stream_to_disk.remove_leftovers(incoming)
    state = State(settings.storage.database)
    spool = receiving_spool(settings)

    def released(series_keys: list[str]) -> None:
        state.mark_released(series_keys)
        reporter.send("released")

    associations = Associations(changed=lambda series: reporter.send("open", sorted(series)))
    trail = audit.trail_for(settings)
    servers = serve(settings, state, spool, associations, released, trail, shared=shared, incoming=incoming)
    reporter.send("ready")
    while not stop.wait(1.0) and os.getppid() == node:
        reporter.counts()
    for server in servers:
        server.shutdown()
    reporter.counts()
    state.close()
