"""N1–N5, N9: hostile raw-socket peers against the node's SCP; the guard frees their slots; good peers keep working."""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from pynetdicom import AE, evt

from dicom_node.guard import GuardedServer
from dicom_node.receive import build_ae, set_nodelay
from tests.services import free_port
from worker.settings import Settings

pytestmark = [pytest.mark.integration]
DEADLINE_S = 2.0


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[tuple[GuardedServer, int]]:
    port = free_port()
    settings = Settings.from_env({"PACSAI_DATA_DIR": str(tmp_path), "PACSAI_PEERS": "GOOD@127.0.0.1:104"})
    ae = build_ae(settings)
    server: GuardedServer = ae.make_server(("127.0.0.1", port), evt_handlers=[(evt.EVT_C_ECHO, lambda e: 0x0000)],
                                           server_class=GuardedServer)
    server.handshake_deadline_s = server.pdu_deadline_s = DEADLINE_S
    server.per_address_limit = 4
    ae._servers.append(server)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, port
    server.shutdown()


def closed_within(sock: socket.socket, seconds: float) -> float:
    """Seconds until the peer closed (or aborted) the connection; fails if it stays open longer."""
    sock.settimeout(seconds)
    started = time.monotonic()
    try:
        while sock.recv(65536):
            pass
    except (TimeoutError, ConnectionResetError) as exc:
        if isinstance(exc, socket.timeout):
            pytest.fail(f"connection still open after {seconds} s")
    return time.monotonic() - started


def echo_ok(port: int, source: str = "127.0.0.2") -> bool:
    ae = AE(ae_title="GOOD")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSAI", bind_address=(source, 0),
                         evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)])
    if not assoc.is_established:
        return False
    status = assoc.send_c_echo()
    assoc.release()
    return bool(status) and int(status.Status) == 0


def raw(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=5)


def associated(port: int) -> tuple[object, socket.socket]:
    """A real association whose raw socket the test then abuses."""
    ae = AE(ae_title="GOOD")
    ae.add_requested_context("1.2.840.10008.1.1")
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSAI")
    assert assoc.is_established
    return assoc, assoc.dul.socket.socket


@pytest.mark.catalogue("N1")
def test_unknown_pdu_type_before_association_is_dropped(server: tuple[GuardedServer, int]) -> None:
    sock = raw(server[1])
    sock.sendall(bytes([0x53, 0, 0, 0, 0, 2, 0, 0]))
    assert closed_within(sock, DEADLINE_S + 5) < DEADLINE_S + 5
    assert echo_ok(server[1])


@pytest.mark.catalogue("N2", "N3")
def test_silent_and_drip_feeding_peers_are_closed_at_the_handshake_deadline(server: tuple[GuardedServer, int]) -> None:
    silent, drip = raw(server[1]), raw(server[1])
    request = bytes([0x01, 0, 0, 0, 0x00, 0xCC]) + b"\x00\x01" + b"\x00" * 10

    def dribble() -> None:
        for byte in request:
            try:
                drip.send(bytes([byte]))
            except OSError:
                return
            time.sleep(0.3)

    threading.Thread(target=dribble, daemon=True).start()
    assert echo_ok(server[1])                                       # a good peer is served meanwhile
    assert closed_within(silent, DEADLINE_S + 5) < DEADLINE_S + 5
    assert closed_within(drip, DEADLINE_S + 5) < DEADLINE_S + 5


@pytest.mark.catalogue("N4", "N5")
@pytest.mark.parametrize("declared", [1_000_000, 0xFFFFFFFF])
def test_a_pdu_that_never_completes_is_closed_at_the_pdu_deadline(declared: int,
                                                                   server: tuple[GuardedServer, int]) -> None:
    assoc, sock = associated(server[1])
    sock.sendall(struct.pack(">BBL", 0x04, 0, declared) + b"\x00")      # P-DATA-TF header, then (almost) nothing
    deadline = time.monotonic() + DEADLINE_S + 5
    while time.monotonic() < deadline and not (assoc.is_aborted or not assoc.is_alive()):   # type: ignore[attr-defined]
        time.sleep(0.1)
    assert assoc.is_aborted or not assoc.is_alive()                 # type: ignore[attr-defined]
    assert echo_ok(server[1])


@pytest.mark.catalogue("N9")
def test_many_idle_sockets_from_one_address_do_not_lock_out_others(server: tuple[GuardedServer, int]) -> None:
    guard, port = server
    idle = [raw(port) for _ in range(6)]
    time.sleep(0.3)
    refused = 0
    for sock in idle:
        sock.settimeout(0.5)
        try:
            refused += sock.recv(1) == b""
        except TimeoutError:
            pass
        except ConnectionResetError:
            refused += 1
    assert refused >= 2                                             # no more than the cap of 4 are held
    assert echo_ok(port, source="127.0.0.2")                        # another address still gets in
    for sock in idle:
        sock.close()
    deadline = time.monotonic() + 12      # pynetdicom ends a closed, never-negotiated association at acse_timeout
    while time.monotonic() < deadline and not echo_ok(port, source="127.0.0.1"):
        time.sleep(0.5)
    assert echo_ok(port, source="127.0.0.1")                        # the slots are free again
