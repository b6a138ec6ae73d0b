"""N6–N8, N10, N12–N15: malformed, cut-off and excess PDU traffic; the node stays up and keeps nothing half-received.

The hostile peers are raw sockets speaking hand-built PDUs (PS3.8 section 9.3); the good peers are pynetdicom SCUs
sending a real CT file from the shared corpus. Each test starts the whole node (SCP, spool, State, assembler) with
short guard deadlines, and checks what the catalogue asks for on the wire and in the spool and the database.
"""

from __future__ import annotations

import select
import socket
import ssl
import struct
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, PYNETDICOM_IMPLEMENTATION_UID, AllStoragePresentationContexts, evt
from pynetdicom.dsutils import decode, encode

from dicom_node.guard import GuardedServer
from dicom_node.node import RunningNode, start_node
from pacsai.settings import Settings
from tests.conftest import need
from tests.services import free_port, wait_until

pytestmark = [pytest.mark.integration]
DEADLINE_S = 2.0
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
VERIFICATION = "1.2.840.10008.1.1"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
A_ASSOCIATE_RQ, A_ASSOCIATE_AC, P_DATA_TF = 0x01, 0x02, 0x04
A_RELEASE_RQ, A_RELEASE_RP, A_ABORT = 0x05, 0x06, 0x07
FRAGMENT = 4096  # P-DATA value size we send: a 0.5 MB CT dataset becomes ~130 PDUs


# --- hand-built PDUs (PS3.8 9.3) -----------------------------------------------------------------------------------


def _item(kind: int, value: bytes) -> bytes:
    return struct.pack(">BBH", kind, 0, len(value)) + value


def pdu(kind: int, body: bytes) -> bytes:
    return struct.pack(">BBL", kind, 0, len(body)) + body


def associate_rq(
    contexts: Sequence[tuple[int, str, Sequence[str]]], *, calling: str = "GOOD", called: str = "PACSAI"
) -> bytes:
    """A-ASSOCIATE-RQ proposing (context id, abstract syntax, transfer syntaxes); max PDU 16382."""
    proposed = b"".join(
        _item(
            0x20,
            bytes([pc_id, 0, 0, 0])
            + _item(0x30, abstract.encode())
            + b"".join(_item(0x40, syntax.encode()) for syntax in syntaxes),
        )
        for pc_id, abstract, syntaxes in contexts
    )
    user = _item(0x50, _item(0x51, struct.pack(">L", 16382)) + _item(0x52, PYNETDICOM_IMPLEMENTATION_UID.encode()))
    fixed = struct.pack(">HH16s16s32s", 1, 0, called.ljust(16).encode(), calling.ljust(16).encode(), b"")
    return pdu(A_ASSOCIATE_RQ, fixed + _item(0x10, b"1.2.840.10008.3.1.1.1") + proposed + user)


def p_data(pc_id: int, value: bytes, *, command: bool, last: bool) -> bytes:
    """One P-DATA-TF holding one PDV: message control header bit 0 = command, bit 1 = last fragment."""
    control = (0x01 if command else 0x00) | (0x02 if last else 0x00)
    return pdu(P_DATA_TF, struct.pack(">LBB", len(value) + 2, pc_id, control) + value)


def fragments(pc_id: int, value: bytes, *, command: bool) -> list[bytes]:
    chunks = [value[at : at + FRAGMENT] for at in range(0, len(value), FRAGMENT)] or [b""]
    return [p_data(pc_id, chunk, command=command, last=n == len(chunks) - 1) for n, chunk in enumerate(chunks)]


A_RELEASE_RQ_PDU = pdu(A_RELEASE_RQ, b"\x00" * 4)
A_RELEASE_RP_PDU = pdu(A_RELEASE_RP, b"\x00" * 4)
A_ABORT_PDU = pdu(A_ABORT, b"\x00\x00\x00\x00")  # service-user initiated, no reason


def _ui(text: str, *, pad: bool = True) -> bytes:
    raw = text.encode()
    return raw + b"\x00" if pad and len(raw) % 2 else raw


def _us(value: int) -> bytes:
    return struct.pack("<H", value)


