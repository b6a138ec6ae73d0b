"""Returned results: a corrected SEG or a rejecting KOS from a known peer is linked to its job and recorded, never
inferred on (the assembler hands such series here instead of routing them)."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import highdicom as hd
import pydicom
from pydicom.dataset import Dataset

from dicom_node.agreement import compare
from pacsai.feedback_table import FeedbackKind, FeedbackRow
from pacsai.job_table import JobRow
from pacsai.logs import key_of
from pacsai.series_table import SeriesRow
from pacsai.settings import Settings
from pacsai.state import State
from pacsai.storage import Spool, outbox_for, write_atomic

log = logging.getLogger(__name__)
SEG_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"  # Segmentation Storage
KOS_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"  # Key Object Selection Document Storage
REJECTIONS = {  # Key Object Selection titles (CID 7011) that reject what they reference
    ("113001", "DCM"): "Rejected for Quality Reasons",
    ("113037", "DCM"): "Rejected for Patient Safety Reasons",
}
FEEDBACK_DIR = "feedback"  # data_dir/feedback/<feedback id>.dcm: corrected SEGs kept for `pacsai feedback export`
RESULT_FILES = ("seg.dcm", "sr.dcm")


class NotFeedback(Exception):
    """A returned object that says nothing about one of our results; the message says why (no patient data)."""


def is_returned(header: Mapping[str, object]) -> bool:
    """Whether a series is a SEG or a KOS: feedback candidates, never a series for models."""
    sop_class, modality = str(header.get("SOPClassUID", "")), str(header.get("Modality", "")).upper()
    return sop_class in (SEG_CLASS, KOS_CLASS) or modality in ("SEG", "KO")


def take(settings: Settings, state: State, spool: Spool, row: SeriesRow, files: Sequence[str]) -> str:
    """Record what a returned series says about our results; return the series' close reason (no patient data)."""
    delivery = settings.delivery
    if row.calling_ae not in settings.callers and not (
        delivery.peer(row.calling_ae) or delivery.web_peer(row.calling_ae)
    ):
        log.warning("a returned SEG/KOS from unknown caller %s: not recorded", row.calling_ae)
        return "returned SEG/KOS from an unknown caller: not recorded"
    outcomes = []
    for relative in files:
        try:
            outcomes.append(_take_one(settings, state, spool.resolve(relative)))
        except NotFeedback as exc:
            log.info("returned instance not recorded: %s", exc)
            outcomes.append(f"not recorded: {exc}")
        except Exception as exc:  # a malformed SEG/KOS must not stop the assembler; pydicom text may quote values
            log.warning("returned instance not readable as feedback (%s)", type(exc).__name__)
            outcomes.append(f"not readable as feedback ({type(exc).__name__})")
    return "returned result, " + "; ".join(sorted(set(outcomes)))


def _take_one(settings: Settings, state: State, path: Path) -> str:
    ds = pydicom.dcmread(path)
    if str(ds.get("SOPClassUID", "")) == SEG_CLASS:
        return take_seg(settings, state, ds, path)
    if str(ds.get("SOPClassUID", "")) == KOS_CLASS:
        return take_kos(settings, state, ds)
    raise NotFeedback("neither a SEG nor a KOS")


def take_seg(settings: Settings, state: State, ds: Dataset, path: Path) -> str:
    """A corrected SEG: compared with our SEG of the same source series, kept, recorded as 'corrected'."""
    theirs = hd.seg.Segmentation.from_dataset(ds, copy=False)
    job, ours_path = _job_with_seg(settings, state, {str(s) for _, s, _ in theirs.get_source_image_uids()})
    ours = hd.seg.segread(ours_path)
    if str(ours.SOPInstanceUID) == str(theirs.SOPInstanceUID):
        raise NotFeedback(f"our own SEG of job {job.job_id[:8]} came back unchanged")
    segments = compare(ours, theirs)
    feedback_id = key_of(settings.log_key, f"{ds.SOPInstanceUID}|{job.job_id}")
    kept = Path(FEEDBACK_DIR) / f"{feedback_id}.dcm"
    write_atomic(settings.storage.data_dir / kept, path.read_bytes())
    row = FeedbackRow(
        feedback_id,
        job.job_id,
        job.model,
        version_of(ours),
        FeedbackKind.CORRECTED,
        f"{len(segments)} segment(s) compared",
        segments,
        str(kept),
        time.time(),
    )
    state.record_feedback(row)
    log.info("job %s: corrected SEG recorded, mean Dice %.3f", job.job_id[:8], row.mean_dice or 0.0)
    return f"corrected SEG of job {job.job_id[:8]}"


