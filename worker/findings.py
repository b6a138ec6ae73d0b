"""Notices, step 1: the delivered results (our TID 1500 SR, the SEG/SC headers) → one Report value that the HL7 and
FHIR builders both render; critical findings are marked by the profile's rules. Pure: datasets in, values out."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace

from pydicom.dataset import Dataset

from pacsai.errors import WorkerError
from pacsai.notices import CriticalRule

MEASUREMENT_GROUP, TRACKING_ID, FINDING = "125007", "112039", "121071"
ALGORITHM_NAME, ALGORITHM_VERSION, DERIVATION = "111001", "111003", "121401"
PRESENT, ABSENT = {"52101004", "121053"}, {"2667000", "121054"}  # SCT and DCM codes of Present / Absent
_SKIPPED = {TRACKING_ID, FINDING, ALGORITHM_NAME, ALGORITHM_VERSION, "112040", "276214006"}


class NoticeError(WorkerError):
    """A notice not sent: the message is for logs (codes, no patient data); `detail` (the receiver's own words,
    which may quote patient data) goes to the notices table only."""

    def __init__(self, message: str, detail: str = "", *, retryable: bool) -> None:
        super().__init__(message)
        self.detail = detail or message
        self.retryable = retryable


@dataclass(frozen=True, slots=True)
class Coded:
    value: str
    scheme: str  # DICOM coding scheme designator: SCT, DCM, LN, UCUM, ...
    meaning: str


@dataclass(frozen=True, slots=True)
class Measurement:
    name: Coded
    value: float
    unit: Coded
    derivation: str = ""  # e.g. Mean, Standard Deviation (the NUM's Derivation modifier)

    @property
    def label(self) -> str:
        return f"{self.name.meaning} ({self.derivation})" if self.derivation else self.name.meaning


@dataclass(frozen=True, slots=True)
class Finding:
    """One measurement group: what was looked for, whether it is there, its numbers, and whether it is critical."""

    name: str  # the group's tracking identifier (label name or finding meaning)
    finding: Coded | None
    present: bool | None  # the qualitative evaluation; for a segmented structure: volume > 0
    measurements: tuple[Measurement, ...]
    critical: bool = False
    note: str = ""  # a TEXT item of the group, e.g. why the model did not evaluate the series


@dataclass(frozen=True, slots=True)
class ResultInstance:
    """A result object the destination now holds (SEG, SR, SC), for links from the notice."""

    modality: str
    sop_class_uid: str
    sop_instance_uid: str
    series_uid: str


@dataclass(frozen=True, slots=True)
class Patient:
    patient_id: str
    issuer: str
    name: str  # DICOM PN text, family^given^middle^prefix^suffix (HL7 XPN has the same first components)
    birth_date: str  # YYYYMMDD or ""
    sex: str  # M, F, O or ""


@dataclass(frozen=True, slots=True)
class Report:
    job_id: str
    patient: Patient
    study_uid: str
    accession: str
    study_datetime: str  # YYYYMMDD[HHMMSS] or ""
    issued: str  # the SR's content date and time, YYYYMMDDHHMMSS
    model: str
    model_version: str
    findings: tuple[Finding, ...]
    instances: tuple[ResultInstance, ...]

    @property
    def urgent(self) -> bool:
        return any(finding.critical for finding in self.findings)

    @property
    def conclusion(self) -> str:
        """One line per finding, for HL7 OBX TX and FHIR DiagnosticReport.conclusion (no patient data)."""
        head = f"AI result by {self.model} {self.model_version}, preliminary (not verified by a physician)."
        lines = [head, *(_sentence(f) for f in self.findings)]
        if not self.findings:
            lines.append("No findings were reported (the model did not evaluate the series or found nothing).")
        return "\n".join(lines)


def read_report(job_id: str, sr: Dataset, others: Sequence[Dataset], rules: Sequence[CriticalRule]) -> Report:
    """The Report of a job from its SR and its other delivered results (headers suffice)."""
    groups = list(_groups(sr))
    algorithm = {code: text for group in groups[:1] for code, text in _texts(group)}
    findings = tuple(_critical(_finding(group), rules) for group in groups)
    patient = Patient(
        patient_id=str(sr.get("PatientID", "")),
        issuer=str(sr.get("IssuerOfPatientID", "")),
        name=str(sr.get("PatientName", "")),
        birth_date=str(sr.get("PatientBirthDate", "")),
        sex=str(sr.get("PatientSex", "")),
    )
    return Report(
        job_id=job_id,
        patient=patient,
        study_uid=str(sr.StudyInstanceUID),
        accession=str(sr.get("AccessionNumber", "")),
        study_datetime=(str(sr.get("StudyDate", "")) + str(sr.get("StudyTime", "")).split(".")[0])[:14],
        issued=(str(sr.get("ContentDate", "")) + str(sr.get("ContentTime", "")).split(".")[0])[:14],
        model=algorithm.get(ALGORITHM_NAME, str(sr.get("ManufacturerModelName", ""))),
        model_version=algorithm.get(ALGORITHM_VERSION, ""),
        findings=findings,
        instances=tuple(_instance(ds) for ds in (sr, *others)),
    )


def _groups(sr: Dataset) -> Iterator[Dataset]:
    """Every Measurement Group container in the SR's content tree, in document order."""
    for item in sr.get("ContentSequence", []):
        if _concept(item) == MEASUREMENT_GROUP and item.get("ValueType") == "CONTAINER":
            yield item
        elif item.get("ValueType") == "CONTAINER":
            yield from _groups(item)


