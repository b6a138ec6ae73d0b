"""Audit trail: DICOM audit messages (PS3.15 A.5) for every access, one XML message per line, and optionally syslog.

Studies are named by their study key (the keyed hash that also names them in logs and in the spool), never by a UID
or a patient value, so the trail can leave the hospital network (a central syslog) without carrying patient data;
`pacsai audit --study <Study Instance UID>` hashes the UID with the deployment's key to find a study's events.

Over 300 lines on purpose: one builder per audited event (PS3.15 A.5.3), all sharing one message schema.
"""

from __future__ import annotations

import ipaddress
import logging
import os
import re
import socket
import ssl
import threading
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from enum import IntEnum
from pathlib import Path
from typing import Protocol
from xml.etree.ElementTree import Element, SubElement, tostring

from pacsai.dimse import StoreOutcome
from pacsai.peers import Peer, PeerTls, WebPeer
from pacsai.settings import Settings
from pacsai.state import JobRow

log = logging.getLogger(__name__)
Code = tuple[str, str, str]  # (code value, coding scheme designator, code meaning)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")  # not allowed in XML 1.0 (or a forged line): AE titles come from peers

APPLICATION_ACTIVITY: Code = ("110100", "DCM", "Application Activity")
INSTANCES_TRANSFERRED: Code = ("110104", "DCM", "DICOM Instances Transferred")
STUDY_DELETED: Code = ("110105", "DCM", "DICOM Study Deleted")
EXPORT: Code = ("110106", "DCM", "Export")
SECURITY_ALERT: Code = ("110113", "DCM", "Security Alert")
USER_AUTHENTICATION: Code = ("110114", "DCM", "User Authentication")
APPLICATION_START: Code = ("110120", "DCM", "Application Start")
APPLICATION_STOP: Code = ("110121", "DCM", "Application Stop")
LOGIN: Code = ("110122", "DCM", "Login")
NODE_AUTHENTICATION: Code = ("110126", "DCM", "Node Authentication")
APPLICATION: Code = ("110150", "DCM", "Application")
DESTINATION: Code = ("110152", "DCM", "Destination Role ID")
SOURCE: Code = ("110153", "DCM", "Source Role ID")
STUDY_KEY: Code = ("study-key", "99PACSAI", "Study key (keyed hash of the Study Instance UID)")
OPERATOR_ACTION: Code = ("operator-action", "99PACSAI", "Operator action on a job (retry, rerun, cancel, redeliver)")


class EventOutcome(IntEnum):
    SUCCESS = 0
    MINOR_FAILURE = 4
    SERIOUS_FAILURE = 8


@dataclass(frozen=True, slots=True)
class Participant:
    """An ActiveParticipant: an AE title (or an address when the AE title is not known yet) and where it was."""

    user_id: str
    address: str = ""
    requestor: bool = False
    role: Code | None = None


@dataclass(frozen=True, slots=True)
class AuditEvent:
    event: Code
    action: str  # C create, R read, U update, D delete, E execute
    outcome: EventOutcome
    participants: tuple[Participant, ...]
    event_type: Code | None = None
    description: str = ""  # our words: counts, reasons; never values from a dataset
    study_key: str = ""
    sop_classes: tuple[tuple[str, int], ...] = ()  # (SOP Class UID, number of instances)
    at: datetime = field(default_factory=lambda: datetime.now(UTC))


def _code(parent: Element, tag: str, code: Code) -> None:
    SubElement(parent, tag, {"csd-code": code[0], "codeSystemName": code[1], "originalText": code[2]})


