"""Network guard around pynetdicom's server: per-address connection cap and deadlines it does not enforce itself.

pynetdicom waits in a blocking recv() for a whole PDU and counts raw sockets toward nothing, so a slow or hostile
peer can hold a thread and a slot for minutes (fault catalogue N1–N5, N9). The guard
- refuses a TCP connection when its address already holds `per_address_limit` connections (N9),
- closes a connection that has not completed association negotiation within `handshake_deadline_s` (N1–N3),
- closes an association that has not completed a PDU within `pdu_deadline_s` (N4, N5: a drip-fed or over-long PDU),
- closes a connection at once when its first PDU is unrecognised or undecodable (N7, N14: HTTP, a TLS ClientHello).
Closing the socket from the watchdog thread ends the blocked recv(); pynetdicom then tears the association down.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading
import time
from typing import Any

from pynetdicom import evt
from pynetdicom.transport import ThreadedAssociationServer

log = logging.getLogger(__name__)


class GuardedServer(ThreadedAssociationServer):
    """ThreadedAssociationServer with a per-address cap and a watchdog thread for deadlines."""

    per_address_limit = 4
    handshake_deadline_s = 10.0
    pdu_deadline_s = 30.0

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._lock = threading.Lock()
        self._progress: dict[int, tuple[float, float]] = {}   # id(assoc) → (connected at, last PDU at)
        self._pending: list[tuple[float, str]] = []             # (accepted at, address) before EVT_CONN_OPEN
        super().__init__(*args, **kwargs)
        self.bind(evt.EVT_CONN_OPEN, self._on_open)
        self.bind(evt.EVT_DATA_RECV, self._on_data)
        self.bind(evt.EVT_FSM_TRANSITION, self._on_transition)
        self._stop = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name="pacsai-guard", daemon=True)
        self._watchdog.start()

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Refuse the TCP connection when this address already holds `per_address_limit` (raw sockets count)."""
        address = str(client_address[0])
        now = time.monotonic()
        with self._lock:
            # accepted connections whose association object does not exist yet (EVT_CONN_OPEN not seen) count too
            self._pending = [(at, peer) for at, peer in self._pending if now - at < 5.0]
            held = sum(1 for assoc in self.active_associations
                       if assoc.requestor.address == address and _socket_open(assoc))
            held += sum(1 for _, peer in self._pending if peer == address)
            if held >= self.per_address_limit:
                log.warning("connection from %s refused: %d already open from that address", address, held)
                return False
            self._pending.append((now, address))
        return True

    def _on_open(self, event: evt.Event) -> None:
        now = time.monotonic()
        address = str(event.assoc.requestor.address)
        with self._lock:
            self._progress[id(event.assoc)] = (now, now)
            match = next((entry for entry in self._pending if entry[1] == address), None)
            if match is not None:
                self._pending.remove(match)

    def _on_data(self, event: evt.Event) -> None:
        with self._lock:
            connected, _ = self._progress.get(id(event.assoc), (time.monotonic(), 0.0))
            self._progress[id(event.assoc)] = (connected, time.monotonic())

    def _on_transition(self, event: evt.Event) -> None:
        # Evt19 in Sta2: the first PDU is of an unknown type or cannot be decoded (an HTTP request, a TLS ClientHello,
        # garbage). pynetdicom answers A-ABORT (AA-1) and then waits in Sta13 for the peer to close, which such a peer
        # never does: without this the connection holds its slot until the handshake deadline. The A-ABORT has been
        # sent when this runs (the event fires after the action), so closing now is all that is left to do.
        if event.fsm_event == "Evt19" and event.current_state == "Sta2":
            self._close(event.assoc, "first PDU is not a valid A-ASSOCIATE-RQ (not a DICOM peer?)")

    def _watch(self) -> None:
        while not self._stop.wait(0.5):
            now = time.monotonic()
            active = self.active_associations
            with self._lock:
                for gone in set(self._progress) - {id(assoc) for assoc in active}:
                    del self._progress[gone]
            for assoc in active:
                with self._lock:
                    connected, last_pdu = self._progress.get(id(assoc), (now, now))
                if not assoc.is_established and now - connected > self.handshake_deadline_s:
                    self._close(assoc, "association not negotiated within the handshake deadline")
                elif assoc.is_established and now - last_pdu > self.pdu_deadline_s:
                    self._close(assoc, "no complete PDU within the PDU deadline")

    def _close(self, assoc: Any, why: str) -> None:
        sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
        if sock is None:
            return
        log.warning("closing connection from %s: %s", assoc.requestor.address, why)
        with self._lock:
            self._progress.pop(id(assoc), None)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        # end the association thread now rather than at its ACSE timeout, so the slot is free at once
        threading.Thread(target=_end, args=(assoc,), name="pacsai-guard-kill", daemon=True).start()

    def shutdown(self) -> None:
        self._stop.set()
        super().shutdown()


def _end(assoc: Any) -> None:
    """Stop the association's threads; one still waiting for its A-ASSOCIATE-RQ is woken as well.

    kill() stops the DUL, but an acceptor thread that has no A-ASSOCIATE-RQ yet blocks on the DUL's queue for up to
    acse_timeout; an empty item ends that wait, and the thread then leaves as it does on a timeout (kill, close).
    """
    negotiated = assoc.is_established
    assoc.kill()
    if not negotiated:
        assoc.dul.to_user_queue.put(None)


def _socket_open(assoc: Any) -> bool:
    """An association thread may outlive its connection by a moment: only an open socket holds a slot."""
    transport = getattr(assoc.dul, "socket", None)
    return transport is not None and getattr(transport, "socket", None) is not None
