# Over 300 lines: one server class; its lobby, budgets and deadlines share one lock and one connection table.
"""Network guard around pynetdicom's server: connection budgets, PDU header checks and deadlines it lacks.

pynetdicom gives every connection two threads polling its socket every millisecond, blocks in recv() for a whole PDU
and counts raw sockets as associations: idle or hostile peers hold threads, CPU and slots (N1–N5, N9). The guard
- keeps an accepted connection in a lobby (one selector thread for all) until its first byte arrives, and only then
  gives it to pynetdicom: an idle socket costs a file descriptor, not two busy threads; one closed by its peer there
  is forgotten at once, one still silent at `handshake_deadline_s` is closed (N2),
- refuses a TCP connection when its address already holds `per_address_limit` connections (N9),
- keeps unnegotiated connections within `pending_limit`: when full, the oldest of the address holding most of them
  makes room for a connection from an address holding fewer (a PACS is never locked out), others are refused,
- closes a connection not negotiated within `handshake_deadline_s` (N1–N3), an association that has not completed a
  PDU within `pdu_deadline_s` (N4), and at once one whose first PDU cannot be decoded (N7, N14: HTTP, TLS),
- aborts at once a PDU whose header is impossible (`pdu_headers`: N5, an unknown PDU type).
Associations count against PACSAI_MAX_ASSOCIATIONS in `access.Gatekeeper`, only once they passed the access check.
Closing the socket from the watchdog thread ends the blocked recv(); pynetdicom then tears the association down.
"""

from __future__ import annotations

import contextlib
import logging
import re
import selectors
import socket
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pynetdicom import evt
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node.pdu_headers import check_pdu_headers
from dicom_node.shared_limits import SharedLimits

log = logging.getLogger(__name__)
_QUIET_S = 10.0  # the same refusal from the same address is logged once per this many seconds (with a count)


@dataclass(slots=True)
class _Connection:
    """One accepted TCP connection: who, since when, its socket while in the lobby, its association once made."""

    address: str
    port: int
    accepted_at: float
    last_pdu_at: float
    lobby: socket.socket | None = None
    assoc: Any = None

    @property
    def negotiated(self) -> bool:
        return self.assoc is not None and bool(self.assoc.is_established)


