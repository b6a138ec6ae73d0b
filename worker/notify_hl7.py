"""Notices, HL7: a Report → ORU^R01 (v2.5.1), built and validated with hl7apy (STRICT: structure, cardinality,
datatypes), sent over MLLP with python-hl7's asyncio streams; the ACK's MSA-1 decides: AA/CA sent, AR/CR retried
(the receiver is down or busy), AE/CE failed for good (the message itself was refused)."""

from __future__ import annotations

import asyncio
import contextlib
import re
import ssl
from dataclasses import dataclass
from datetime import UTC, datetime

import hl7
from hl7.mllp import open_hl7_connection
from hl7apy.consts import VALIDATION_LEVEL
from hl7apy.core import Group, Message
from hl7apy.exceptions import HL7apyException

from pacsai.notices import Hl7Target
from worker.findings import Coded, Finding, NoticeError, Report, ResultInstance

VERSION = "2.5.1"
IMPRESSION = "19005-8^Impression^LN"  # LOINC: radiology study impression (narrative)
IMAGING_STUDY = "18748-4^Diagnostic imaging study^LN"
STUDY = "113014^Study^DCM"
PRESENT, ABSENT = "52101004^Present^SCT", "2667000^Absent^SCT"
_OBJECTS = {"SEG": "Segmentation", "SR": "SR Document", "OT": "Other", "SC": "Secondary Capture"}
_SEXES = {"M": "M", "F": "F", "O": "O"}
ACCEPTED, RETRIED, REFUSED = ("AA", "CA"), ("AR", "CR"), ("AE", "CE")


@dataclass(frozen=True, slots=True)
class _Row:
    """One OBX: value type, OBX-3 (code^text^system), OBX-4, OBX-5 (ER7, escaped), OBX-8, OBX-6 UCUM code."""

    kind: str
    code: str
    value: str
    sub_id: str = ""
    flag: str = ""
    unit: str = ""


def control_id(report: Report) -> str:
    """MSH-10: one per job, the same on every attempt, so a receiver can drop a duplicate."""
    return f"PACSAI{report.job_id.replace('-', '')[:14]}"


def build_oru(report: Report, target: Hl7Target, *, now: datetime | None = None) -> str:
    """The ORU^R01 in ER7 (segments separated by CR); NoticeError (not retryable) when hl7apy finds it invalid."""
    if not report.patient.patient_id:
        raise NoticeError("the results carry no Patient ID (PID-3 is required)", retryable=False)
    try:
        message = _message(report, target, now or datetime.now(UTC))
        message.validate()
        return str(message.to_er7())
    except HL7apyException as exc:  # its text may quote a value: the type for logs, the text for the table only
        raise NoticeError(f"the ORU^R01 is invalid ({type(exc).__name__})", str(exc), retryable=False) from exc


def _message(report: Report, target: Hl7Target, now: datetime) -> Message:
    message = Message("ORU_R01", version=VERSION, validation_level=VALIDATION_LEVEL.STRICT)
    _header(message, target, control_id(report), now)
    result = message.add_group("ORU_R01_PATIENT_RESULT")
    _patient(result.add_group("ORU_R01_PATIENT"), report)
    order = result.add_group("ORU_R01_ORDER_OBSERVATION")
    _order(order, report)
    rows = [_Row("TX", IMPRESSION, escape(line)) for line in report.conclusion.splitlines()]
    for index, finding in enumerate(report.findings, start=1):
        rows += _finding_rows(finding, str(index))
    rows.append(_Row("RP", STUDY, f"{report.study_uid}^PACSAI^AP^DICOM"))  # links: Study and SOP Instance UIDs
    rows += [_Row("RP", _object(item), f"{item.sop_instance_uid}^PACSAI^AP^DICOM") for item in report.instances]
    for number, row in enumerate(rows, start=1):
        _observation(order.add_group("ORU_R01_OBSERVATION"), number, row, report.issued)
    return message


def escape(text: str) -> str:
    """HL7 escape sequences for the delimiters (hl7apy leaves escape sequences alone)."""
    text = text.replace("\\", "\\E\\")
    for char, code in (("|", "F"), ("^", "S"), ("&", "T"), ("~", "R")):
        text = text.replace(char, f"\\{code}\\")
    return text.replace("\r", " ").replace("\n", " ")


def send_oru(er7: str, target: Hl7Target, expected_id: str) -> str:
    """Send one message over MLLP and read its ACK: the ACK code when accepted, else NoticeError."""
    try:
        ack = asyncio.run(_exchange(er7, target))
    except (OSError, TimeoutError, EOFError, asyncio.IncompleteReadError, ValueError) as exc:
        where = f"{target.host}:{target.port}"
        raise NoticeError(f"HL7 receiver {where} not reached ({type(exc).__name__})", retryable=True) from exc
    return check_ack(ack, expected_id)