def to_xml(event: AuditEvent, source_id: str) -> str:
    """The event as one line of XML in the DICOM audit message schema (PS3.15 A.5.1)."""
    root = Element("AuditMessage")
    ident = SubElement(
        root,
        "EventIdentification",
        {
            "EventActionCode": event.action,
            "EventDateTime": event.at.isoformat(timespec="milliseconds"),
            "EventOutcomeIndicator": str(int(event.outcome)),
        },
    )
    _code(ident, "EventID", event.event)
    if event.event_type:
        _code(ident, "EventTypeCode", event.event_type)
    if event.description:
        SubElement(ident, "EventOutcomeDescription").text = _CONTROL.sub("?", event.description)
    for who in event.participants:
        attributes = {"UserID": _CONTROL.sub("?", who.user_id), "UserIsRequestor": str(who.requestor).lower()}
        if who.address:
            kind = "2" if _is_ip(who.address) else "1"  # IP address, else machine name
            attributes |= {"NetworkAccessPointID": _CONTROL.sub("?", who.address), "NetworkAccessPointTypeCode": kind}
        participant = SubElement(root, "ActiveParticipant", attributes)
        if who.role:
            _code(participant, "RoleIDCode", who.role)
    source = SubElement(root, "AuditSourceIdentification", {"AuditSourceID": source_id})
    _code(source, "AuditSourceTypeCode", ("4", "DCM", "Application Server"))
    if event.study_key:
        study = SubElement(
            root,
            "ParticipantObjectIdentification",
            {
                "ParticipantObjectID": event.study_key,
                "ParticipantObjectTypeCode": "2",
                "ParticipantObjectTypeCodeRole": "3",
            },
        )
        _code(study, "ParticipantObjectIDTypeCode", STUDY_KEY)
        for uid, count in event.sop_classes:
            SubElement(study, "SOPClass", {"UID": uid, "NumberOfInstances": str(count)})
    return tostring(root, encoding="unicode")


def _is_ip(text: str) -> bool:
    try:
        ipaddress.ip_address(text)
    except ValueError:
        return False
    return True


def _us(settings: Settings, called: str = "", role: Code | None = None, *, requestor: bool = False) -> Participant:
    return Participant(called or settings.node.ae_title, socket.gethostname(), requestor, role)


def application(settings: Settings, *, started: bool) -> AuditEvent:
    return AuditEvent(
        APPLICATION_ACTIVITY,
        "E",
        EventOutcome.SUCCESS,
        (_us(settings, role=APPLICATION),),
        APPLICATION_START if started else APPLICATION_STOP,
        f"pacsai node {os.getpid()}",
    )


def association_accepted(settings: Settings, calling: str, address: str, called: str, *, tls: bool) -> AuditEvent:
    return AuditEvent(
        USER_AUTHENTICATION,
        "E",
        EventOutcome.SUCCESS,
        (Participant(calling, address, True, SOURCE), _us(settings, called, DESTINATION)),
        LOGIN,
        "association accepted" + (" over TLS" if tls else ""),
    )


def access_refused(settings: Settings, calling: str, address: str, called: str, why: str) -> AuditEvent:
    """A refused association or TLS handshake (calling AE unknown, wrong address, no or untrusted certificate)."""
    return AuditEvent(
        SECURITY_ALERT,
        "E",
        EventOutcome.MINOR_FAILURE,
        (Participant(calling or address, address, True), _us(settings, called)),
        NODE_AUTHENTICATION,
        f"refused: {why}",
    )


def instances_received(
    settings: Settings, calling: str, address: str, called: str, study_key: str, stored: Mapping[str, int], refused: int
) -> AuditEvent:
    """One event per study per association: instances stored (by SOP class) and refused."""
    count = sum(stored.values())
    return AuditEvent(
        INSTANCES_TRANSFERRED,
        "C",
        EventOutcome.MINOR_FAILURE if refused else EventOutcome.SUCCESS,
        (Participant(calling, address, True, SOURCE), _us(settings, called, DESTINATION)),
        description=f"{count} instance(s) stored, {refused} refused",
        study_key=study_key,
        sop_classes=tuple(sorted(stored.items())),
    )


class _Sent(Protocol):
    @property
    def outcome(self) -> StoreOutcome: ...