def _concept(item: Dataset) -> str:
    names = item.get("ConceptNameCodeSequence")
    return str(names[0].CodeValue) if names else ""


def _coded(code: Dataset) -> Coded:
    value = code.get("CodeValue") or code.get("LongCodeValue") or code.get("URNCodeValue") or ""
    return Coded(str(value), str(code.get("CodingSchemeDesignator", "")), str(code.get("CodeMeaning", "")))


def _texts(group: Dataset) -> Iterator[tuple[str, str]]:
    """TEXT items of a group and of its NUMs' modifiers (algorithm name and version live there)."""
    for item in group.get("ContentSequence", []):
        if item.get("ValueType") == "TEXT":
            yield _concept(item), str(item.TextValue)
        yield from _texts(item)


def _modifiers(item: Dataset, concept: str) -> Iterator[Dataset]:
    return (m for m in item.get("ContentSequence", []) if _concept(m) == concept and m.get("ValueType") == "CODE")


def _finding(group: Dataset) -> Finding:
    name, finding, present, measurements, notes = "", None, None, [], []
    for item in group.get("ContentSequence", []):
        concept, kind = _concept(item), item.get("ValueType")
        if kind == "TEXT" and concept == TRACKING_ID:
            name = str(item.TextValue)
        elif kind == "TEXT" and concept not in _SKIPPED:
            notes.append(str(item.TextValue))
        elif kind == "CODE" and concept == FINDING:
            finding = _coded(item.ConceptCodeSequence[0])
        elif kind == "CODE" and concept not in _SKIPPED:  # a qualitative evaluation: Present / Absent
            value = str(item.ConceptCodeSequence[0].CodeValue)
            present = True if value in PRESENT else False if value in ABSENT else present
        elif kind == "NUM" and item.get("MeasuredValueSequence"):
            measured = item.MeasuredValueSequence[0]
            unit = _coded(measured.MeasurementUnitsCodeSequence[0])
            label = _coded(item.ConceptNameCodeSequence[0])
            derivation = next((_coded(m.ConceptCodeSequence[0]).meaning for m in _modifiers(item, DERIVATION)), "")
            measurements.append(Measurement(label, float(measured.NumericValue), unit, derivation))
    if present is None:
        volumes = [m.value for m in measurements if m.name.value == "118565006"]
        present = bool(volumes and volumes[0] > 0) if volumes else None
    name = name or (finding.meaning if finding else "")
    return Finding(name, finding, present, tuple(measurements), note=" ".join(notes))


def _critical(finding: Finding, rules: Sequence[CriticalRule]) -> Finding:
    return replace(finding, critical=any(_matches(finding, rule) for rule in rules))


def _matches(finding: Finding, rule: CriticalRule) -> bool:
    wanted = rule.finding.lower()
    names = {finding.name.lower()}
    if finding.finding is not None:
        names |= {finding.finding.value.lower(), finding.finding.meaning.lower()}
    if wanted not in names:
        return False
    if rule.at_least is None:
        return finding.present is True
    measure = rule.measurement.lower()
    return any(
        m.value >= rule.at_least for m in finding.measurements if measure in (m.name.meaning.lower(), m.name.value)
    )


def _instance(ds: Dataset) -> ResultInstance:
    return ResultInstance(str(ds.Modality), str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.SeriesInstanceUID))


def _sentence(finding: Finding) -> str:
    state = {True: "present", False: "absent", None: "reported"}[finding.present]
    numbers = ", ".join(f"{m.label.lower()} {m.value:.4g} {_unit(m.unit)}".rstrip() for m in finding.measurements)
    flag = " CRITICAL." if finding.critical else ""
    note = f" {finding.note}" if finding.note else ""
    return f"{finding.name}: {state}" + (f" ({numbers})." if numbers else ".") + note + flag


def _unit(unit: Coded) -> str:
    return "" if unit.value == "1" else unit.value
