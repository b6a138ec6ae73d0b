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
from dicom_node.receive import MAX_PDU_BYTES, build_ae
from dicom_node.tcp import set_nodelay
from pacsai.settings import Settings
from tests.services import free_port

pytestmark = [pytest.mark.integration]
DEADLINE_S = 2.0


@pytest.fixture()
def server(tmp_path: Path) -> Iterator[tuple[GuardedServer, int]]:
    port = free_port()
    settings = Settings.from_env({"PACSAI_DATA_DIR": str(tmp_path), "PACSAI_PEERS": "GOOD@127.0.0.1:104"})
    ae = build_ae(settings)
    server: GuardedServer = ae.make_server(  # type: ignore[assignment]  # server_class makes it one
        ("127.0.0.1", port), evt_handlers=[(evt.EVT_C_ECHO, lambda e: 0x0000)], server_class=GuardedServer
    )
    server.handshake_deadline_s = server.pdu_deadline_s = DEADLINE_S
    server.per_address_limit = 4
    ae._servers.append(server)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server, port
    server.shutdown()


@pytest.fixture()
def patient_server(tmp_path: Path) -> Iterator[tuple[GuardedServer, int]]:
    """The guard with deadlines as long as in production: what closes early here is closed by a check, not a timer."""
    port = free_port()
    settings = Settings.from_env({"PACSAI_DATA_DIR": str(tmp_path), "PACSAI_PEERS": "GOOD@127.0.0.1:104"})
    ae = build_ae(settings)
    server: GuardedServer = ae.make_server(  # type: ignore[assignment]  # server_class makes it one
        ("127.0.0.1", port), evt_handlers=[(evt.EVT_C_ECHO, lambda e: 0x0000)], server_class=GuardedServer
    )
    server.handshake_deadline_s, server.pdu_deadline_s = 10.0, 30.0
    ae._servers.append(server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server, port
    server.shutdown()


def pdus_until_closed(sock: socket.socket, limit_s: float) -> tuple[list[int], float]:
    """PDU types the node sends until it closes the connection, and how long that took (fails past `limit_s`)."""
    sock.settimeout(limit_s)
    started, received = time.monotonic(), b""
    try:
        while chunk := sock.recv(65536):
            received += chunk
    except ConnectionResetError:
        pass
    except TimeoutError:
        pytest.fail(f"connection still open after {limit_s} s")
    types, at = [], 0
    while at + 6 <= len(received):
        kind, _, length = struct.unpack_from(">BBL", received, at)
        types.append(kind)
        at += 6 + length
    return types, time.monotonic() - started


@pytest.mark.catalogue("N5")
@pytest.mark.parametrize("declared", [0xFFFFFFFF, MAX_PDU_BYTES + 1])  # one byte over our maximum
def test_a_p_data_longer_than_our_maximum_pdu_is_aborted_at_once(
    declared: int, patient_server: tuple[GuardedServer, int]
) -> None:
    """Issue 9 item 7: the declared length alone is enough; nothing waits for the bytes (before: 30 s)."""
    sock = associated_quietly(patient_server[1])
    sock.sendall(struct.pack(">BBL", 0x04, 0, declared) + b"\x00")
    types, seconds = pdus_until_closed(sock, 10)
    assert types == [0x07]  # A-ABORT
    assert seconds < 2.0  # a liveness bound, not a performance target: it takes milliseconds
    assert echo_ok(patient_server[1])


@pytest.mark.catalogue("N1")
@pytest.mark.parametrize("when", ["before association", "after association"])
def test_an_unknown_pdu_type_with_a_length_is_closed_at_once(
    when: str, patient_server: tuple[GuardedServer, int]
) -> None:
    """Issue 9 item 7: type 0x53 declaring 16 bytes and sending 4 of them (before: the 10 s handshake deadline)."""
    sock = raw(patient_server[1]) if when == "before association" else associated_quietly(patient_server[1])
    sock.sendall(struct.pack(">BBL", 0x53, 0, 16) + b"\x00" * 4)
    types, seconds = pdus_until_closed(sock, 15)
    assert types == [0x07]  # A-ABORT
    assert seconds < 2.0
    assert echo_ok(patient_server[1])


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
    assoc = ae.associate(
        "127.0.0.1", port, ae_title="PACSAI", bind_address=(source, 0), evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)]
    )
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
    assert assoc.is_established and assoc.dul.socket is not None and assoc.dul.socket.socket is not None
    return assoc, assoc.dul.socket.socket


def associated_quietly(port: int) -> socket.socket:
    """A real association whose socket only the test reads: pynetdicom's reader thread is stopped, the socket open."""
    assoc, sock = associated(port)
    dul = assoc.dul  # type: ignore[attr-defined]
    dul._kill_thread = True  # the DUL loop ends without closing the socket (else it may read the node's A-ABORT)
    dul.join(timeout=5)
    return sock


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
    assert echo_ok(server[1])  # a good peer is served meanwhile
    assert closed_within(silent, DEADLINE_S + 5) < DEADLINE_S + 5
    assert closed_within(drip, DEADLINE_S + 5) < DEADLINE_S + 5


@pytest.mark.catalogue("N4")
@pytest.mark.parametrize("declared", [16_000])  # under our maximum PDU length: longer ones are aborted at once (N5)
def test_a_pdu_that_never_completes_is_closed_at_the_pdu_deadline(
    declared: int, server: tuple[GuardedServer, int]
) -> None:
    assoc, sock = associated(server[1])
    sock.sendall(struct.pack(">BBL", 0x04, 0, declared) + b"\x00")  # P-DATA-TF header, then (almost) nothing
    deadline = time.monotonic() + DEADLINE_S + 5
    while time.monotonic() < deadline and not (assoc.is_aborted or not assoc.is_alive()):  # type: ignore[attr-defined]
        time.sleep(0.1)
    assert assoc.is_aborted or not assoc.is_alive()  # type: ignore[attr-defined]
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
    assert refused >= 2  # no more than the cap of 4 are held
    assert echo_ok(port, source="127.0.0.2")  # another address still gets in
    for sock in idle:
        sock.close()
    deadline = time.monotonic() + 12  # pynetdicom ends a closed, never-negotiated association at acse_timeout
    while time.monotonic() < deadline and not echo_ok(port, source="127.0.0.1"):
        time.sleep(0.5)
    assert echo_ok(port, source="127.0.0.1")  # the slots are free again
