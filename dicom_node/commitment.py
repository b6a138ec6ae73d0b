"""Proof of delivery, DIMSE side: Storage Commitment Push Model as SCU (N-ACTION, then the peer's N-EVENT-REPORT on
the same association or a new one to our SCP) and C-FIND (Study Root, IMAGE level) for our result instances.

The node's SCP accepts the Storage Commitment Push Model with the peer in the SCP role (SCP/SCU role selection), so
a PACS such as Orthanc can open a new association to send its report; `report_handler` answers it.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import groupby
from typing import Any

from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid
from pynetdicom import AE, evt
from pynetdicom.association import Association

from dicom_node.send import association_failure
from dicom_node.tcp import set_nodelay
from dicom_node.tls import tls_args
from pacsai.commitment_table import ResultInstance
from pacsai.errors import PeerRefused, PeerUnavailable
from pacsai.settings import Peer

log = logging.getLogger(__name__)
Handler = tuple[evt.EventType, Callable[..., Any]]
COMMITMENT = "1.2.840.10008.1.20.1"  # Storage Commitment Push Model SOP Class
COMMITMENT_INSTANCE = "1.2.840.10008.1.20.1.1"  # its well-known SOP Instance
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"  # Study Root Query/Retrieve Information Model - FIND
VERIFICATION = "1.2.840.10008.1.1"
REQUEST_STORAGE_COMMITMENT = 1  # N-ACTION Action Type ID (PS3.4 J.3.2)
ALL_COMMITTED, SOME_FAILED = 1, 2  # N-EVENT-REPORT Event Type IDs (PS3.4 J.3.3)
SYNTAXES = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]
NO_SUCH_EVENT_TYPE, INVALID_ARGUMENT = 0x0113, 0x0115  # N-EVENT-REPORT answers to a report we cannot use
UNSUPPORTED_CODES = frozenset({0x0118, 0x0122, 0x0123, 0x0211})  # no such SOP class / action: never will
FAILURE_REASONS = {  # Failure Reason (0008,1197), PS3.3 C.14.1.1
    0x0110: "processing failure",
    0x0112: "no such object instance",
    0x0119: "class/instance conflict",
    0x0122: "referenced SOP class not supported",
    0x0131: "duplicate transaction UID",
    0x0213: "resource limitation",
}


class Unsupported(PeerRefused):
    """The peer does not offer the service (Storage Commitment or C-FIND): asking again cannot help."""


@dataclass(frozen=True, slots=True)
class Report:
    """A storage commitment result: the transaction, instances committed, instances failed with the reason."""

    transaction_uid: str
    committed: tuple[str, ...]
    failed: tuple[tuple[str, str], ...]  # (SOP Instance UID, reason in our words with its code)


def new_transaction_uid() -> str:
    return str(generate_uid())


def support_reports(ae: AE) -> None:
    """Our SCP takes N-EVENT-REPORTs: a peer proposing the SCP role for storage commitment is accepted in it."""
    ae.add_supported_context(COMMITMENT, SYNTAXES, scu_role=False, scp_role=True)


def handlers(record: Callable[[Report, str], bool]) -> list[Handler]:
    """The SCP's handlers: the report itself, and the negotiation check that keeps the SOP class report-only."""
    return [(evt.EVT_N_EVENT_REPORT, report_handler(record)), (evt.EVT_REQUESTED, reports_only)]


def reports_only(event: evt.Event) -> None:
    """EVT_REQUESTED (before negotiation): the Storage Commitment context is kept only for a peer proposing the SCP
    role, to send its report; proposed in the default roles (asking us to commit) it is refused like any N-service."""
    if event.assoc.is_rejected:  # refused by the access policy (an earlier EVT_REQUESTED handler): no negotiation
        return
    role = event.assoc.requestor.role_selection.get(UID(COMMITMENT))
    if role is None or not role.scp_role:
        acceptor = event.assoc.acceptor
        acceptor.supported_contexts = [cx for cx in acceptor.supported_contexts if cx.abstract_syntax != COMMITMENT]


