"""Notices to the RIS/EHR, per destination profile (key `notify`): where an HL7 ORU^R01 and/or a FHIR
DiagnosticReport go, how they are retried, and which findings are critical (flagged urgent).

Secrets are never in the profiles file: a bearer token or a basic-auth password is read from a file at send time.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit


class FhirAuth(Enum):
    NONE = "none"
    BEARER = "bearer"
    BASIC = "basic"


@dataclass(frozen=True, slots=True)
class Hl7Target:
    """An MLLP receiver of ORU^R01 messages (HL7 v2.5.1), with MSH-3..6 and TLS when `tls` (CAs: `ca` or system)."""

    host: str
    port: int
    sending_application: str = "PACSAI"
    sending_facility: str = ""
    receiving_application: str = ""
    receiving_facility: str = ""
    timeout_s: float = 10.0
    tls: bool = False
    ca: Path | None = None


@dataclass(frozen=True, slots=True)
class FhirTarget:
    """A FHIR R4 server; DiagnosticReports are POSTed to `{base_url}/DiagnosticReport`."""

    base_url: str
    auth: FhirAuth = FhirAuth.NONE
    token_file: Path | None = None  # bearer
    username: str = ""  # basic
    password_file: Path | None = None  # basic
    ca: Path | None = None  # trusted CAs for https (None: the system's)
    timeout_s: float = 10.0
    patient_system: str = ""  # Identifier.system of the Patient ID (e.g. the hospital's MRN namespace URI)


@dataclass(frozen=True, slots=True)
class CriticalRule:
    """A finding (code value or tracking name) that is critical when Present, or when `measurement` (its concept
    meaning, e.g. Probability, Volume) is at least `at_least`."""

    finding: str
    measurement: str = ""
    at_least: float | None = None


@dataclass(frozen=True, slots=True)
class Notices:
    hl7: Hl7Target | None = None
    fhir: FhirTarget | None = None
    critical: tuple[CriticalRule, ...] = ()
    max_attempts: int = 5
    backoff_s: float = 5.0  # doubled each attempt, at most 300 s


_TOP = ("hl7", "fhir", "critical", "max_attempts", "backoff_s")
_HL7 = (
    "host",
    "port",
    "sending_application",
    "sending_facility",
    "receiving_application",
    "receiving_facility",
    "timeout_s",
    "tls",
    "ca",
)
_FHIR = ("url", "auth", "token_file", "username", "password_file", "ca", "timeout_s", "patient_system")


def parse_notices(raw: Any, where: str) -> Notices:
    """The `notify` block of a profile; ValueError names the wrong key."""
    block = _mapping(raw, _TOP, f"{where}: notify")
    notices = Notices(
        hl7=None if block.get("hl7") is None else _hl7(block["hl7"], f"{where}: notify.hl7"),
        fhir=None if block.get("fhir") is None else _fhir(block["fhir"], f"{where}: notify.fhir"),
        critical=tuple(_rule(item, f"{where}: notify.critical") for item in block.get("critical") or ()),
        max_attempts=int(block.get("max_attempts", 5)),
        backoff_s=float(block.get("backoff_s", 5.0)),
    )
    if notices.hl7 is None and notices.fhir is None:
        raise ValueError(f"{where}: notify names neither hl7 nor fhir")
    if notices.max_attempts < 1 or notices.backoff_s < 0:
        raise ValueError(f"{where}: notify.max_attempts must be >= 1 and backoff_s >= 0")
    return notices


def _mapping(raw: Any, keys: tuple[str, ...], where: str) -> Mapping[str, Any]:
    if not isinstance(raw, Mapping):
        raise ValueError(f"{where}: expected a mapping of {', '.join(keys)}")
    unknown = sorted(str(key) for key in raw if key not in keys)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {', '.join(keys)}")
    return raw


def _hl7(raw: Any, where: str) -> Hl7Target:
    block = _mapping(raw, _HL7, where)
    if "host" not in block or "port" not in block:
        raise ValueError(f"{where}: host and port are required")
    port = int(block["port"])
    if not 0 < port < 65536:
        raise ValueError(f"{where}: port {port} is out of range")
    texts = {key: _hd(block[key], f"{where}: {key}") for key in _HL7[2:6] if key in block}
    return Hl7Target(
        host=str(block["host"]),
        port=port,
        timeout_s=_positive(block.get("timeout_s", 10.0), f"{where}: timeout_s"),
        tls=bool(block.get("tls", False)) or "ca" in block,
        ca=_path(block.get("ca")),
        **texts,
    )


def _fhir(raw: Any, where: str) -> FhirTarget:
    block = _mapping(raw, _FHIR, where)
    url = str(block.get("url", "")).rstrip("/")
    if urlsplit(url).scheme not in ("http", "https") or not urlsplit(url).netloc:
        raise ValueError(f"{where}: url must be an http(s) FHIR base URL")
    try:
        auth = FhirAuth(str(block.get("auth", "none")).lower())
    except ValueError:
        raise ValueError(f"{where}: auth must be none, bearer or basic") from None
    target = FhirTarget(
        base_url=url,
        auth=auth,
        token_file=_path(block.get("token_file")),
        username=str(block.get("username", "")),
        password_file=_path(block.get("password_file")),
        ca=_path(block.get("ca")),
        timeout_s=_positive(block.get("timeout_s", 10.0), f"{where}: timeout_s"),
        patient_system=str(block.get("patient_system", "")),
    )
    if auth is FhirAuth.BEARER and target.token_file is None:
        raise ValueError(f"{where}: auth bearer needs token_file")
    if auth is FhirAuth.BASIC and (not target.username or target.password_file is None):
        raise ValueError(f"{where}: auth basic needs username and password_file")
    return target


def _rule(raw: Any, where: str) -> CriticalRule:
    block = _mapping(raw, ("finding", "measurement", "at_least"), where)
    if not str(block.get("finding", "")).strip():
        raise ValueError(f"{where}: each rule names a finding (code value or name)")
    at_least = block.get("at_least")
    return CriticalRule(
        finding=str(block["finding"]).strip(),
        measurement=str(block.get("measurement", "Probability" if at_least is not None else "")).strip(),
        at_least=None if at_least is None else float(at_least),
    )


def _hd(value: Any, where: str) -> str:
    text = str(value)
    if any(c in text for c in "|^~\\&\r\n") or len(text) > 180:
        raise ValueError(f"{where}: HL7 delimiters or over 180 characters")
    return text


def _positive(value: Any, where: str) -> float:
    number = float(value)
    if number <= 0:
        raise ValueError(f"{where} must be positive")
    return number


def _path(value: Any) -> Path | None:
    return None if value is None else Path(str(value)).expanduser()