def results_sent(settings: Settings, study_key: str, peer: Peer | WebPeer, results: Sequence[_Sent]) -> AuditEvent:
    ok = sum(1 for r in results if r.outcome in (StoreOutcome.SUCCESS, StoreOutcome.WARNING))
    outcome = EventOutcome.SUCCESS if ok == len(results) else EventOutcome.MINOR_FAILURE
    return AuditEvent(
        INSTANCES_TRANSFERRED,
        "C",
        outcome,
        (_us(settings, role=SOURCE, requestor=True), Participant(peer.ae_title, peer.host, False, DESTINATION)),
        description=f"results: {ok} of {len(results)} file(s) accepted" + (" over TLS" if peer.tls else ""),
        study_key=study_key,
    )


def results_undelivered(
    settings: Settings, study_key: str, peer: Peer | WebPeer, why: str, *, final: bool
) -> AuditEvent:
    """A delivery attempt that failed (peer down, refused, out of resources): retried, or given up when `final`."""
    return AuditEvent(
        INSTANCES_TRANSFERRED,
        "C",
        EventOutcome.SERIOUS_FAILURE if final else EventOutcome.MINOR_FAILURE,
        (_us(settings, role=SOURCE, requestor=True), Participant(peer.ae_title, peer.host, False, DESTINATION)),
        description=f"results not delivered ({'given up' if final else 'will retry'}): {why}",
        study_key=study_key,
    )


def study_deleted(
    settings: Settings, study_key: str, series_key: str, why: str = "retention: inputs and results deleted"
) -> AuditEvent:
    return AuditEvent(
        STUDY_DELETED,
        "D",
        EventOutcome.SUCCESS,
        (_us(settings, requestor=True),),
        description=f"series {series_key[:12]}: {why}",
        study_key=study_key,
    )


def deidentified_copy(settings: Settings, study_key: str, series_key: str, model: str, instances: int) -> AuditEvent:
    """A10: a de-identified copy of a series was made for a model that may run outside the hospital."""
    return AuditEvent(
        EXPORT,
        "R",
        EventOutcome.SUCCESS,
        (_us(settings, role=SOURCE, requestor=True),),
        description=f"de-identified copy (PS3.15 E.1 basic profile) of series {series_key[:12]}, "
        f"{instances} instance(s), for model {model}",
        study_key=study_key,
    )


def operator_action(settings: Settings, operator: str, study_key: str, description: str) -> AuditEvent:
    """An operator retried, re-ran, cancelled or re-delivered a job (pacsai jobs …, or the console)."""
    return AuditEvent(
        APPLICATION_ACTIVITY,
        "U",
        EventOutcome.SUCCESS,
        (Participant(operator, "", True), _us(settings, role=APPLICATION)),
        OPERATOR_ACTION,
        description,
        study_key=study_key,
    )


class AuditTrail:
    """Appends each message as one line (O_APPEND, fsync) and, when configured, sends it to syslog (RFC 5424)."""

    def __init__(self, path: Path, source_id: str, syslog: str = "", syslog_tls: PeerTls | None = None) -> None:
        self.path, self._source_id = path, source_id
        self._syslog = Syslog(syslog, syslog_tls) if syslog else None
        self._lock = threading.Lock()

    def record(self, event: AuditEvent) -> None:
        """Never raises: an audit failure is logged as an error and does not stop the clinical flow."""
        line = to_xml(event, self._source_id)
        try:
            with self._lock:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
                try:
                    os.write(fd, (line + "\n").encode("utf-8"))
                    os.fsync(fd)
                finally:
                    os.close(fd)
        except OSError as exc:
            log.error("ALERT: audit message not written (%s)", type(exc).__name__)
        if self._syslog is not None:
            self._syslog.send(line, failure=event.outcome is not EventOutcome.SUCCESS)