def parse_report(event_type: int, info: Dataset | None) -> Report:
    """The Event Information of a storage commitment N-EVENT-REPORT; ValueError names what is wrong."""
    if event_type not in (ALL_COMMITTED, SOME_FAILED):
        raise ValueError(f"event type {event_type} is not a storage commitment result")
    if info is None or not str(info.get("TransactionUID", "") or ""):
        raise ValueError("no Transaction UID in the event information")
    committed = tuple(str(item.ReferencedSOPInstanceUID) for item in info.get("ReferencedSOPSequence", []))
    failed = tuple(
        (str(item.ReferencedSOPInstanceUID), describe_failure(int(item.get("FailureReason", 0x0110) or 0x0110)))
        for item in info.get("FailedSOPSequence", [])
    )
    return Report(str(info.TransactionUID), committed, failed)


def describe_failure(code: int) -> str:
    return f"0x{code:04X} {FAILURE_REASONS.get(code, 'failure')}"


def report_handler(record: Callable[[Report, str], bool]) -> Callable[[evt.Event], tuple[int, Dataset | None]]:
    """EVT_N_EVENT_REPORT: parse the report and `record(report, calling AE)` (False: no open request of that peer
    has the Transaction UID); the answer's status says what was wrong with a report we cannot use."""

    def on_report(event: evt.Event) -> tuple[int, Dataset | None]:
        assoc = event.assoc  # the reporting peer: the acceptor when the report comes on our own association
        calling = str(assoc.acceptor.ae_title if assoc.is_requestor else assoc.requestor.ae_title)
        try:
            report = parse_report(int(event.event_type or 0), event.event_information)
        except ValueError as exc:
            log.warning("storage commitment report from %s refused: %s", calling, exc)
            return (NO_SUCH_EVENT_TYPE if "event type" in str(exc) else INVALID_ARGUMENT), None
        except Exception as exc:  # undecodable event information: pydicom's text may quote values
            log.warning("storage commitment report from %s refused: unreadable (%s)", calling, type(exc).__name__)
            return INVALID_ARGUMENT, None
        if not record(report, calling):
            log.warning(
                "storage commitment report from %s for a transaction it was not asked (or asked again)", calling
            )
            return INVALID_ARGUMENT, None
        log.info(
            "storage commitment report from %s: %d committed, %d failed",
            calling,
            len(report.committed),
            len(report.failed),
        )
        return 0x0000, None

    return on_report


def commitment_request(transaction_uid: str, instances: Sequence[ResultInstance]) -> Dataset:
    """The N-ACTION's Action Information: the Transaction UID and the instances to commit."""
    ds = Dataset()
    ds.TransactionUID = transaction_uid
    ds.ReferencedSOPSequence = []
    for instance in instances:
        item = Dataset()
        item.ReferencedSOPClassUID = instance.sop_class_uid
        item.ReferencedSOPInstanceUID = instance.sop_instance_uid
        ds.ReferencedSOPSequence.append(item)
    return ds


def request_commitment(
    peer: Peer,
    transaction_uid: str,
    instances: Sequence[ResultInstance],
    on_report: Callable[[Report, str], bool],
    *,
    calling_ae: str,
    timeout_s: float,
    wait_report_s: float,
) -> None:
    """N-ACTION Request Storage Commitment; then wait up to `wait_report_s` for the report on this association (a
    peer may send it on a new one later: the node's SCP takes it). Unsupported when the peer refuses the SOP class,
    PeerUnavailable when it cannot be reached or answers with a failure."""
    reported = threading.Event()
    handle = report_handler(on_report)

    def same_association(event: evt.Event) -> tuple[int, Dataset | None]:
        answer = handle(event)
        reported.set()
        return answer

    assoc = _associate(peer, calling_ae, COMMITMENT, timeout_s, [(evt.EVT_N_EVENT_REPORT, same_association)])
    try:
        what = "Storage Commitment Push Model"
        _require(assoc, COMMITMENT, peer, what)
        status, _ = assoc.send_n_action(
            commitment_request(transaction_uid, instances), REQUEST_STORAGE_COMMITMENT, COMMITMENT, COMMITMENT_INSTANCE
        )
        if "Status" not in status:
            raise PeerUnavailable(f"no N-ACTION reply from {peer.ae_title}")
        code = int(status.Status)
        if code in UNSUPPORTED_CODES:
            raise Unsupported(f"{peer.ae_title} does not support {what} (N-ACTION answered 0x{code:04X})")
        if code != 0x0000:
            raise PeerUnavailable(f"{peer.ae_title} answered the storage commitment request with 0x{code:04X}")
        log.info("storage commitment of %d instance(s) requested from %s", len(instances), peer.ae_title)
        reported.wait(wait_report_s)
    finally:
        if assoc.is_established:
            assoc.release()


