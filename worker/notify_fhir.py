"""Notices, FHIR: a Report → a DiagnosticReport with its Observations and the ImagingStudy of our results contained,
validated with fhir.resources (pydantic models of FHIR R4B, whose DiagnosticReport, Observation and ImagingStudy
are R4's), POSTed with httpx to {base}/DiagnosticReport as a conditional create on the job's identifier:
200/201 sent, 4xx failed with the OperationOutcome's text (408/429 retried), 5xx and network errors retried."""

from __future__ import annotations

import json
import ssl
from datetime import UTC, datetime
from typing import Any

import httpx
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from pydantic import ValidationError

from pacsai.notices import FhirAuth, FhirTarget
from worker.findings import Coded, Finding, NoticeError, Report

SYSTEMS = {
    "SCT": "http://snomed.info/sct",
    "DCM": "http://dicom.nema.org/resources/ontology/DCM",
    "LN": "http://loinc.org",
    "UCUM": "http://unitsofmeasure.org",
}
JOB_SYSTEM = "urn:pacsai:job"  # DiagnosticReport.identifier: one report per job, the key of the conditional create
PRIORITY_EXTENSION = "urn:pacsai:fhir:StructureDefinition:report-priority"  # valueCode from request-priority
INTERPRETATION = "http://terminology.hl7.org/CodeSystem/v3-ObservationInterpretation"
PRESENT, ABSENT = Coded("52101004", "SCT", "Present"), Coded("2667000", "SCT", "Absent")
RETRIED_STATUSES = (408, 429)
FHIR_JSON = "application/fhir+json"


def build_report(report: Report, target: FhirTarget, *, now: datetime | None = None) -> DiagnosticReport:
    """The DiagnosticReport resource; NoticeError (not retryable) when the model finds it invalid."""
    if not report.patient.patient_id:
        raise NoticeError("the results carry no Patient ID (the subject's identifier)", retryable=False)
    subject: dict[str, Any] = {"identifier": {"value": report.patient.patient_id}}
    if target.patient_system:
        subject["identifier"]["system"] = target.patient_system
    observations = [_observation(f"finding-{i}", f, subject) for i, f in enumerate(report.findings, start=1)]
    resource: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "contained": [_imaging_study(report, subject), *observations],
        "identifier": [{"system": JOB_SYSTEM, "value": report.job_id}],
        "extension": [{"url": PRIORITY_EXTENSION, "valueCode": "stat" if report.urgent else "routine"}],
        "status": "preliminary",  # machine output nobody verified
        "category": [_concept(Coded("RAD", "v2-0074", "Radiology"))],
        "code": _concept(Coded("18748-4", "LN", "Diagnostic imaging study")),
        "subject": subject,
        "issued": (now or datetime.now(UTC)).isoformat(timespec="seconds"),
        "imagingStudy": [{"reference": "#study"}],
        "result": [{"reference": f"#{o['id']}"} for o in observations],
        "conclusion": report.conclusion,
        "conclusionCode": [_concept(f.finding) for f in report.findings if f.present and f.finding is not None],
    }
    if len(report.study_datetime) >= 8:
        resource["effectiveDateTime"] = _date(report.study_datetime)
    if not resource["conclusionCode"]:
        del resource["conclusionCode"]
    try:
        return DiagnosticReport.model_validate(resource)
    except ValidationError as exc:  # locations and messages for the table; pydantic may quote input values
        where = ", ".join(".".join(str(p) for p in error["loc"]) for error in exc.errors()[:5])
        raise NoticeError(f"the DiagnosticReport is invalid at {where}", str(exc), retryable=False) from exc


def post_report(resource: DiagnosticReport, target: FhirTarget, job_id: str) -> str:
    """POST the report; returns 'HTTP <status> <Location>' when the server has it, else NoticeError."""
    headers = {
        "Content-Type": f"{FHIR_JSON}; fhirVersion=4.0",
        "Accept": FHIR_JSON,
        "If-None-Exist": f"identifier={JOB_SYSTEM}|{job_id}",  # a retry after a lost answer makes no second report
    }
    auth: httpx.Auth = httpx.Auth()  # the base class sends requests unchanged
    if target.auth is FhirAuth.BEARER and target.token_file is not None:
        headers["Authorization"] = f"Bearer {_secret(target.token_file)}"
    elif target.auth is FhirAuth.BASIC and target.password_file is not None:
        auth = httpx.BasicAuth(target.username, _secret(target.password_file))
    verify: ssl.SSLContext | bool = ssl.create_default_context(cafile=str(target.ca)) if target.ca else True
    body = resource.model_dump_json(exclude_none=True)
    try:
        with httpx.Client(timeout=target.timeout_s, verify=verify, follow_redirects=False) as client:
            answer = client.post(f"{target.base_url}/DiagnosticReport", content=body, headers=headers, auth=auth)
    except httpx.HTTPError as exc:
        raise NoticeError(f"FHIR server not reached ({type(exc).__name__})", retryable=True) from exc
    if answer.status_code in (200, 201):
        return f"HTTP {answer.status_code} {answer.headers.get('Location', '')}".rstrip()
    detail = f"HTTP {answer.status_code}: {operation_outcome(answer)}"
    retryable = answer.status_code >= 500 or answer.status_code in RETRIED_STATUSES
    raise NoticeError(f"FHIR server answered HTTP {answer.status_code}", detail, retryable=retryable)


