"""Security settings, the access policy and audit messages, without a network; and the shipped configs' secrets."""

from __future__ import annotations

import ipaddress
import json
import re
from pathlib import Path
from xml.etree.ElementTree import fromstring

import pytest
import yaml

from dicom_node.access import AccessPolicy
from dicom_node.read_audit import format_entry, parse_line, select, study_key_for
from pacsai import audit
from pacsai.errors import ConfigError
from pacsai.logs import key_of
from pacsai.peers import Caller, Peer, PeerTls
from pacsai.settings import Settings

REPO = Path(__file__).resolve().parents[2]


def settings_of(tmp_path: Path, **env: str) -> Settings:
    return Settings.from_env({"PACSAI_DATA_DIR": str(tmp_path), **{f"PACSAI_{k.upper()}": v for k, v in env.items()}})


def test_allowed_callers_syntax(tmp_path: Path) -> None:
    settings = settings_of(
        tmp_path, allowed_callers="ORTHANC@10.1.0.0/16|10.2.0.7|pacs.example.org, CT1, ORTHANC@[::1]"
    )
    orthanc, ct1 = settings.caller_policy
    assert orthanc == Caller(
        "ORTHANC",
        (ipaddress.ip_network("10.1.0.0/16"), ipaddress.ip_network("10.2.0.7/32"), ipaddress.ip_network("::1/128")),
        ("pacs.example.org",),
    )
    assert ct1.from_anywhere and settings.callers == ("ORTHANC", "CT1") == settings.security.allowed_callers


def test_peers_alone_allow_each_peer_from_its_own_host(tmp_path: Path) -> None:
    settings = settings_of(tmp_path, peers="ORTHANC@10.0.0.5:4242,B@pacs.local:104+tls")
    assert settings.caller_policy == (
        Caller("ORTHANC", (ipaddress.ip_network("10.0.0.5/32"),)),
        Caller("B", hosts=("pacs.local",)),
    )
    assert settings.delivery.peers[0].tls is None and settings.delivery.peers[1].tls == PeerTls()


def test_tls_peers_get_our_client_certificate(tmp_path: Path) -> None:
    files = {name: tmp_path / f"{name}.pem" for name in ("ca", "cert", "key")}
    for path in files.values():
        path.write_text("x")
    settings = settings_of(
        tmp_path,
        peers="PACS@h:2762+tls,OTHER@h:104",
        tls_ca=str(files["ca"]),
        tls_client_cert=str(files["cert"]),
        tls_client_key=str(files["key"]),
    )
    assert settings.delivery.peer("PACS") == Peer("PACS", "h", 2762, PeerTls(files["ca"], files["cert"], files["key"]))
    assert settings.delivery.peer("OTHER") == Peer("OTHER", "h", 104)


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"allowed_callers": "ORTHANC@"}, "PACSAI_ALLOWED_CALLERS"),
        ({"allowed_callers": "ORTHANC@10.0.0.0/33"}, "PACSAI_ALLOWED_CALLERS"),
        ({"allowed_callers": "ORTHANC@bad_host!"}, "PACSAI_ALLOWED_CALLERS"),
        ({"peers": "A@h:1+ssl"}, "PACSAI_PEERS"),
        ({"tls_cert": "/nonexistent.pem"}, "PACSAI_TLS_CERT"),
        ({"tls_cert": "{f}"}, "PACSAI_TLS_KEY"),
        ({"tls_client_key": "{f}"}, "PACSAI_TLS_CLIENT_CERT"),
        ({"tls_only": "true"}, "PACSAI_TLS_ONLY"),
        ({"tls_cert": "{f}", "tls_key": "{f}", "tls_port": "11112"}, "PACSAI_TLS_PORT"),
        ({"audit_syslog": "http://collector:514"}, "PACSAI_AUDIT_SYSLOG"),
        ({"ae_titles": "A\\B"}, "PACSAI_AE_TITLES"),
    ],
)
def test_wrong_security_values_name_their_variable(tmp_path: Path, env: dict[str, str], named: str) -> None:
    some_file = tmp_path / "some.pem"
    some_file.write_text("x")
    with pytest.raises(ConfigError, match=named):
        settings_of(tmp_path, **{key: value.replace("{f}", str(some_file)) for key, value in env.items()})