class GuardedServer(ThreadedAssociationServer):
    """ThreadedAssociationServer with a lobby for silent connections, connection budgets and a watchdog."""

    per_address_limit = 4
    pending_limit = 32  # connections that have not negotiated an association, all addresses together
    handshake_deadline_s = 5.0
    pdu_deadline_s = 30.0
    request_queue_size = 128  # listen backlog (socketserver's default is 5: a burst is refused by the kernel)
    reuse_port = False  # several receiver processes bind the port (SO_REUSEPORT)
    shared: SharedLimits | None = None  # their connections per address, when there are several

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self._lock = threading.Lock()
        self._connections: dict[tuple[str, int], _Connection] = {}  # by the peer's (address, port)
        self._lobby = selectors.DefaultSelector()
        self._warned: dict[tuple[str, str], tuple[float, int]] = {}  # (address, why) → (logged at, held back)
        self._warn_lock = threading.Lock()
        super().__init__(*args, **kwargs)
        self.bind(evt.EVT_CONN_OPEN, self._on_open)
        self.bind(evt.EVT_CONN_CLOSE, self._on_close)
        self.bind(evt.EVT_DATA_RECV, self._on_data)
        self.bind(evt.EVT_FSM_TRANSITION, self._on_transition)
        self._stop = threading.Event()
        self._watchdog = threading.Thread(target=self._watch, name="pacsai-guard", daemon=True)
        self._watchdog.start()

    def server_bind(self) -> None:
        if self.reuse_port and self.socket is not None:
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        super().server_bind()

    def verify_request(self, request: Any, client_address: Any) -> bool:
        """Refuse the connection when its address holds `per_address_limit`; make room in the pending budget."""
        address, port, now = str(client_address[0]), int(client_address[1]), time.monotonic()
        with self._lock, self._published():
            self._forget_closed(now)
            held = sum(1 for connection in self._connections.values() if connection.address == address)
            if self.shared is not None:  # the other receiver processes' connections from that address
                held += self.shared.connections_elsewhere(address)
            if held >= self.per_address_limit:
                self._warn(address, "refused", f"{held} already open from that address")
                return False
            pending = [connection for connection in self._connections.values() if not connection.negotiated]
            evicted = _to_evict(pending, address) if len(pending) >= self.pending_limit else None
            if len(pending) >= self.pending_limit and evicted is None:
                self._warn(address, "refused", f"{len(pending)} connections not yet negotiated")
                return False
            lobby = None
            if evicted is not None:
                lobby = self._leave_lobby(self._connections.pop((evicted.address, evicted.port), evicted))
            self._connections[(address, port)] = _Connection(address, port, now, now)
        if evicted is not None:
            why = f"{len(pending)} connections not yet negotiated: the oldest makes room"
            self._warn(evicted.address, "closed", why)
            if lobby is not None:
                self.shutdown_request(lobby)
            else:
                self._close(evicted.assoc, why)
        return True

    def process_request(self, request: Any, client_address: Any) -> None:
        """Into the lobby: pynetdicom gets the connection when its first byte arrives (see `_hand_over`)."""
        key = (str(client_address[0]), int(client_address[1]))
        with self._lock:
            connection = self._connections.setdefault(key, _Connection(*key, time.monotonic(), time.monotonic()))
            connection.lobby = request
            self._lobby.register(request, selectors.EVENT_READ, client_address)

    def _hand_over(self, client_address: Any) -> None:
        """The lobby connection is readable: give it to pynetdicom, or forget it if the peer closed it."""
        key = (str(client_address[0]), int(client_address[1]))
        with self._lock, self._published():
            connection = self._connections.get(key)
            sock = self._leave_lobby(connection) if connection is not None else None
            if sock is None:
                return
            closed = _peer_closed(sock)
            if closed:
                del self._connections[key]
        if closed:
            self.shutdown_request(sock)
            return
        try:
            super().process_request(sock, client_address)  # ThreadingMixIn: a thread runs the association
        except Exception:  # as socketserver does when process_request fails
            self.handle_error(sock, client_address)
            self.shutdown_request(sock)

    @contextlib.contextmanager
    def _published(self) -> Iterator[None]:
        """With several receiver processes: decide under their shared lock, then publish this process's connections
        per address (call with the lock held). One process: nothing to do."""
        if self.shared is None:
            yield
            return
        with self.shared.locked():
            try:
                yield
            finally:
                held = Counter(connection.address for connection in self._connections.values())
                self.shared.publish_connections(held)

    def _leave_lobby(self, connection: _Connection) -> socket.socket | None:
        """Take the connection's socket out of the lobby (call with the lock held); None when it was not there."""
        sock, connection.lobby = connection.lobby, None
        if sock is not None:
            with contextlib.suppress(KeyError, ValueError):
                self._lobby.unregister(sock)
        return sock

    def _forget_closed(self, now: float) -> None:
        """Drop connections whose socket closed, and handed-over ones that never got an association (failed TLS)."""
        stale = self.handshake_deadline_s + 10.0
        for key, connection in list(self._connections.items()):
            if connection.lobby is not None:
                continue  # the lobby itself forgets these: on EOF, or at the handshake deadline
            gone = (
                not socket_open(connection.assoc)
                if connection.assoc is not None
                else now - connection.accepted_at > stale
            )
            if gone:
                del self._connections[key]

    def _on_open(self, event: evt.Event) -> None:
        address = getattr(event, "address", None)  # EVT_CONN_OPEN carries the peer's (host, port)
        if not isinstance(address, tuple):
            address = (event.assoc.requestor.address, 0)
        key = (str(address[0]), int(address[1]))
        now = time.monotonic()
        with self._lock:
            connection = self._connections.setdefault(key, _Connection(*key, now, now))
            connection.assoc = event.assoc
        check_pdu_headers(event.assoc, self._close_now)

    def _on_close(self, event: evt.Event) -> None:
        """EOF, RST or our own close: forget the connection now; a thread still waiting for its A-ASSOCIATE-RQ ends."""
        assoc = event.assoc
        with self._lock, self._published():
            for key, connection in list(self._connections.items()):
                if connection.assoc is assoc:
                    del self._connections[key]
        if not assoc.is_established and assoc.requestor.primitive is None:
            _wake_acceptor(assoc)

    def _on_data(self, event: evt.Event) -> None:
        now = time.monotonic()
        with self._lock:
            for connection in self._connections.values():
                if connection.assoc is event.assoc:
                    connection.last_pdu_at = now

    def _on_transition(self, event: evt.Event) -> None:
        # Evt19 in Sta2: the first PDU is of an unknown type or cannot be decoded (an HTTP request, a TLS ClientHello,
        # garbage). pynetdicom answers A-ABORT (AA-1) and then waits in Sta13 for the peer to close, which such a peer
        # never does: without this the connection holds its slot until the handshake deadline. The A-ABORT has been
        # sent when this runs (the event fires after the action), so closing now is all that is left to do.
        if event.fsm_event == "Evt19" and event.current_state == "Sta2":
            self._close(event.assoc, "first PDU is not a valid A-ASSOCIATE-RQ (not a DICOM peer?)")

    def _watch(self) -> None:
        """The lobby's thread: hand over connections that sent something; enforce the deadlines every 0.25 s."""
        checked = 0.0
        while not self._stop.is_set():
            try:
                for key, _ in self._lobby.select(timeout=0.25):
                    self._hand_over(key.data)
                if time.monotonic() - checked >= 0.25:
                    checked = time.monotonic()
                    self._enforce_deadlines(checked)
            except Exception:  # this thread must outlive any one connection's trouble: it admits them all
                log.exception("network guard")
        with self._lock:
            silent = [sock for connection in self._connections.values() if (sock := self._leave_lobby(connection))]
        for sock in silent:
            self.shutdown_request(sock)
        self._lobby.close()

    def _enforce_deadlines(self, now: float) -> None:
        with self._lock, self._published():
            self._forget_closed(now)
            silent = [
                key
                for key, connection in self._connections.items()
                if connection.lobby is not None and now - connection.accepted_at > self.handshake_deadline_s
            ]
            closing = [(key[0], self._leave_lobby(self._connections.pop(key))) for key in silent]
            connections = [c for c in self._connections.values() if c.assoc is not None]
        for address, sock in closing:
            self._warn(address, "closed", "nothing received within the handshake deadline")
            if sock is not None:
                self.shutdown_request(sock)
        for connection in connections:
            if not connection.negotiated and now - connection.accepted_at > self.handshake_deadline_s:
                self._close(connection.assoc, "association not negotiated within the handshake deadline")
            elif connection.negotiated and now - connection.last_pdu_at > self.pdu_deadline_s:
                self._close(connection.assoc, "no complete PDU within the PDU deadline")

    def _warn(self, address: str, outcome: str, why: str) -> None:
        """Log "connection from A refused|closed: why"; the same one again within _QUIET_S is counted, not logged."""
        now, kind = time.monotonic(), (address, outcome + re.sub(r"\d+", "#", why))
        with self._warn_lock:
            logged_at, held = self._warned.get(kind, (-_QUIET_S, 0))
            if now - logged_at < _QUIET_S:
                self._warned[kind] = (logged_at, held + 1)
                return
            if len(self._warned) > 1024:  # many source addresses: forget the quiet ones
                self._warned = {k: v for k, v in self._warned.items() if now - v[0] < _QUIET_S}
            self._warned[kind] = (now, 0)
        more = f" ({held} more like it in the last {_QUIET_S:.0f} s)" if held else ""
        log.warning("connection from %s %s: %s%s", address, outcome, why, more)

    def _close_now(self, assoc: Any, why: str) -> None:
        log.warning("closing connection from %s: %s", assoc.requestor.address, why)
        with self._lock, self._published():
            for key, connection in list(self._connections.items()):
                if connection.assoc is assoc:
                    del self._connections[key]

    def _close(self, assoc: Any, why: str) -> None:
        sock = getattr(getattr(assoc.dul, "socket", None), "socket", None)
        if sock is None:
            return
        self._close_now(assoc, why)
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        # end the association thread now rather than at its ACSE timeout, so the slot is free at once
        threading.Thread(target=_end, args=(assoc,), name="pacsai-guard-kill", daemon=True).start()

    def shutdown(self) -> None:
        self._stop.set()
        super().shutdown()