def _job_with_seg(settings: Settings, state: State, series_uids: set[str]) -> tuple[JobRow, Path]:
    """The latest job of the referenced source series whose outbox holds a SEG."""
    jobs = [job for uid in sorted(series_uids) for job in state.jobs_for_series(key_of(settings.log_key, uid))]
    for job in sorted(jobs, key=lambda j: j.revision, reverse=True):
        if (outbox_for(settings, job.job_id) / "seg.dcm").is_file():
            return job, outbox_for(settings, job.job_id) / "seg.dcm"
    raise NotFeedback("a SEG of a series we made no SEG for")


def take_kos(settings: Settings, state: State, ds: Dataset) -> str:
    """A KOS titled 'Rejected for Quality/Patient Safety Reasons' naming our SEG or SR: each job 'rejected'."""
    title = ds.ConceptNameCodeSequence[0] if ds.get("ConceptNameCodeSequence") else Dataset()
    reason = REJECTIONS.get((str(title.get("CodeValue", "")), str(title.get("CodingSchemeDesignator", ""))))
    if reason is None:
        raise NotFeedback("a key object selection whose title rejects nothing")
    referenced = dict(referenced_instances(ds))
    rejected = []
    for study_uid in sorted(set(referenced.values())):
        for job in state.jobs_of_study(key_of(settings.log_key, study_uid)):
            if result_uids(settings, job.job_id) & referenced.keys():
                feedback_id = key_of(settings.log_key, f"{ds.SOPInstanceUID}|{job.job_id}")
                version = model_version(settings, job.job_id)
                state.record_feedback(
                    FeedbackRow(feedback_id, job.job_id, job.model, version, FeedbackKind.REJECTED, reason, ())
                )
                log.info("job %s: result %s", job.job_id[:8], reason.lower())
                rejected.append(job.job_id[:8])
    if not rejected:
        raise NotFeedback("a rejection naming none of our results")
    return f"{reason} of job(s) {', '.join(rejected)}"


def referenced_instances(ds: Dataset) -> Iterator[tuple[str, str]]:
    """(SOP Instance UID, Study Instance UID) of every instance in the KOS's evidence."""
    for study in ds.get("CurrentRequestedProcedureEvidenceSequence", []):
        for series in study.get("ReferencedSeriesSequence", []):
            for sop in series.get("ReferencedSOPSequence", []):
                yield str(sop.ReferencedSOPInstanceUID), str(study.StudyInstanceUID)


def result_uids(settings: Settings, job_id: str) -> set[str]:
    """SOP Instance UIDs of the job's SEG and SR as its outbox holds them."""
    uids = set()
    for name in RESULT_FILES:
        path = outbox_for(settings, job_id) / name
        if path.is_file():
            uids.add(
                str(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
            )
    return uids


def model_version(settings: Settings, job_id: str) -> str:
    """The model version the job's results name: its SEG's Algorithm Version, else its SR's (111003, DCM)."""
    outbox = outbox_for(settings, job_id)
    if (outbox / "seg.dcm").is_file():
        return version_of(pydicom.dcmread(outbox / "seg.dcm", stop_before_pixels=True))
    if (outbox / "sr.dcm").is_file():
        return _sr_version(pydicom.dcmread(outbox / "sr.dcm").get("ContentSequence", [])) or "unknown"
    return "unknown"


def _sr_version(items: Sequence[Dataset]) -> str:
    for item in items:
        name = item.ConceptNameCodeSequence[0] if item.get("ConceptNameCodeSequence") else Dataset()
        if (name.get("CodeValue"), name.get("CodingSchemeDesignator")) == ("111003", "DCM"):
            return str(item.get("TextValue", ""))
        found = _sr_version(item.get("ContentSequence", []))
        if found:
            return found
    return ""


def version_of(seg: Dataset) -> str:
    """The model version our SEG names (its first segment's Algorithm Version)."""
    try:
        return str(seg.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0].AlgorithmVersion)
    except (AttributeError, IndexError):
        return "unknown"