def operation_outcome(answer: httpx.Response) -> str:
    """The issues of an OperationOutcome body (severity, code, diagnostics or details), else the body's start."""
    try:
        outcome = json.loads(answer.text)
        issues = outcome.get("issue", []) if outcome.get("resourceType") == "OperationOutcome" else []
    except (ValueError, AttributeError):
        issues = []
    texts = [
        f"{i.get('severity', '')} {i.get('code', '')}: {i.get('diagnostics') or i.get('details', {}).get('text', '')}"
        for i in issues
        if isinstance(i, dict)
    ]
    return "; ".join(texts) if texts else answer.text[:500]


def _secret(path: Any) -> str:
    try:
        return str(open(path, encoding="utf-8").read().strip())  # noqa: SIM115 (one read, closed by GC)
    except OSError as exc:
        raise NoticeError(f"FHIR credentials file unreadable ({type(exc).__name__})", retryable=False) from exc


def _imaging_study(report: Report, subject: dict[str, Any]) -> dict[str, Any]:
    """Our results as an ImagingStudy: the study by its UID (and accession), each result object by series and SOP
    Instance UID, so the EHR can open the SEG/SR in the PACS viewer."""
    identifiers: list[dict[str, Any]] = [{"system": "urn:dicom:uid", "value": f"urn:oid:{report.study_uid}"}]
    if report.accession:
        accession = _concept(Coded("ACSN", "v2-0203", "Accession ID"))
        identifiers.append({"type": accession, "value": report.accession})
    series = [
        {
            "uid": item.series_uid,
            "modality": {"system": SYSTEMS["DCM"], "code": item.modality},
            "instance": [
                {
                    "uid": item.sop_instance_uid,
                    "sopClass": {"system": "urn:ietf:rfc:3986", "code": f"urn:oid:{item.sop_class_uid}"},
                }
            ],
        }
        for item in report.instances
    ]
    study = {"resourceType": "ImagingStudy", "id": "study", "status": "available", "subject": subject}
    return study | {"identifier": identifiers, "series": series}


def _observation(key: str, finding: Finding, subject: dict[str, Any]) -> dict[str, Any]:
    code = _concept(finding.finding) if finding.finding is not None else {}
    observation: dict[str, Any] = {
        "resourceType": "Observation",
        "id": key,
        "status": "preliminary",
        "category": [_concept(Coded("imaging", "observation-category", "Imaging"))],
        "code": code | {"text": finding.name},
        "subject": subject,
        "derivedFrom": [{"reference": "#study"}],
        "component": [
            {
                "code": _concept(m.name) | {"text": m.label},
                "valueQuantity": {
                    "value": m.value,
                    "unit": m.unit.meaning,
                    "system": SYSTEMS["UCUM"],
                    "code": m.unit.value,
                },
            }
            for m in finding.measurements
        ],
    }
    if finding.present is not None:
        observation["valueCodeableConcept"] = _concept(PRESENT if finding.present else ABSENT)
    if finding.note:
        observation["note"] = [{"text": finding.note}]
    if finding.critical:
        observation["interpretation"] = [
            {"coding": [{"system": INTERPRETATION, "code": "AA", "display": "Critical abnormal"}]}
        ]
    if not observation["component"]:
        del observation["component"]
    return observation


def _quantity(value: float, unit: Coded) -> dict[str, Any]:
    return {"value": value, "unit": unit.meaning, "system": SYSTEMS["UCUM"], "code": unit.value}


def _concept(code: Coded) -> dict[str, Any]:
    terminology = "http://terminology.hl7.org/CodeSystem/"
    system = SYSTEMS.get(code.scheme) or (terminology + code.scheme if "-" in code.scheme else None)
    coding = {"code": code.value, "display": code.meaning} | ({"system": system} if system else {})
    return {"coding": [coding], "text": code.meaning}


def _date(dicom: str) -> str:
    return f"{dicom[:4]}-{dicom[4:6]}-{dicom[6:8]}"