class Syslog:
    """RFC 5424 messages over UDP (RFC 5426), TCP or TLS (RFC 5425, octet-counted); best effort, reconnects."""

    def __init__(self, target: str, tls: PeerTls | None) -> None:
        self._transport, _, address = target.partition("://")
        host, _, port = address.rpartition(":")
        self._address = (host.strip("[]"), int(port))
        self._tls = tls or PeerTls()
        self._sock: socket.socket | None = None
        self._lock = threading.Lock()

    def send(self, message: str, *, failure: bool) -> None:
        priority = 10 * 8 + (4 if failure else 5)  # facility 10 (security/authorization), warning or notice
        stamp = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        header = f"<{priority}>1 {stamp} {socket.gethostname()} pacsai {os.getpid()} IHE+RFC-3881 - "
        payload = header.encode() + b"\xef\xbb\xbf" + message.encode("utf-8")
        with self._lock:
            for _attempt in range(2):
                try:
                    self._send(payload)
                    return
                except OSError as exc:
                    self._close()
                    failed = type(exc).__name__
            log.warning("audit message not sent to syslog %s:%d (%s)", *self._address, failed)

    def _send(self, payload: bytes) -> None:
        if self._transport == "udp":
            with socket.socket(_family(self._address[0]), socket.SOCK_DGRAM) as sock:
                sock.sendto(payload, self._address)
            return
        if self._sock is None:
            sock = socket.create_connection(self._address, timeout=5.0)
            if self._transport == "tls":
                context = ssl.create_default_context(cafile=self._tls.ca)
                if self._tls.cert is not None and self._tls.key is not None:
                    context.load_cert_chain(self._tls.cert, self._tls.key)
                sock = context.wrap_socket(sock, server_hostname=self._address[0])
            self._sock = sock
        self._sock.sendall(f"{len(payload)} ".encode() + payload)

    def _close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _family(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


_trails: dict[tuple[Path, str, str], AuditTrail] = {}


def trail_for(settings: Settings) -> AuditTrail:
    """This process's trail for these settings (made once)."""
    key = (settings.audit_path, settings.security.audit_syslog, settings.node.ae_title)
    if key not in _trails:
        tls = PeerTls(
            ca=settings.security.tls_ca, cert=settings.security.tls_client_cert, key=settings.security.tls_client_key
        )
        _trails[key] = AuditTrail(
            settings.audit_path, f"{settings.node.ae_title}@{socket.gethostname()}", settings.security.audit_syslog, tls
        )
    return _trails[key]


def record_sent(settings: Settings, job: JobRow | None, peer: Peer | WebPeer, results: Sequence[_Sent]) -> None:
    """One line in the delivery task: audit one attempt that reached the peer (nothing to audit without files)."""
    if results:
        trail_for(settings).record(results_sent(settings, job.study_key if job else "", peer, results))


def record_deidentified(settings: Settings, study_key: str, series_key: str, model: str, instances: int) -> None:
    """One line where the node makes a de-identified copy (dicom_node/deidentify.py)."""
    trail_for(settings).record(deidentified_copy(settings, study_key, series_key, model, instances))


def record_deleted(
    settings: Settings, study_key: str, series_key: str, why: str = "retention: inputs and results deleted"
) -> None:
    """One line where series files are deleted: by the cleaner after retention, or at once when no model takes them."""
    trail_for(settings).record(study_deleted(settings, study_key, series_key, why))


def record_undelivered(settings: Settings, job: JobRow | None, peer: Peer | WebPeer, why: str, *, final: bool) -> None:
    """One line in the delivery task: audit a failed attempt (the reason names the peer and status, no patient data)."""
    trail_for(settings).record(results_undelivered(settings, job.study_key if job else "", peer, why, final=final))


def record_operator_action(settings: Settings, operator: str, study_key: str, description: str) -> None:
    """One line in pacsai.job_actions: who did what to which job (our words and ids only)."""
    trail_for(settings).record(operator_action(settings, operator, study_key, description))
