"""One job, in order: manifest → load series → infer → encode SEG + SR → write to the outbox."""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from billiard.exceptions import SoftTimeLimitExceeded
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from dicom_node.spool import Spool, write_atomic
from models.bundle import BundleError, run_bundle
from models.registry import LoadedModel, load_model, load_spec, pick_device
from models.spec import Task
from worker import classify, encode_overlay, encode_sc, encode_seg, encode_sr, infer, load, load_image
from worker.errors import ModelError, StudyRejected
from worker.jobs import SeriesJob
from worker.profiles import Output, overlay_file
from worker.settings import Settings
from worker.uids import output_uids
from worker.volume import Volume

log = logging.getLogger(__name__)
SOFTWARE_VERSION = "pacsai 0.1.0"
_warm: dict[str, LoadedModel] = {}   # one load per worker process, reused by every job
_ROLE = {"1.2.840.10008.5.1.4.1.1.7": "sc", "1.2.840.10008.5.1.4.1.1.7.4": "sc"}   # secondary captures: "sc.dcm"


@dataclass(frozen=True, slots=True)
class Results:
    files: tuple[Path, ...]
    segments: int


def warm_model(name: str, settings: Settings) -> LoadedModel:
    if name not in _warm:
        started = time.monotonic()
        try:
            spec = load_spec(name, settings.models_dir)
            _warm[name] = load_model(spec, pick_device(settings.device))
        except SoftTimeLimitExceeded:
            raise
        except Exception as exc:
            raise ModelError(f"model {name} cannot be loaded: {exc}") from exc
        log.info("model %s %s loaded on %s in %.1f s", name, spec.version, _warm[name].device,
                 time.monotonic() - started)
    return _warm[name]


def outbox_for(settings: Settings, job_id: str) -> Path:
    return settings.outbox_dir / job_id


def estimate_bytes(paths: Sequence[Path]) -> int:
    """Memory one series needs in the worker, from headers only: decoded float32 volume, model copy, labels."""
    total = 0
    for path in paths:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        total += int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0) * frames
    return total * (4 + 4 + 1 + 8)   # array, resampled copy (upper bound), label map, inference buffers


def process_series(paths: Sequence[Path], model: LoadedModel, *, memory_limit_bytes: int = 0,
                   overlays: bool = False, omit_empty_frames: bool = True, revision: int = 1,
                   supersedes: Dataset | None = None) -> list[Dataset]:
    """Load one series, run the model and return the result datasets (segmentation: SEG if found + SR, and with
    `overlays` the SEG as Secondary Captures; classification: SR + heat-map Secondary Capture).

    `revision` numbers the results of this series and model (worker.uids.revision_base); `supersedes` is the header
    of the earlier SR they replace (superseded_sr), which the new SR names as its predecessor."""
    needed = estimate_bytes(paths)
    if memory_limit_bytes and needed > memory_limit_bytes:
        raise StudyRejected(f"series would need about {needed >> 20} MB in the worker, over the limit of "
                            f"{memory_limit_bytes >> 20} MB (PACSAI_WORKER_MEMORY_MB)")
    if model.spec.task is Task.CLASSIFICATION:
        return classify_image(paths, model, revision=revision, supersedes=supersedes)
    try:
        volume = load.load_series(paths)
    except load.SeriesNotLoadable as exc:
        raise StudyRejected(f"series not loadable: {exc}") from exc
    started = time.monotonic()
    label_map = segment(model, volume)
    log.info("inference on %d slices took %.1f s", len(volume.datasets), time.monotonic() - started)
    uids = output_uids(str(volume.datasets[0].SeriesInstanceUID), model.spec.name, model.spec.version, revision)
    try:
        seg: hd.seg.Segmentation | None = encode_seg.encode_seg(
            volume, label_map, model.spec, uids, software_version=SOFTWARE_VERSION,
            omit_empty_frames=omit_empty_frames, revision=revision, replaces_earlier=supersedes is not None)
    except encode_seg.NothingFound:
        log.info("model found no segment in this series; the SR goes alone")
        seg = None
    sr = encode_sr.encode_sr(seg, volume, label_map, model.spec, uids, software_version=SOFTWARE_VERSION,
                             revision=revision,
                             predecessor=encode_sr.predecessor_of(supersedes, volume.datasets[0].StudyInstanceUID))
    results: list[Dataset] = [ds for ds in (seg, sr) if ds is not None]
    if overlays and seg is not None and volume.frame_numbers:
        log.warning("no SC overlays: drawing the frames of an enhanced multi-frame source is not supported")
    elif overlays and seg is not None:
        results += encode_overlay.encode_seg_overlays(seg, volume)
    return results