def find_instances(peer: Peer, instances: Sequence[ResultInstance], *, calling_ae: str, timeout_s: float) -> set[str]:
    """C-FIND (Study Root, IMAGE level) per result series: the SOP Instance UIDs of ours the peer has."""
    assoc = _associate(peer, calling_ae, STUDY_ROOT_FIND, timeout_s, [])
    found: set[str] = set()
    try:
        _require(assoc, STUDY_ROOT_FIND, peer, "C-FIND (Study Root)")
        by_series = groupby(
            sorted(instances, key=lambda i: (i.study_uid, i.series_uid)), lambda i: (i.study_uid, i.series_uid)
        )
        for (study_uid, series_uid), _ in by_series:
            found |= _find_series(assoc, peer, study_uid, series_uid)
    finally:
        if assoc.is_established:
            assoc.release()
    return found & {i.sop_instance_uid for i in instances}


def _find_series(assoc: Association, peer: Peer, study_uid: str, series_uid: str) -> set[str]:
    query = Dataset()
    query.QueryRetrieveLevel = "IMAGE"
    query.StudyInstanceUID = study_uid
    query.SeriesInstanceUID = series_uid
    query.SOPInstanceUID = ""
    found = set()
    for status, identifier in assoc.send_c_find(query, STUDY_ROOT_FIND):
        if "Status" not in status:
            why = " (association aborted: is our AE title known to it?)" if assoc.is_aborted else ""
            raise PeerUnavailable(f"no C-FIND reply from {peer.ae_title}{why}")
        code = int(status.Status)
        if code in (0xFF00, 0xFF01) and identifier is not None:
            found.add(str(identifier.get("SOPInstanceUID", "")))
        elif code != 0x0000:
            raise PeerUnavailable(f"{peer.ae_title} answered C-FIND with 0x{code:04X}")
    return found


def _associate(
    peer: Peer,
    calling_ae: str,
    sop_class: str,
    timeout_s: float,
    handlers: list[Handler],
) -> Association:
    """An association proposing `sop_class` and Verification (so a peer without the service still accepts one and
    its refusal of the context says so clearly)."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = min(timeout_s, 15.0)
    ae.add_requested_context(sop_class, SYNTAXES)
    ae.add_requested_context(VERIFICATION, SYNTAXES)
    try:
        tls = tls_args(peer.host, peer.tls)
    except (OSError, ValueError) as exc:
        raise PeerUnavailable(f"TLS for {peer.ae_title} cannot be set up ({type(exc).__name__})") from exc
    assoc = ae.associate(
        peer.host,
        peer.port,
        ae_title=peer.ae_title,
        evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay), *handlers],
        tls_args=tls,
    )
    if not assoc.is_established:
        raise association_failure(assoc, peer, tls=bool(tls))
    return assoc


def _require(assoc: Association, sop_class: str, peer: Peer, what: str) -> None:
    if not any(cx.abstract_syntax == sop_class for cx in assoc.accepted_contexts):
        raise Unsupported(f"{peer.ae_title} does not support {what} (presentation context refused)")