def test_secrets_from_files_and_never_in_repr(tmp_path: Path) -> None:
    (tmp_path / "url").write_text("redis://redis:6379/0\n")
    (tmp_path / "password").write_text("s3cr/et pw\n")
    (tmp_path / "db").write_text("postgresql://pacsai:dbpass@db/pacsai")
    (tmp_path / "key").write_text("the-log-key")
    settings = settings_of(
        tmp_path,
        broker_url_file=str(tmp_path / "url"),
        broker_password_file=str(tmp_path / "password"),
        database_url_file=str(tmp_path / "db"),
        log_key_file=str(tmp_path / "key"),
    )
    assert settings.queue.broker_url == "redis://:s3cr%2Fet%20pw@redis:6379/0"
    assert (
        settings.storage.database_url == "postgresql://pacsai:dbpass@db/pacsai" and settings.log_key == b"the-log-key"
    )
    shown = repr(settings)
    assert not any(secret in shown for secret in ("s3cr", "dbpass", "the-log-key", "redis:6379"))
    with pytest.raises(ConfigError, match="PACSAI_BROKER_URL or PACSAI_BROKER_URL_FILE"):
        settings_of(tmp_path, broker_url="redis://x", broker_url_file=str(tmp_path / "url"))
    with pytest.raises(ConfigError, match="PACSAI_LOG_KEY_FILE"):
        settings_of(tmp_path, log_key_file=str(tmp_path / "missing"))


def test_policy_decides_called_calling_and_address(tmp_path: Path) -> None:
    settings = settings_of(tmp_path, ae_titles="PACSAI_CT", allowed_callers="A@10.0.0.0/24|pacs.local,B")
    policy = AccessPolicy(settings, resolve=lambda host: frozenset({"10.9.9.9"} if host == "pacs.local" else ()))
    assert policy.check("A", "PACSAI", "10.0.0.7") is None
    assert policy.check("A", "PACSAI_CT", "::ffff:10.0.0.7") is None  # IPv4-mapped on a dual-stack socket
    assert policy.check("A", "PACSAI", "10.9.9.9") is None  # via the host name
    assert policy.check("B", "PACSAI", "192.168.1.1") is None
    attempts = [
        ("A", "PACSAI", "10.0.1.7"),
        ("C", "PACSAI", "10.0.0.7"),
        ("A", "OTHER", "10.0.0.7"),
        ("A", "PACSAI", "junk"),
    ]
    refused = [policy.check(*attempt) for attempt in attempts]
    assert [(r.result, r.source, r.reason) if r else None for r in refused] == [
        (1, 1, 3),
        (1, 1, 3),
        (1, 1, 7),
        (1, 1, 3),
    ]
    anyone = AccessPolicy(settings_of(tmp_path, allow_any_caller="true"))
    assert anyone.check("WHO", "PACSAI", "1.2.3.4") is None and anyone.check("WHO", "X", "1.2.3.4") is not None