def c_store_rq(sop_class: str, sop_instance: str, *, message_id: int = 1, pad_uids: bool = True) -> bytes:
    """C-STORE-RQ command set, implicit VR little endian, built by hand so UIDs can be odd-length or invalid."""
    elements = [
        (0x0002, _ui(sop_class, pad=pad_uids)),
        (0x0100, _us(0x0001)),
        (0x0110, _us(message_id)),
        (0x0700, _us(0)),
        (0x0800, _us(0x0000)),
        (0x1000, _ui(sop_instance, pad=pad_uids)),
    ]
    body = b"".join(struct.pack("<HHL", 0x0000, element, len(value)) + value for element, value in elements)
    return struct.pack("<HHL", 0x0000, 0x0000, 4) + struct.pack("<L", len(body)) + body


class RawPeer:
    """A TCP client that speaks PDUs built by the test, and reads the node's PDUs back one at a time."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)

    def send(self, *pdus: bytes) -> None:
        self.sock.sendall(b"".join(pdus))

    def _exactly(self, size: int) -> bytes | None:
        data = bytearray()
        while len(data) < size:
            chunk = self.sock.recv(size - len(data))
            if not chunk:
                return None
            data += chunk
        return bytes(data)

    def read_pdu(self, timeout_s: float = 10.0) -> tuple[int, bytes] | None:
        """The next PDU (type, body); None when the node closed or reset the connection."""
        self.sock.settimeout(timeout_s)
        try:
            header = self._exactly(6)
            if header is None:
                return None
            kind, _, length = struct.unpack(">BBL", header)
            body = self._exactly(length)
        except ConnectionResetError:
            return None
        return None if body is None else (kind, body)

    def nothing_pending(self, wait_s: float) -> bool:
        """True when the node sent nothing (and did not close) within wait_s."""
        return not select.select([self.sock], [], [], wait_s)[0]

    def associate(self, contexts: Sequence[tuple[int, str, Sequence[str]]]) -> dict[int, int]:
        """Negotiate; return context id → result (0 accepted) from the A-ASSOCIATE-AC."""
        self.send(associate_rq(contexts))
        reply = self.read_pdu()
        assert reply is not None and reply[0] == A_ASSOCIATE_AC, f"expected A-ASSOCIATE-AC, got {reply!r:.80}"
        return accepted_contexts(reply[1])

    def read_command(self) -> Any:
        """Reassemble one command set from P-DATA-TF PDUs and decode it."""
        data = bytearray()
        while True:
            reply = self.read_pdu()
            assert reply is not None and reply[0] == P_DATA_TF, f"expected P-DATA-TF, got {reply!r:.80}"
            body, at, last = reply[1], 0, False
            while at < len(body):
                length, _, control = struct.unpack_from(">LBB", body, at)
                data += body[at + 6 : at + 4 + length]
                at, last = at + 4 + length, bool(control & 0x02)
            if last:
                return decode(BytesIO(bytes(data)), True, True)

    def close(self) -> None:
        self.sock.close()


def accepted_contexts(body: bytes) -> dict[int, int]:
    results, at = {}, 68  # after version, reserved, AE titles, reserved
    while at + 4 <= len(body):
        kind, _, length = struct.unpack_from(">BBH", body, at)
        if kind == 0x21:
            results[body[at + 4]] = body[at + 6]
        at += 4 + length
    return results


# --- the node under test -------------------------------------------------------------------------------------------


@dataclass
class Node:
    running: RunningNode
    settings: Settings
    aborted: list[str]  # "aborted" for each association pynetdicom reports aborted (EVT_ABORTED)

    @property
    def port(self) -> int:
        return self.settings.node.port

    @property
    def server(self) -> GuardedServer:
        server = self.running.servers[0]
        assert isinstance(server, GuardedServer)
        return server

    def spool_files(self) -> list[Path]:
        """Every file under the spool, temporary ones included."""
        return sorted(path for path in self.settings.storage.spool_dir.rglob("*") if path.is_file())

    def instances(self) -> int:
        return int(self.running.state.counts()["instances"]["received"])

    def idle(self) -> bool:
        return not self.server.active_associations


@pytest.fixture()
def make_node(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    started: list[Node] = []

    def make(*, handshake_deadline_s: float = DEADLINE_S, pdu_deadline_s: float = DEADLINE_S, **env: str) -> Node:
        variables = {
            "PACSAI_DATA_DIR": str(tmp_path / f"data{len(started)}"),
            "PACSAI_BIND_HOST": "127.0.0.1",
            "PACSAI_PORT": str(free_port()),
            "PACSAI_LOG_KEY": "test-log-key",
            "PACSAI_PEERS": "GOOD@127.0.0.1:104",
            "PACSAI_SPOOL_RESERVE_MB": "1",
            "PACSAI_QUIET_PERIOD_S": "0.5",
            "PACSAI_RELEASE_GRACE_S": "0.5",
            **{f"PACSAI_{key.upper()}": value for key, value in env.items()},
        }
        settings = Settings.from_env(variables)
        node = Node(start_node(settings), settings, [])
        node.server.handshake_deadline_s, node.server.pdu_deadline_s = handshake_deadline_s, pdu_deadline_s
        node.server.bind(evt.EVT_ABORTED, lambda event: node.aborted.append("aborted"))
        started.append(node)
        return node

    yield make
    for node in started:
        node.running.stop()


@pytest.fixture()
def node(make_node: Callable[..., Node]) -> Node:
    return make_node()


@pytest.fixture(scope="module")
def ct_file(shared: Path) -> Path:
    return shared / "dicom" / "dcm_qa_ct" / "GE_head_tilt" / "01.dcm"


def ct_dataset(path: Path) -> tuple[str, bytes]:
    """SOP Instance UID and the dataset encoded in explicit VR little endian (as the file holds it)."""
    ds = dcmread(path)
    encoded = encode(ds, False, True)
    assert encoded is not None
    return str(ds.SOPInstanceUID), encoded


def store_with_pynetdicom(port: int, path: Path) -> int:
    """C-STORE one file over a fresh association; the status, or -1 when not associated."""
    ae = AE(ae_title="GOOD")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(CT_IMAGE_STORAGE, EXPLICIT_LE)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSAI")
    if not assoc.is_established:
        return -1
    try:
        reply = assoc.send_c_store(path)
        return int(reply.Status) if "Status" in reply else -1
    finally:
        assoc.release()


def store_context(peer: RawPeer) -> int:
    """Associate proposing CT Image Storage in explicit VR little endian only; return its (accepted) context id."""
    assert peer.associate([(1, CT_IMAGE_STORAGE, [EXPLICIT_LE])]) == {1: 0}
    return 1


def start_store(peer: RawPeer, pc_id: int, path: Path, *, fragments_sent: int | None = None) -> list[bytes]:
    """Send a C-STORE-RQ and the first `fragments_sent` dataset PDUs (all when None); return the ones held back."""
    sop_uid, dataset = ct_dataset(path)
    parts = fragments(pc_id, dataset, command=False)
    cut = len(parts) if fragments_sent is None else fragments_sent
    peer.send(*fragments(pc_id, c_store_rq(CT_IMAGE_STORAGE, sop_uid), command=True), *parts[:cut])
    return parts[cut:]


def read_until_closed(peer: RawPeer, timeout_s: float = 10.0) -> list[int]:
    """Types of the PDUs the node sends until it closes the connection; fails if it is still open after timeout_s."""
    kinds: list[int] = []
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        try:
            reply = peer.read_pdu(left)
        except TimeoutError:
            break
        if reply is None:
            return kinds
        kinds.append(reply[0])
    pytest.fail(f"connection still open after {timeout_s} s (received PDU types {kinds})")


def nothing_kept(node: Node) -> None:
    """No file in the spool (temporary ones included) and no instance, series or job in the database."""
    assert node.spool_files() == []
    counts = node.running.state.counts()
    assert (counts["instances"]["received"], counts["series"], counts["jobs"]) == (0, {}, {})


def still_serves(node: Node, path: Path) -> None:
    """A normal association from a pynetdicom SCU stores a real CT file: exactly that one is then kept."""
    assert store_with_pynetdicom(node.port, path) == 0x0000
    assert len(node.spool_files()) == 1 and node.instances() == 1


def tls_client_hello() -> bytes:
    """The first flight of a real TLS client (Python's ssl), as it would reach a plain DICOM port."""
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    client = context.wrap_bio(incoming, outgoing, server_hostname="pacsai")
    with pytest.raises(ssl.SSLWantReadError):
        client.do_handshake()
    return outgoing.read()


# --- the tests -----------------------------------------------------------------------------------------------------


@pytest.mark.catalogue("N6")
def test_a_pdu_cut_short_by_a_close_aborts_and_discards_the_partial_instance(node: Node, ct_file: Path) -> None:
    peer = RawPeer(node.port)
    start_store(peer, store_context(peer), ct_file, fragments_sent=20)
    assert peer.nothing_pending(0.3)  # no answer to half a dataset
    peer.send(struct.pack(">BBL", P_DATA_TF, 0, 10) + b"\x00" * 6)  # the header says 10 bytes; 6 follow
    peer.close()
    wait_until(lambda: node.idle() and node.aborted, 10, "the association to be aborted")
    assert node.aborted == ["aborted"]
    nothing_kept(node)
    still_serves(node, ct_file)


@pytest.mark.catalogue("N7")
@pytest.mark.parametrize("when", ["before association", "after association"])
def test_a_valid_pdu_type_with_a_garbage_body_is_aborted(when: str, node: Node, ct_file: Path) -> None:
    peer = RawPeer(node.port)
    garbage = bytes(range(64))  # as an A-ASSOCIATE-RQ: control characters in the AE titles
    if when == "before association":
        peer.send(pdu(A_ASSOCIATE_RQ, garbage))
    else:
        store_context(peer)
        peer.send(pdu(P_DATA_TF, struct.pack(">L", 0x10000) + garbage))  # a PDV item longer than its PDU
    assert read_until_closed(peer) in ([A_ABORT], [])  # A-ABORT (or a bare close), then closed
    wait_until(node.idle, 10, "the aborted association to end")
    nothing_kept(node)
    still_serves(node, ct_file)


@pytest.mark.catalogue("N8")
def test_one_association_over_the_limit_is_rejected_transient_and_running_transfers_complete(
    make_node: Callable[..., Node], ct_file: Path
) -> None:
    # a long quiet period and release grace: the series must not complete (and, with no model, be cleaned) between
    # the stores, also when the third store comes more than the default grace after the first two released
    node = make_node(max_associations="2", pdu_deadline_s=30.0, quiet_period_s="300", release_grace_s="300")
    scu = AE(ae_title="GOOD")
    scu.acse_timeout = scu.dimse_timeout = scu.network_timeout = 10
    scu.add_requested_context(CT_IMAGE_STORAGE, EXPLICIT_LE)
    first = scu.associate("127.0.0.1", node.port, ae_title="PACSAI")
    assert first.is_established
    second = RawPeer(node.port)
    rest = start_store(second, store_context(second), ct_file.with_name("02.dcm"), fragments_sent=40)

    third = scu.associate("127.0.0.1", node.port, ae_title="PACSAI")  # one over the limit of 2
    assert third.is_rejected
    reply = third.acceptor.primitive
    assert reply is not None
    assert (reply.result, reply.result_source, reply.diagnostic) == (2, 3, 2)  # transient, provider (presentation),
    need("echoscu")  # local limit exceeded
    run = subprocess.run(
        ["echoscu", "-aet", "GOOD", "-aec", "PACSAI", "127.0.0.1", str(node.port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode != 0 and "Local Limit Exceeded" in run.stdout + run.stderr

    second.send(*rest)  # the transfer under way completes
    assert int(second.read_command().Status) == 0x0000
    assert int(first.send_c_store(ct_file).Status) == 0x0000  # and so does a new one on an open association
    second.send(A_RELEASE_RQ_PDU)
    assert read_until_closed(second) == [A_RELEASE_RP]
    first.release()
    wait_until(node.idle, 10, "both associations to end")
    assert store_with_pynetdicom(node.port, ct_file.with_name("03.dcm")) == 0x0000  # the slots are free again
    assert len(node.spool_files()) == node.instances() == 3


@pytest.mark.catalogue("N10")
def test_an_abort_halfway_through_a_dataset_keeps_nothing_and_queues_nothing(node: Node, ct_file: Path) -> None:
    peer = RawPeer(node.port)
    rest = start_store(peer, store_context(peer), ct_file, fragments_sent=60)
    assert len(rest) > 10  # well short of the last fragment
    assert peer.nothing_pending(0.5)  # no response to half a dataset
    peer.send(A_ABORT_PDU)
    assert read_until_closed(peer) == []  # closed with no C-STORE-RSP at all
    wait_until(lambda: node.idle() and node.aborted, 10, "the association to be aborted")
    time.sleep(3 * 0.5)  # three assembler ticks past the 0.5 s quiet period: a job would have been made by now
    nothing_kept(node)
    still_serves(node, ct_file)


@pytest.mark.catalogue("N12")
def test_a_release_while_a_c_store_is_outstanding_closes_cleanly(node: Node, ct_file: Path) -> None:
    peer = RawPeer(node.port)
    start_store(peer, store_context(peer), ct_file, fragments_sent=30)
    peer.send(A_RELEASE_RQ_PDU)  # the dataset is not complete
    assert read_until_closed(peer) in ([A_RELEASE_RP], [A_ABORT])
    wait_until(node.idle, 10, "the association to end")
    nothing_kept(node)
    still_serves(node, ct_file)


@pytest.mark.catalogue("N12")
def test_a_release_right_behind_a_c_store_gets_the_answer_then_the_release(node: Node, ct_file: Path) -> None:
    peer = RawPeer(node.port)
    pc_id = store_context(peer)
    sop_uid, dataset = ct_dataset(ct_file)
    peer.send(
        *fragments(pc_id, c_store_rq(CT_IMAGE_STORAGE, sop_uid), command=True),
        *fragments(pc_id, dataset, command=False),
        A_RELEASE_RQ_PDU,
    )  # no wait for the C-STORE-RSP
    kinds = read_until_closed(peer)
    assert kinds in ([P_DATA_TF, A_RELEASE_RP], [A_RELEASE_RP])
    wait_until(node.idle, 10, "the association to end")
    answered = kinds[0] == P_DATA_TF
    assert len(node.spool_files()) == node.instances() == (1 if answered else 0)  # kept exactly when answered


@pytest.mark.catalogue("N12")
def test_a_release_collision_does_not_hang(node: Node, ct_file: Path) -> None:
    """The peer acts as if both sides had asked to release: A-RELEASE-RQ, an unasked A-RELEASE-RP, another RQ."""
    peer = RawPeer(node.port)
    store_context(peer)
    peer.send(A_RELEASE_RQ_PDU, A_RELEASE_RP_PDU, A_RELEASE_RQ_PDU)
    assert read_until_closed(peer) in ([A_RELEASE_RP], [A_RELEASE_RP, A_ABORT], [A_ABORT])
    wait_until(node.idle, 10, "the association to end")
    still_serves(node, ct_file)


@pytest.mark.catalogue("N13")
def test_128_presentation_contexts_of_20_transfer_syntaxes_are_negotiated(node: Node, ct_file: Path) -> None:
    syntaxes = list(ALL_TRANSFER_SYNTAXES)[:20]
    abstract = [VERIFICATION, CT_IMAGE_STORAGE] + [
        str(c.abstract_syntax) for c in AllStoragePresentationContexts if c.abstract_syntax != CT_IMAGE_STORAGE
    ]
    scu = AE(ae_title="GOOD")
    scu.acse_timeout = scu.dimse_timeout = scu.network_timeout = 10
    for uid in abstract[:128]:
        scu.add_requested_context(uid, syntaxes)
    sent: list[int] = []
    assoc = scu.associate(
        "127.0.0.1",
        node.port,
        ae_title="PACSAI",
        evt_handlers=[(evt.EVT_PDU_SENT, lambda event: sent.append(len(event.pdu.encode())))],
    )
    assert assoc.is_established and sent[0] > 64 * 1024  # a single A-ASSOCIATE-RQ of some 70 KB
    assert 0 < len(assoc.accepted_contexts) <= 128
    assert int(assoc.send_c_store(ct_file).Status) == 0x0000
    assoc.release()
    assert store_with_pynetdicom(node.port, ct_file) == 0x0000
    assert len(node.spool_files()) == node.instances() == 1


@pytest.mark.catalogue("N13")
def test_getscu_s_many_storage_contexts_get_a_clean_answer(node: Node, ct_file: Path, tmp_path: Path) -> None:
    """dcmtk getscu proposes a C-GET context and over a hundred storage contexts: we accept storage, refuse C-GET."""
    need("getscu")
    run = subprocess.run(
        [
            "getscu",
            "-d",
            "-aet",
            "GOOD",
            "-aec",
            "PACSAI",
            "127.0.0.1",
            str(node.port),
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            "StudyInstanceUID=1.2.3",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    output = run.stdout + run.stderr
    assert run.returncode != 0 and "Association Accepted" in output
    assert "No adequate Presentation Contexts for sending C-GET" in output
    wait_until(node.idle, 10, "getscu's association to end")
    still_serves(node, ct_file)


@pytest.mark.catalogue("N14")
@pytest.mark.parametrize("greeting", ["HTTP GET", "TLS ClientHello"])
def test_http_and_tls_on_the_dicom_port_are_dropped_at_once(
    greeting: str, make_node: Callable[..., Node], ct_file: Path
) -> None:
    node = make_node(handshake_deadline_s=30.0)  # so that it is not the handshake deadline that closes them
    peer = RawPeer(node.port)
    peer.send(
        b"GET / HTTP/1.1\r\nHost: pacsai\r\nAccept: */*\r\n\r\n" if greeting == "HTTP GET" else tls_client_hello()
    )
    assert read_until_closed(peer, timeout_s=10.0) in ([A_ABORT], [])  # a third of the deadline, loosely
    wait_until(node.idle, 5, "the slot to be free")
    nothing_kept(node)
    still_serves(node, ct_file)


@pytest.mark.catalogue("N15")
def test_a_p_data_on_a_context_that_was_not_negotiated_is_aborted(node: Node, ct_file: Path) -> None:
    peer = RawPeer(node.port)
    store_context(peer)  # context 1 only
    sop_uid, dataset = ct_dataset(ct_file)
    peer.send(*fragments(3, c_store_rq(CT_IMAGE_STORAGE, sop_uid), command=True), *fragments(3, dataset, command=False))
    assert read_until_closed(peer) in ([A_ABORT], [])
    wait_until(node.idle, 10, "the aborted association to end")
    nothing_kept(node)
    still_serves(node, ct_file)


@pytest.mark.catalogue("N15")
@pytest.mark.parametrize(
    ("sop_class", "sop_instance"),
    [
        (CT_IMAGE_STORAGE, ""),  # the dataset's own UIDs, sent without padding: 25 bytes, odd
        (CT_IMAGE_STORAGE, "1.2.3.x../etc"),  # not a UID, odd length
    ],
    ids=["odd-length", "invalid"],
)
def test_a_c_store_command_with_odd_length_or_invalid_uids_fails(
    sop_class: str, sop_instance: str, node: Node, ct_file: Path
) -> None:
    peer = RawPeer(node.port)
    pc_id = store_context(peer)
    sop_uid, dataset = ct_dataset(ct_file)
    command = c_store_rq(sop_class, sop_instance or sop_uid, pad_uids=False)
    peer.send(*fragments(pc_id, command, command=True), *fragments(pc_id, dataset, command=False))
    reply = peer.read_command()
    assert int(reply.Status) == 0xC000 and int(reply.MessageIDBeingRespondedTo) == 1  # cannot understand
    nothing_kept(node)
    # the association is still usable: the same dataset under a well-formed command is stored
    peer.send(
        *fragments(pc_id, c_store_rq(CT_IMAGE_STORAGE, sop_uid, message_id=2), command=True),
        *fragments(pc_id, dataset, command=False),
    )
    assert int(peer.read_command().Status) == 0x0000
    peer.send(A_RELEASE_RQ_PDU)
    assert read_until_closed(peer) == [A_RELEASE_RP]
    assert len(node.spool_files()) == node.instances() == 1
