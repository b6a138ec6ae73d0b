"""A1–A6, A9: who gets in (AE titles, addresses, TLS), what is offered (storage only) and what is audited.

Real peers over loopback: dcmtk (echoscu, storescu, findscu, storescp, with and without TLS) and pynetdicom; a
throwaway CA and certificates made with the openssl CLI for each test module.
"""

from __future__ import annotations

import shutil
import socket
import ssl
import subprocess
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pynetdicom import AE, build_context
from pynetdicom.pdu_primitives import UserIdentityNegotiation

from dicom_node.node import RunningNode, start_node
from dicom_node.read_audit import Entry, read_entries, select, study_key_for
from dicom_node.send import send_files
from pacsai.errors import PeerUnavailable
from pacsai.peers import Peer, PeerTls
from pacsai.settings import Settings
from tests.conftest import need
from tests.services import free_port, port_open, require_binary, spawn, wait_until

pytestmark = [pytest.mark.integration]
CT_SMALL = Path(str(get_testdata_file("CT_small.dcm")))
VERIFICATION = "1.2.840.10008.1.1"
CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"


# --- a throwaway PKI ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    rogue_cert: Path  # a client certificate signed by a CA we do not trust
    rogue_key: Path
    expired_cert: Path  # signed by our CA, expired yesterday
    expired_key: Path
    rogue_ca: Path
    folder: Path

    def issue(self, name: str, *, days: int = 2, ca: str = "ca", san: str = "") -> tuple[Path, Path]:
        return _issue(self.folder, name, days=days, ca=ca, san=san)


def _openssl(folder: Path, *args: str) -> None:
    subprocess.run(["openssl", *args], cwd=folder, check=True, capture_output=True, timeout=60)


def _issue(folder: Path, name: str, *, days: int = 2, ca: str = "ca", san: str = "") -> tuple[Path, Path]:
    _openssl(
        folder,
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        f"{name}.key",
        "-out",
        f"{name}.csr",
        "-subj",
        f"/CN={name}",
    )
    (folder / f"{name}.ext").write_text(f"subjectAltName={san}\n" if san else "basicConstraints=CA:FALSE\n")
    _openssl(
        folder,
        "x509",
        "-req",
        "-in",
        f"{name}.csr",
        "-CA",
        f"{ca}.pem",
        "-CAkey",
        f"{ca}.key",
        "-CAcreateserial",
        "-out",
        f"{name}.pem",
        "-days",
        str(days),
        "-extfile",
        f"{name}.ext",
    )
    return folder / f"{name}.pem", folder / f"{name}.key"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    need("openssl")
    folder = tmp_path_factory.mktemp("pki")
    for ca in ("ca", "rogue-ca"):
        _openssl(
            folder,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-keyout",
            f"{ca}.key",
            "-out",
            f"{ca}.pem",
            "-days",
            "2",
            "-subj",
            f"/CN=pacsai test {ca}",
        )
    server = _issue(folder, "server", san="IP:127.0.0.1,DNS:localhost")
    client = _issue(folder, "client")
    rogue = _issue(folder, "rogue", ca="rogue-ca")
    expired = _issue(folder, "expired", days=-1)
    return Pki(folder / "ca.pem", *server, *client, *rogue, *expired, folder / "rogue-ca.pem", folder)


# --- the node, in this process -------------------------------------------------------------------------------------


@dataclass
class Node:
    running: RunningNode
    settings: Settings

    @property
    def port(self) -> int:
        return self.settings.node.port

    @property
    def tls_port(self) -> int:
        return self.settings.security.tls_port

    def audit(self) -> list[Entry]:
        return list(read_entries(self.settings.audit_path))


@pytest.fixture()
def make_node(tmp_path: Path) -> Iterator[Callable[..., Node]]:
    started: list[Node] = []

    def make(**env: str) -> Node:
        variables = {
            "PACSAI_DATA_DIR": str(tmp_path / f"data{len(started)}"),
            "PACSAI_BIND_HOST": "127.0.0.1",
            "PACSAI_PORT": str(free_port()),
            "PACSAI_TLS_PORT": str(free_port()),
            "PACSAI_LOG_KEY": "test-log-key",
            "PACSAI_PEERS": "STORESCU@127.0.0.1:104",
            "PACSAI_SPOOL_RESERVE_MB": "1",
            **{f"PACSAI_{k.upper()}": v for k, v in env.items()},
        }
        settings = Settings.from_env(variables)
        node = Node(start_node(settings), settings)
        started.append(node)
        return node

    yield make
    for node in started:
        node.running.stop()