def test_audit_message_follows_the_schema_shape_and_reads_back(tmp_path: Path) -> None:
    settings = settings_of(tmp_path, log_key="k")
    study_key = key_of(b"k", "1.2.3")
    event = audit.instances_received(
        settings, "ORTHANC\x1b[31m", "10.0.0.5", "PACSAI", study_key, {"1.2.840.10008.5.1.4.1.1.2": 20}, 1
    )
    trail = audit.AuditTrail(settings.audit_path, "PACSAI@host")
    trail.record(event)
    trail.record(audit.study_deleted(settings, study_key, "s" * 24))
    lines = settings.audit_path.read_text().splitlines()
    assert len(lines) == 2 and settings.audit_path.stat().st_mode & 0o007 == 0
    root = fromstring(lines[0])
    assert [child.tag for child in root] == [
        "EventIdentification",
        "ActiveParticipant",
        "ActiveParticipant",
        "AuditSourceIdentification",
        "ParticipantObjectIdentification",
    ]
    assert root.find("EventIdentification/EventID").attrib == {  # type: ignore[union-attr]
        "csd-code": "110104",
        "codeSystemName": "DCM",
        "originalText": "DICOM Instances Transferred",
    }
    assert root.find("ActiveParticipant").get("UserID") == "ORTHANC?[31m"  # type: ignore[union-attr]
    entries = [parse_line(line) for line in lines]
    assert [e.event for e in entries if e] == ["DICOM Instances Transferred", "DICOM Study Deleted"]
    assert len(select([e for e in entries if e], study_key=study_key_for("1.2.3", b"k"))) == 2
    assert "1 refused" in format_entry(entries[0])  # type: ignore[arg-type]


def test_shipped_configs_require_authentication() -> None:
    """A8: the broker and the PACS as shipped never run without a password."""
    redis_conf = (REPO / "deploy" / "redis" / "redis.conf").read_text()
    assert re.search(r"^include /etc/redis/pacsai-secret.conf$", redis_conf, re.MULTILINE)  # Redis won't start without
    compose = yaml.safe_load((REPO / "docker" / "compose.yml").read_text())
    assert "requirepass" in " ".join(compose["services"]["redis"]["entrypoint"])
    assert all("REDIS_PASSWORD" not in str(service.get("environment", {})) for service in compose["services"].values())
    orthanc = json.loads((REPO / "deploy" / "orthanc" / "orthanc.json").read_text())
    assert orthanc["AuthenticationEnabled"] is True and orthanc["DicomAlwaysAllowStore"] is False
    assert orthanc["DicomCheckModalityHost"] is True
    env_example = (REPO / "deploy" / "systemd" / "pacsai.env.example").read_text()
    assert "PACSAI_BROKER_PASSWORD_FILE" in env_example and ":CHANGE-ME@" not in env_example


def test_unreadable_tls_files_stop_the_node_naming_the_variables(tmp_path: Path) -> None:
    from dicom_node.tls import ReloadingContext

    junk = tmp_path / "junk.pem"
    junk.write_text("not a certificate")
    with pytest.raises(ConfigError, match="PACSAI_TLS_CERT"):
        ReloadingContext(settings_of(tmp_path, tls_cert=str(junk), tls_key=str(junk)))


class _Recorder:
    """Stands in for pynetdicom's association in an EVT_REQUESTED event: records what the gatekeeper does to it."""

    def __init__(self) -> None:
        self.rejects: list[tuple[int, int, int]] = []
        self.is_rejected = self.killed = False
        self.requestor = type(
            "Requestor",
            (),
            {
                "address": "10.0.0.5",
                "ae_title": "ORTHANC",
                "primitive": type("Rq", (), {"calling_ae_title": "ORTHANC", "called_ae_title": "PACSAI"})(),
            },
        )()
        self.acse = type("Acse", (), {"send_reject": lambda _, *rsd: self.rejects.append(rsd)})()

    def kill(self) -> None:
        self.killed = True


def test_a_failing_access_check_refuses(tmp_path: Path) -> None:
    """Fail closed: if the policy itself breaks, the association is refused (1/1/1) and audited."""
    from dicom_node.access import Gatekeeper

    class BrokenPolicy(AccessPolicy):
        def check(self, calling_ae: str, called_ae: str, address: str) -> None:
            raise RuntimeError("resolver exploded")

    settings = settings_of(tmp_path, peers="ORTHANC@10.0.0.5:4242")
    trail = audit.AuditTrail(settings.audit_path, "PACSAI@host")
    assoc = _Recorder()
    Gatekeeper(settings, BrokenPolicy(settings), trail).requested(type("Event", (), {"assoc": assoc})())
    assert assoc.rejects == [(1, 1, 1)] and assoc.is_rejected and assoc.killed
    assert "access check failed" in settings.audit_path.read_text()