def _to_evict(pending: list[_Connection], newcomer: str) -> _Connection | None:
    """The connection to close so one from `newcomer` fits: the oldest unnegotiated one of the address holding the
    most, when the newcomer's address would still hold fewer than that one (else None: the newcomer is refused).

    A PACS's one new connection always makes room; an address that already holds its share (idle sockets that
    reconnect) is refused instead of closing another address's sockets, so such peers cannot churn each other out
    and load the node with connections made only to be closed.
    """
    holders = Counter(connection.address for connection in pending)
    closable = [connection for connection in pending if connection.lobby is not None or connection.assoc is not None]
    if not closable:
        return None
    oldest = min(closable, key=lambda connection: (-holders[connection.address], connection.accepted_at))
    return oldest if holders[newcomer] + 1 < holders[oldest.address] else None


def _peer_closed(sock: socket.socket) -> bool:
    try:
        return not sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
    except BlockingIOError:
        return False
    except OSError:  # reset by the peer
        return True


def _end(assoc: Any) -> None:
    """Stop the association's threads; one still waiting for its A-ASSOCIATE-RQ is woken as well.

    kill() stops the DUL, but an acceptor thread that has no A-ASSOCIATE-RQ yet blocks on the DUL's queue for up to
    acse_timeout; an empty item ends that wait, and the thread then leaves as it does on a timeout (kill, close).
    """
    negotiated = assoc.is_established
    assoc.kill()
    if not negotiated:
        _wake_acceptor(assoc)


def _wake_acceptor(assoc: Any) -> None:
    """An empty item on the DUL's queue ends an acceptor thread's wait for its A-ASSOCIATE-RQ, as a timeout would.

    pynetdicom types that queue as holding primitives only, but its receive_pdu() returns None on a timeout too.
    """
    assoc.dul.to_user_queue.put(None)


def socket_open(assoc: Any) -> bool:
    """An association thread may outlive its connection by a moment: only an open socket holds a slot."""
    transport = getattr(assoc.dul, "socket", None)
    return transport is not None and getattr(transport, "socket", None) is not None