def segment(model: LoadedModel, volume: Volume) -> NDArray[np.uint8]:
    """Our own networks go through infer.segment; a MONAI bundle through its own transforms and inferer."""
    if model.bundle is None:
        return infer.segment(model, volume)
    args = model.spec.network_args
    try:
        labels = run_bundle(model.bundle, volume, roi_size=args.get("roi_size"),
                            sw_batch_size=args.get("sw_batch_size"))
    except BundleError as exc:
        raise ModelError(f"model {model.spec.name}: {exc}") from exc
    return np.asarray(labels, dtype=np.uint8)


def classify_image(paths: Sequence[Path], model: LoadedModel, *, revision: int = 1,
                   supersedes: Dataset | None = None) -> list[Dataset]:
    """Classify the series' first image (one projection per series); SR with the finding, SC with the heat-map."""
    pre = classify.classification_spec(model.spec).preprocessing
    source = load.read_source(sorted(paths)[0])       # C8: its text as UTF-8, like a volume's
    image = load_image.prepare_image(source, pre)
    result = classify.classify(model, image)
    log.info("classification: probability %.3f, threshold %.3f", result.probability, result.threshold)
    series_uid = str(source.SeriesInstanceUID)
    uids = output_uids(series_uid, model.spec.name, model.spec.version, revision) | encode_sc.heatmap_uids(
        series_uid, model.spec.name, model.spec.version, revision)
    sr = encode_sr.encode_classification_sr(image.header, result, model.spec, uids, software_version=SOFTWARE_VERSION,
                                            revision=revision,
                                            predecessor=encode_sr.predecessor_of(supersedes, source.StudyInstanceUID))
    sc = encode_sc.encode_heatmap_sc(source, result.heatmap, model.spec, uids, software_version=SOFTWARE_VERSION,
                                     caption=encode_sc.caption_for(result), revision=revision)
    return [sr, sc]


def run(job: SeriesJob, settings: Settings, spool: Spool) -> Results:
    """Run one job and leave its results in the outbox; raises WorkerError subclasses on purpose."""
    model = warm_model(job.model, settings)
    try:
        paths = spool.read_manifest(job.manifest)
    except (OSError, ValueError) as exc:
        raise StudyRejected(f"spooled series unreadable ({type(exc).__name__})") from exc
    profile = settings.profile_for(job.destination)   # only what this destination may get is made
    datasets = process_series(paths, model, memory_limit_bytes=settings.worker_memory_mb << 20,
                              overlays=Output.SC in profile.outputs,
                              omit_empty_frames=profile.seg_omit_empty_frames,
                              revision=job.revision, supersedes=superseded_sr(settings, job))
    files = _write(outbox_for(settings, job.job_id), datasets)
    segments = sum(len(ds.SegmentSequence) for ds in datasets if ds.Modality == "SEG")
    return Results(files=tuple(files), segments=segments)


def superseded_sr(settings: Settings, job: SeriesJob) -> Dataset | None:
    """The SR of the job this one supersedes, as its outbox holds it (header only); None when there is none.

    Read rather than derived: that job may have run another model version, or on a de-identified copy.
    """
    if not job.supersedes:
        return None
    try:
        return pydicom.dcmread(outbox_for(settings, job.supersedes) / "sr.dcm", stop_before_pixels=True)
    except (OSError, InvalidDicomError) as exc:   # retention removed it, or that job made no SR
        log.warning("the SR of superseded job %s is not in the outbox (%s); the new SR names no predecessor",
                    job.supersedes[:8], type(exc).__name__)
        return None


def write_overlays(job: SeriesJob, settings: Settings, spool: Spool) -> tuple[Path, ...]:
    """The job's SEG in the outbox drawn over its source slices (a SEG fallback, E5), written next to it."""
    outbox = outbox_for(settings, job.job_id)
    try:
        seg = pydicom.dcmread(outbox / "seg.dcm")
        paths = spool.read_manifest(job.manifest)
    except (OSError, ValueError) as exc:
        raise StudyRejected(f"SEG or spooled series unreadable ({type(exc).__name__})") from exc
    volume = load.load_series(paths)
    if volume.frame_numbers:
        raise StudyRejected("SC overlays of an enhanced multi-frame source are not supported")
    return _write(outbox, encode_overlay.encode_seg_overlays(seg, volume))


def _write(outbox: Path, datasets: Sequence[Dataset]) -> tuple[Path, ...]:
    """Each dataset into the outbox under the name of its kind (worker/profiles.py), overlays numbered."""
    files = []
    overlays = 0
    for ds in datasets:
        if ds.get("SeriesNumber") == encode_overlay.OVERLAY_SERIES_NUMBER:
            overlays += 1
            name = overlay_file(overlays)
        else:
            name = f"{_ROLE.get(str(ds.SOPClassUID), str(ds.Modality).lower())}.dcm"
        write_atomic(outbox / name, _to_bytes(ds))
        files.append(outbox / name)
    return tuple(files)


def _to_bytes(dataset: object) -> bytes:
    from io import BytesIO

    buffer = BytesIO()
    dataset.save_as(buffer, enforce_file_format=True)  # type: ignore[attr-defined]
    return buffer.getvalue()