def tls_env(pki: Pki, *, mutual: bool = True) -> dict[str, str]:
    env = {"tls_cert": str(pki.server_cert), "tls_key": str(pki.server_key)}
    return env | ({"tls_ca": str(pki.ca)} if mutual else {})


def client_context(
    pki: Pki,
    cert: Path | None = None,
    key: Path | None = None,
    *,
    maximum: ssl.TLSVersion = ssl.TLSVersion.MAXIMUM_SUPPORTED,
) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=pki.ca)
    context.maximum_version = maximum
    if maximum < ssl.TLSVersion.TLSv1_2:
        context.minimum_version = ssl.TLSVersion.TLSv1
        context.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client really offer TLS 1.0/1.1
    if cert is not None and key is not None:
        context.load_cert_chain(cert, key)
    return context


def associate(
    port: int,
    *,
    calling: str = "STORESCU",
    called: str = "PACSAI",
    contexts: tuple[str, ...] = (VERIFICATION,),
    tls: ssl.SSLContext | None = None,
    source: str = "127.0.0.1",
    **kwargs: Any,
) -> Any:
    ae = AE(ae_title=calling)
    ae.acse_timeout = ae.network_timeout = ae.connection_timeout = 10
    for uid in contexts:
        ae.add_requested_context(uid)
    return ae.associate(
        "127.0.0.1",
        port,
        ae_title=called,
        bind_address=(source, 0),
        tls_args=(tls, "localhost") if tls else None,
        **kwargs,
    )


def rejection(assoc: Any) -> tuple[int, int, int]:
    assert assoc.is_rejected, "the association should have been rejected"
    reply = assoc.acceptor.primitive
    return int(reply.result), int(reply.result_source), int(reply.diagnostic)


def echo(assoc: Any) -> int:
    assert assoc.is_established
    try:
        return int(assoc.send_c_echo().Status)
    finally:
        assoc.release()


def alerts(node: Node) -> list[Entry]:
    return [e for e in node.audit() if e.event == "Security Alert"]


# --- A1–A3: AE titles and addresses ------------------------------------------------------------------------------