def check_ack(ack: hl7.Message, expected_id: str) -> str:
    try:
        msa = ack.segment("MSA")
    except KeyError:
        raise NoticeError("HL7 answer has no MSA segment", retryable=True) from None
    code = str(msa(1))
    text = ack.unescape(str(msa(3))) if len(msa) > 3 else ""
    with contextlib.suppress(KeyError):
        text = " ".join(part for part in (text, ack.unescape(str(ack.segment("ERR")))) if part)
    if str(msa(2)) != expected_id:
        raise NoticeError(f"HL7 ACK {code} answers another message control ID", text, retryable=True)
    if code in ACCEPTED:
        return code
    detail = f"{code}: {text}" if text else code
    raise NoticeError(f"HL7 receiver answered {code}", detail, retryable=code not in REFUSED)


async def _exchange(er7: str, target: Hl7Target) -> hl7.Message:
    context = ssl.create_default_context(cafile=str(target.ca) if target.ca else None) if target.tls else None
    opened = open_hl7_connection(target.host, target.port, encoding="utf-8", ssl=context)
    reader, writer = await asyncio.wait_for(opened, target.timeout_s)
    try:
        writer.writemessage(er7)
        await asyncio.wait_for(writer.drain(), target.timeout_s)
        return await asyncio.wait_for(reader.readmessage(), target.timeout_s)
    finally:
        writer.close()
        with contextlib.suppress(OSError, TimeoutError):
            await asyncio.wait_for(writer.wait_closed(), 1.0)


def _header(message: Message, target: Hl7Target, control: str, now: datetime) -> None:
    message.msh.msh_3 = target.sending_application
    message.msh.msh_4 = target.sending_facility
    message.msh.msh_5 = target.receiving_application
    message.msh.msh_6 = target.receiving_facility
    message.msh.msh_7 = now.strftime("%Y%m%d%H%M%S")
    message.msh.msh_9 = "ORU^R01^ORU_R01"
    message.msh.msh_10 = control
    message.msh.msh_11 = "P"
    message.msh.msh_12 = VERSION
    message.msh.msh_18 = "UNICODE UTF-8"


def _patient(group: Group, report: Report) -> None:
    patient = report.patient
    group.pid.pid_1 = "1"
    issuer = f"&{patient.issuer}&ISO" if re.fullmatch(r"[0-9]+(\.[0-9]+)+", patient.issuer) else escape(patient.issuer)
    group.pid.pid_3 = f"{escape(patient.patient_id)}^^^{issuer}^MR"  # CX-4: a namespace, or an OID as ISO
    family, given, middle, prefix, suffix = ([*patient.name.split("=")[0].split("^"), "", "", "", ""])[:5]
    name = "^".join(escape(part) for part in (family, given, middle, suffix, prefix)).rstrip("^")  # XPN order
    if name:
        group.pid.pid_5 = name
    if patient.birth_date:
        group.pid.pid_7 = patient.birth_date
    if patient.sex in _SEXES:
        group.pid.pid_8 = _SEXES[patient.sex]


def _order(group: Group, report: Report) -> None:
    group.obr.obr_1 = "1"
    group.obr.obr_3 = f"{report.job_id.replace('-', '')[:22]}^PACSAI"
    group.obr.obr_4 = IMAGING_STUDY
    group.obr.obr_5 = "S" if report.urgent else "R"  # priority: STAT when a finding is critical
    if report.study_datetime:
        group.obr.obr_7 = report.study_datetime
    if report.accession:
        group.obr.obr_18 = escape(report.accession)
    group.obr.obr_22 = report.issued
    group.obr.obr_24 = "RAD"
    group.obr.obr_25 = "P"  # preliminary: machine output nobody verified


def _finding_rows(finding: Finding, sub_id: str) -> list[_Row]:
    """A coded finding (CWE Present/Absent) and its measurements (NM), all under OBX-4 = the finding's number;
    OBX-8 'AA' (critical abnormal) on every row of a critical finding."""
    flag = "AA" if finding.critical else ""
    rows = []
    if finding.finding is not None and finding.present is not None:
        rows.append(_Row("CWE", _code(finding.finding), PRESENT if finding.present else ABSENT, sub_id, flag))
    for m in finding.measurements:
        name = _code(Coded(m.name.value, m.name.scheme, f"{finding.name} {m.label}"))
        rows.append(_Row("NM", name, f"{m.value:.6g}", sub_id, flag, escape(m.unit.value)))
    return rows


def _observation(group: Group, number: int, row: _Row, issued: str) -> None:
    obx = group.obx
    obx.obx_1 = str(number)
    obx.obx_2 = row.kind
    obx.obx_3 = row.code
    if row.sub_id:
        obx.obx_4 = row.sub_id
    obx.obx_5 = row.value
    if row.unit:
        obx.obx_6 = f"{row.unit}^{row.unit}^UCUM"
    if row.flag:
        obx.obx_8 = row.flag
    obx.obx_11 = "P"
    obx.obx_14 = issued


def _code(code: Coded) -> str:
    return f"{escape(code.value)}^{escape(code.meaning)}^{escape(code.scheme)}"


def _object(instance: ResultInstance) -> str:
    return f"{instance.modality}^{_OBJECTS.get(instance.modality, instance.modality)}^DCM"