@pytest.mark.catalogue("A1", "A9")
def test_unknown_calling_ae_is_rejected_with_reason_3_and_audited(make_node: Callable[..., Node]) -> None:
    need("echoscu")
    node = make_node()
    assert rejection(associate(node.port, calling="INTRUDER")) == (1, 1, 3)
    run = subprocess.run(
        ["echoscu", "-aet", "INTRUDER", "-aec", "PACSAI", "127.0.0.1", str(node.port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode != 0 and "Calling AE Title Not Recognized" in run.stdout + run.stderr
    assert echo(associate(node.port)) == 0x0000  # the known peer still gets in
    refused = alerts(node)
    assert len(refused) == 2 and all("INTRUDER (127.0.0.1)" in e.participants[0] for e in refused)
    assert refused[0].event_type == "Node Authentication" and refused[0].outcome == "minor failure"
    assert "calling AE title is not allowed" in refused[0].description


@pytest.mark.catalogue("A2")
def test_wrong_called_ae_is_rejected_with_reason_7(make_node: Callable[..., Node]) -> None:
    need("echoscu")
    node = make_node(ae_titles="PACSAI,PACSAI_CT")
    assert rejection(associate(node.port, called="SOMEONE")) == (1, 1, 7)
    run = subprocess.run(
        ["echoscu", "-aet", "STORESCU", "-aec", "SOMEONE", "127.0.0.1", str(node.port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode != 0 and "Called AE Title Not Recognized" in run.stdout + run.stderr
    assert echo(associate(node.port, called="PACSAI_CT")) == 0x0000  # a second AE title of ours
    assert "called AE title is not ours" in alerts(node)[0].description


@pytest.mark.catalogue("A3")
def test_allowed_ae_from_a_disallowed_address_is_rejected(make_node: Callable[..., Node]) -> None:
    peers_only = make_node()  # PACSAI_PEERS alone: each peer from its own host (127.0.0.1)
    assert echo(associate(peers_only.port, source="127.0.0.1")) == 0x0000
    assert rejection(associate(peers_only.port, source="127.0.0.2")) == (1, 1, 3)
    assert "not allowed from this address" in alerts(peers_only)[0].description
    assert "STORESCU (127.0.0.2)" in alerts(peers_only)[0].participants[0]

    rules = make_node(allowed_callers="STORESCU@10.0.0.0/8|localhost, MODALITY@127.0.0.2, ANYWHERE")
    assert echo(associate(rules.port, source="127.0.0.1")) == 0x0000  # 'localhost' resolves to it
    assert rejection(associate(rules.port, source="127.0.0.2")) == (1, 1, 3)
    assert echo(associate(rules.port, calling="MODALITY", source="127.0.0.2")) == 0x0000
    assert rejection(associate(rules.port, calling="MODALITY", source="127.0.0.1")) == (1, 1, 3)
    assert echo(associate(rules.port, calling="ANYWHERE", source="127.0.0.3")) == 0x0000


def test_allow_any_caller_opens_the_node_but_still_checks_the_called_ae(make_node: Callable[..., Node]) -> None:
    node = make_node(peers="", allow_any_caller="true")
    assert echo(associate(node.port, calling="WHOEVER", source="127.0.0.9")) == 0x0000
    assert rejection(associate(node.port, calling="WHOEVER", called="OTHER")) == (1, 1, 7)


@pytest.mark.catalogue("A5")
def test_credentials_are_no_way_in_for_an_unknown_caller(make_node: Callable[..., Node]) -> None:
    """User Identity negotiation is not an access path: an unknown AE with a username and passcode is refused."""
    node = make_node()
    identity = UserIdentityNegotiation()
    identity.user_identity_type, identity.primary_field, identity.secondary_field = 2, b"admin", b"admin"
    assoc = associate(node.port, calling="INTRUDER", ext_neg=[identity])
    assert rejection(assoc) == (1, 1, 3)


# --- A6: storage only ------------------------------------------------------------------------------------------


@pytest.mark.catalogue("A6")
def test_query_retrieve_and_n_services_are_not_offered(make_node: Callable[..., Node], tmp_path: Path) -> None:
    need("findscu")
    node = make_node()
    probes = {
        "1.2.840.10008.5.1.4.1.2.1.1": "Patient Root Q/R Find",
        "1.2.840.10008.5.1.4.1.2.2.1": "Study Root Find",
        "1.2.840.10008.5.1.4.1.2.2.2": "Study Root Move",
        "1.2.840.10008.5.1.4.1.2.2.3": "Study Root Get",
        "1.2.840.10008.5.1.4.31": "Modality Worklist Find",
        "1.2.840.10008.3.1.2.3.3": "MPPS (N-CREATE/N-SET)",
        "1.2.840.10008.1.20.1": "Storage Commitment (N-ACTION)",
        "1.2.840.10008.5.1.1.9": "Print (N-*)",
        "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
    }
    ae = AE(ae_title="STORESCU")
    ae.requested_contexts = [build_context(uid) for uid in probes]
    assoc = ae.associate("127.0.0.1", node.port, ae_title="PACSAI")
    assert assoc.is_established
    accepted = {str(cx.abstract_syntax) for cx in assoc.accepted_contexts}
    rejected = {str(cx.abstract_syntax): cx.result for cx in assoc.rejected_contexts}
    assoc.release()
    assert accepted == {CT_IMAGE_STORAGE}
    assert rejected == {uid: 0x03 for uid in probes if uid != CT_IMAGE_STORAGE}  # abstract syntax not supported
    run = subprocess.run(
        [
            "findscu",
            "-S",
            "-aet",
            "STORESCU",
            "-aec",
            "PACSAI",
            "-k",
            "QueryRetrieveLevel=STUDY",
            "-k",
            "PatientName=*",
            "127.0.0.1",
            str(node.port),
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode != 0 and "No Acceptable Presentation Contexts" in run.stdout + run.stderr


# --- A4: TLS -----------------------------------------------------------------------------------------------------


@pytest.mark.catalogue("A4")
@pytest.mark.parametrize("receivers", ["1", "2"])  # 2: either process may take each connection, TLS port included
def test_dcmtk_and_pynetdicom_store_over_mutual_tls(
    make_node: Callable[..., Node], pki: Pki, tmp_path: Path, receivers: str
) -> None:
    need("storescu"), need("echoscu")
    node = make_node(**tls_env(pki), receivers=receivers)
    tls = ["+tls", str(pki.client_key), str(pki.client_cert), "+cf", str(pki.ca)]
    subprocess.run(
        ["echoscu", *tls, "-aet", "STORESCU", "-aec", "PACSAI", "127.0.0.1", str(node.tls_port)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    subprocess.run(
        ["storescu", *tls, "-aet", "STORESCU", "-aec", "PACSAI", "127.0.0.1", str(node.tls_port), str(CT_SMALL)],
        check=True,
        capture_output=True,
        timeout=30,
    )
    assoc = associate(
        node.tls_port, contexts=(CT_IMAGE_STORAGE,), tls=client_context(pki, pki.client_cert, pki.client_key)
    )
    assert assoc.is_established and isinstance(assoc.dul.socket.socket, ssl.SSLSocket)
    assert int(assoc.send_c_store(dcmread(CT_SMALL)).Status) == 0x0000
    assoc.release()
    assert len(list(node.settings.storage.spool_dir.rglob("*.dcm"))) == 1  # the same instance, twice
    assert any(e.description == "association accepted over TLS" for e in node.audit())


@pytest.mark.catalogue("A4")
def test_plain_tcp_to_the_tls_port_fails_before_any_dimse(make_node: Callable[..., Node], pki: Pki) -> None:
    need("storescu")
    node = make_node(**tls_env(pki))
    assoc = associate(node.tls_port, contexts=(CT_IMAGE_STORAGE,))
    assert not assoc.is_established
    run = subprocess.run(
        ["storescu", "-aet", "STORESCU", "-aec", "PACSAI", "127.0.0.1", str(node.tls_port), str(CT_SMALL)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode != 0
    wait_until(lambda: len(alerts(node)) >= 2, 10, "two audited TLS failures")
    assert not list(node.settings.storage.spool_dir.rglob("*.dcm"))
    assert all("TLS handshake failed" in e.description for e in alerts(node))


@pytest.mark.catalogue("A4")
@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
def test_tls_1_0_and_1_1_are_refused(make_node: Callable[..., Node], pki: Pki, version: ssl.TLSVersion) -> None:
    node = make_node(**tls_env(pki, mutual=False))
    old = client_context(pki, maximum=version)
    with (
        socket.create_connection(("127.0.0.1", node.tls_port), timeout=10) as raw,
        pytest.raises(ssl.SSLError, match="(?i)protocol.version|unsupported.protocol"),
    ):
        old.wrap_socket(raw, server_hostname="localhost")
    with (
        socket.create_connection(("127.0.0.1", node.tls_port), timeout=10) as raw,
        client_context(pki, maximum=ssl.TLSVersion.TLSv1_2).wrap_socket(raw, server_hostname="localhost") as ok,
    ):
        assert ok.version() == "TLSv1.2"  # the same client speaks 1.2 fine
    wait_until(lambda: alerts(node), 10, "an audited TLS failure")
    assert "UNSUPPORTED_PROTOCOL" in alerts(node)[0].description


@pytest.mark.catalogue("A4")
@pytest.mark.parametrize("client", ["none", "untrusted", "expired"])
def test_mutual_tls_refuses_missing_untrusted_and_expired_client_certificates(
    make_node: Callable[..., Node], pki: Pki, client: str
) -> None:
    need("echoscu")
    node = make_node(**tls_env(pki))
    cert, key = {
        "none": (None, None),
        "untrusted": (pki.rogue_cert, pki.rogue_key),
        "expired": (pki.expired_cert, pki.expired_key),
    }[client]
    assoc = associate(node.tls_port, tls=client_context(pki, cert, key))
    assert not assoc.is_established
    tls = ["+tla"] if cert is None else ["+tls", str(key), str(cert)]
    run = subprocess.run(
        ["echoscu", *tls, "+cf", str(pki.ca), "-aet", "STORESCU", "-aec", "PACSAI", "127.0.0.1", str(node.tls_port)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert run.returncode != 0
    wait_until(lambda: len(alerts(node)) >= 2, 10, "audited TLS failures")
    assert not any(e.event == "User Authentication" for e in node.audit())  # never associated


@pytest.mark.catalogue("A4")
def test_tls_only_closes_the_plain_port_and_renewed_certificates_apply_to_new_connections(
    make_node: Callable[..., Node], pki: Pki
) -> None:
    node = make_node(**tls_env(pki, mutual=False), tls_only="true")
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", node.port)) != 0

    def served_name() -> str:
        with (
            socket.create_connection(("127.0.0.1", node.tls_port), timeout=10) as raw,
            client_context(pki).wrap_socket(raw, server_hostname="localhost") as tls,
        ):
            certificate = tls.getpeercert()
            assert certificate is not None
            subject = dict(item[0] for item in certificate["subject"])  # type: ignore[misc]
            return str(subject["commonName"])

    assert served_name() == "server"
    renewed_cert, renewed_key = pki.issue("renewed", san="IP:127.0.0.1,DNS:localhost")
    live = Path(node.settings.security.tls_cert or ""), Path(node.settings.security.tls_key or "")
    shutil.copy(renewed_key, live[1])
    shutil.copy(renewed_cert, live[0])
    assert served_name() == "renewed"


# --- sending results over TLS ------------------------------------------------------------------------------------


@pytest.mark.catalogue("A4")
def test_results_go_to_a_tls_peer_with_our_client_certificate(pki: Pki, tmp_path: Path) -> None:
    need("storescp")
    storescp_tls = ["+tls", str(pki.server_key), str(pki.server_cert), "+cf", str(pki.ca), "-rc"]
    proc, port, received = _storescp_tls(tmp_path, storescp_tls)
    try:
        trusted = PeerTls(ca=pki.ca, cert=pki.client_cert, key=pki.client_key)
        results = send_files([CT_SMALL], Peer("STORESCP", "127.0.0.1", port, trusted), calling_ae="PACSAI")
        assert [r.code for r in results] == [0x0000]
        assert len([p for p in received.iterdir() if p.is_file()]) == 1
        for wrong in (PeerTls(ca=pki.ca), PeerTls(ca=pki.rogue_ca, cert=pki.client_cert, key=pki.client_key)):
            with pytest.raises(PeerUnavailable):  # no client certificate; server certificate not trusted
                send_files([CT_SMALL], Peer("STORESCP", "127.0.0.1", port, wrong), calling_ae="PACSAI")
        with pytest.raises(PeerUnavailable):  # host name check: the certificate is not for 127.0.0.2
            send_files([CT_SMALL], Peer("STORESCP", "127.0.0.2", port, trusted), calling_ae="PACSAI")
    finally:
        proc.stop()


def _storescp_tls(workdir: Path, tls: list[str]) -> tuple[Any, int, Path]:
    port = free_port()
    received = workdir / "received"
    received.mkdir(parents=True, exist_ok=True)
    proc = spawn(
        "storescp", [require_binary("storescp"), *tls, "-aet", "STORESCP", "-od", str(received), str(port)], workdir
    )
    wait_until(lambda: port_open(port), 20, "storescp over TLS")
    return proc, port, received


# --- A9: what the trail holds ------------------------------------------------------------------------------------


@pytest.mark.catalogue("A9")
@pytest.mark.parametrize("receivers", ["1", "2"])  # 2: a receiver process audits as the node does
def test_instances_are_audited_per_study_and_association_and_the_cli_filters(
    make_node: Callable[..., Node], tmp_path: Path, receivers: str
) -> None:
    syslog = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    syslog.bind(("127.0.0.1", 0))
    syslog.settimeout(10)
    # the series never completes here: its "spool cleaned" audit message would race the counts below
    node = make_node(
        audit_syslog=f"udp://127.0.0.1:{syslog.getsockname()[1]}",
        complete_on_declared_count="false",
        quiet_period_s="300",
        release_grace_s="300",
        receivers=receivers,
    )
    good = dcmread(CT_SMALL)
    bad = dcmread(CT_SMALL)
    del bad.PixelData  # an image without pixels: refused (0xA900)
    bad.SOPInstanceUID = "1.2.3.4.5.6.7.8.9"
    assoc = associate(node.port, contexts=(CT_IMAGE_STORAGE,))
    statuses = [int(assoc.send_c_store(ds).Status) for ds in (good, bad)]
    assoc.release()
    assert statuses == [0x0000, 0xA900]
    study_key = study_key_for(str(good.StudyInstanceUID), b"test-log-key")
    received = wait_until(
        lambda: [e for e in node.audit() if e.event == "DICOM Instances Transferred"], 10, "the audited transfer"
    )
    (transfer,) = received
    assert transfer.study_key == study_key and transfer.outcome == "minor failure"
    assert transfer.description == "1 instance(s) stored, 1 refused"
    assert f'<SOPClass UID="{CT_IMAGE_STORAGE}" NumberOfInstances="1" />' in transfer.xml
    assert transfer.participants[0].startswith("STORESCU (127.0.0.1)")
    assert str(good.StudyInstanceUID) not in "\n".join(e.xml for e in node.audit())
    assert [e.event for e in node.audit()][:2] == ["Application Activity", "User Authentication"]
    assert [e.study_key for e in select(node.audit(), study_key=study_key)] == [study_key]
    message = b""
    while b"DICOM Instances Transferred" not in message:
        message = syslog.recv(65536)
    assert message.startswith(b"<84>1 ") and b" pacsai " in message and b"<AuditMessage>" in message

    env = {
        "PACSAI_DATA_DIR": str(node.settings.storage.data_dir),
        "PACSAI_LOG_KEY": "test-log-key",
        "PACSAI_PEERS": "STORESCU@127.0.0.1:104",
    }
    by_uid = _cli(env, "audit", "--study", str(good.StudyInstanceUID))
    assert by_uid.count("\n") == 1 and f"study={study_key}" in by_uid
    assert _cli(env, "audit", "--since", "2999-01-01") == ""
    assert _cli(env, "audit", "--xml").count("<AuditMessage>") == len(node.audit())
    syslog.close()


def _cli(env: dict[str, str], *args: str) -> str:
    import os
    import sys

    run = subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    return run.stdout


def test_a_refused_association_does_not_block_others(make_node: Callable[..., Node]) -> None:
    """Refusals are answered on the association's own thread: many at once leave the known peer unaffected."""
    node = make_node()
    outcomes: list[bool] = []

    def intrude(source: str) -> None:
        outcomes.append(associate(node.port, calling="X", source=source).is_rejected)

    threads = [threading.Thread(target=intrude, args=(f"127.0.0.{10 + n}",)) for n in range(8)]
    for thread in threads:
        thread.start()
    assert echo(associate(node.port)) == 0x0000
    for thread in threads:
        thread.join(timeout=30)
    assert outcomes == [True] * 8


@pytest.mark.catalogue("A9")
def test_a_series_no_model_takes_is_deleted_and_the_deletion_audited(make_node: Callable[..., Node]) -> None:
    node = make_node(release_grace_s="0.2")
    mr = dcmread(Path(str(get_testdata_file("MR_small.dcm"))))  # no shipped model reads MR
    assoc = associate(node.port, contexts=(str(mr.SOPClassUID),))
    assert int(assoc.send_c_store(mr).Status) == 0x0000
    assoc.release()
    study_key = study_key_for(str(mr.StudyInstanceUID), b"test-log-key")
    (deleted,) = wait_until(
        lambda: [e for e in node.audit() if e.event == "DICOM Study Deleted"], 30, "the audited deletion"
    )
    assert deleted.study_key == study_key and deleted.outcome == "success"
    assert deleted.description.endswith("no model matches: inputs deleted")
    assert not list(node.settings.storage.spool_dir.rglob("*.dcm"))


@pytest.mark.parametrize("sender", ["pynetdicom", "storescu"])
def test_a_released_series_completes_after_the_grace_not_the_quiet_period(
    make_node: Callable[..., Node], sender: str
) -> None:
    """C14 timing rule: the sender's A-RELEASE closes its series after the grace; pynetdicom may report the
    connection's close before the release, which must not turn a release into a wait for the quiet period."""
    node = make_node(release_grace_s="0.2", quiet_period_s="600")
    mr = dcmread(Path(str(get_testdata_file("MR_small.dcm"))))
    if sender == "storescu":
        need("storescu")
        subprocess.run(
            [
                "storescu",
                "-aet",
                "STORESCU",
                "-aec",
                "PACSAI",
                "127.0.0.1",
                str(node.port),
                str(get_testdata_file("MR_small.dcm")),
            ],
            check=True,
            timeout=60,
            capture_output=True,
        )
    else:
        assoc = associate(node.port, contexts=(str(mr.SOPClassUID),))
        assert int(assoc.send_c_store(mr).Status) == 0x0000
        assoc.release()
    wait_until(
        lambda: [e for e in node.audit() if e.event == "DICOM Study Deleted"],
        60,
        "the series to complete on release (no model: deleted)",
    )
