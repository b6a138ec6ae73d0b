"""One job, in order: manifest → load series → infer → encode SEG + SR → write to the outbox.

Over 300 lines: one job's whole path (screening, segmentation, classification, writing) reads in one file.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import torch
from billiard.exceptions import SoftTimeLimitExceeded
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError

from models import conform, meshnet_ood
from models.bundle import BundleError, run_bundle
from models.ood import VolumeScore, load_stats
from models.preprocess import classification_spec, to_ras_image
from models.registry import LoadedModel, load_model, load_spec, pick_device
from models.spec import MESHNET_NETWORK, Task
from pacsai.errors import ModelError, Resource, ResourceExhausted, StudyRejected
from pacsai.jobs import SeriesJob
from pacsai.profiles import Output, overlay_file
from pacsai.settings import Settings
from pacsai.settings_parse import memory_available_mb
from pacsai.storage import Spool, check_intact, outbox_for, require_room, write_atomic
from worker import (
    classify,
    collect,
    encode_overlay,
    encode_sc,
    encode_seg,
    encode_sr,
    forked,
    infer,
    load_image,
    load_volume,
    result_bytes,
    screen,
)
from worker.stage_clock import note as note_stage
from worker.uids import output_uids
from worker.volume import Volume

log = logging.getLogger(__name__)
SOFTWARE_VERSION = "pacsai 0.1.0"
_warm: dict[str, LoadedModel] = {}  # one load per worker process, reused by every job
_ROLE = {"1.2.840.10008.5.1.4.1.1.7": "sc", "1.2.840.10008.5.1.4.1.1.7.4": "sc"}  # secondary captures: "sc.dcm"


@dataclass(frozen=True, slots=True)
class Results:
    files: tuple[Path, ...]
    segments: int
    not_evaluated: str = ""  # the reason when the model refused the series (screen.py); files: the report, if any


def warm_model(name: str, settings: Settings) -> LoadedModel:
    if name not in _warm:
        started = time.monotonic()
        if not _warm and "OMP_NUM_THREADS" not in os.environ:  # the process' first model: its share of the cores
            torch.set_num_threads(cpu_threads(settings.worker.concurrency))
        try:
            spec = load_spec(name, settings.worker.models_dir)
            _warm[name] = load_model(spec, pick_device(settings.worker.device))
        except SoftTimeLimitExceeded:
            raise
        except Exception as exc:
            raise ModelError(f"model {name} cannot be loaded: {exc}") from exc
        collect.freeze_loaded()  # what stays loaded is never walked by a collection again
        log.info(
            "model %s %s loaded on %s in %.1f s", name, spec.version, _warm[name].device, time.monotonic() - started
        )
    return _warm[name]


def cpu_threads(concurrency: int) -> int:
    """torch's intra-op threads for one of `concurrency` worker processes on this host's cores (issue 11 goal 5):
    each process its share, not every process all of them (2 processes × 2 threads on 2 cores ran 1.24× of 1)."""
    return max(1, len(os.sched_getaffinity(0)) // max(1, concurrency))


def estimate_bytes(paths: Sequence[Path]) -> int:
    """Memory one series needs in the worker, from headers only (as process_series checks it): decoded float32
    volume, model copy, labels."""
    return estimate_from_headers(screen.SeriesHeaders(paths).for_checks)


def estimate_from_headers(headers: Sequence[Dataset]) -> int:
    """estimate_bytes of the series whose headers these are."""
    total = 0
    for ds in headers:
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        total += int(ds.get("Rows", 0) or 0) * int(ds.get("Columns", 0) or 0) * frames
    return total * (4 + 4 + 1 + 8)  # array, resampled copy (upper bound), label map, inference buffers


@dataclass(frozen=True, slots=True)
class Options:
    """What process_series makes besides the SEG and SR (see there)."""

    overlays: bool = False
    omit_empty_frames: bool = True
    revision: int = 1
    supersedes: Dataset | None = None


def process_series(
    paths: Sequence[Path],
    model: LoadedModel,
    *,
    memory_limit_bytes: int = 0,
    overlays: bool = False,
    omit_empty_frames: bool = True,
    revision: int = 1,
    supersedes: Dataset | None = None,
    check_files: bool = False,
) -> list[Dataset]:
    """Load one series, run the model and return the result datasets (segmentation: SEG if found + SR, and with
    `overlays` the SEG as Secondary Captures; classification: SR + heat-map Secondary Capture).

    `revision` numbers the results of this series and model (worker.uids.revision_base); `supersedes` is the header
    of the earlier SR they replace (superseded_sr), which the new SR names as its predecessor. A refused series
    raises screen.NotEvaluated (its domain before anything runs, its OOD score after the forward pass).
    `check_files`: S7 on the spooled files (SpoolCorrupted), a volume's while it is read (one read per file)."""
    options = Options(overlays, omit_empty_frames, revision, supersedes)
    headers = _read_headers(paths, check_files)
    check_memory(estimate_from_headers(headers.for_checks), memory_limit_bytes)
    if model.spec.task is Task.CLASSIFICATION:
        if check_files:
            check_intact(paths)
        _screen_headers(model, headers, revision)
        return classify_image(paths, model, revision=revision, supersedes=supersedes)
    volume = _load(paths, check_files)  # a series no volume can be made of fails (C16) whatever the model: first
    _screen_headers(model, headers, revision)
    started = time.monotonic()
    label_map, scored = _segment_screened(model, volume, headers, revision)
    log.info("stage model: inference on %d slices took %.2f s", len(volume.datasets), time.monotonic() - started)
    note_stage("model", time.monotonic() - started)
    return _encode_segmentation(model, volume, label_map, scored, options)


def check_memory(needed: int, memory_limit_bytes: int) -> None:
    """StudyRejected over the worker's limit; ResourceExhausted (a wait) within it when the host has less free."""
    if memory_limit_bytes and needed > memory_limit_bytes:
        raise StudyRejected(
            f"series would need about {needed >> 20} MB in the worker, over the limit of "
            f"{memory_limit_bytes >> 20} MB (PACSAI_WORKER_MEMORY_MB)"
        )
    free_mb = memory_available_mb()
    if memory_limit_bytes and free_mb and needed > free_mb << 20:
        raise ResourceExhausted(Resource.MEMORY, f"needs about {needed >> 20} MB, {free_mb} MB free")


def _screen_headers(model: LoadedModel, headers: screen.SeriesHeaders, revision: int) -> None:
    if (refusal := screen.check_headers(model, headers.for_checks)) is not None:
        raise screen.not_evaluated(headers.all(), refusal, model, revision, SOFTWARE_VERSION)


def _read_headers(paths: Sequence[Path], check_files: bool) -> screen.SeriesHeaders:
    """The series' headers (screen.SeriesHeaders); a spooled file that cannot be parsed is checked (S7) first."""
    started = time.monotonic()
    try:
        headers = screen.SeriesHeaders(paths)
    except OSError as exc:
        raise StudyRejected(f"spooled series unreadable ({type(exc).__name__})") from exc
    except Exception:
        if check_files:  # a file changed since it was received says so (SpoolCorrupted)
            check_intact(paths)
        raise
    log.info("stage estimate: headers of %d files in %.2f s", len(paths), time.monotonic() - started)
    return headers


def _load(paths: Sequence[Path], check_files: bool) -> Volume:
    started = time.monotonic()
    try:
        volume = load_volume.load_series(paths, check_files=check_files)
    except load_volume.SeriesNotLoadable as exc:
        raise StudyRejected(f"series not loadable: {exc}") from exc
    except OSError as exc:
        raise StudyRejected(f"spooled series unreadable ({type(exc).__name__})") from exc
    log.info("stage load: %d slices read and decoded in %.2f s", len(volume.datasets), time.monotonic() - started)
    note_stage("load", time.monotonic() - started)
    return volume


def _segment_screened(
    model: LoadedModel, volume: Volume, headers: screen.SeriesHeaders, revision: int
) -> tuple[NDArray[np.uint8], tuple[float, float] | None]:
    """The label map and the OOD (score, threshold), None without a check; NotEvaluated past the threshold.

    Our own networks score the features of their segmentation pass (infer.segment); a MeshNet with an OOD block in
    its network_args (models/meshnet_ood.py) scores the features of its own pass on brainchop's conformed grid."""
    spec = model.spec
    if spec.network == MESHNET_NETWORK and meshnet_ood.settings_of(model) is not None:  # one pass: mask and score
        label_map, scored = meshnet_ood.segment_with_score(model, volume.array, volume.affine)
        if scored is not None and (refusal := screen.judge_ood(model, scored)) is not None:
            raise screen.not_evaluated(headers.all(), refusal, model, revision, SOFTWARE_VERSION)
        return label_map, scored
    scored, ood = None, None
    if model.bundle is None and spec.ood is not None:
        if spec.network == MESHNET_NETWORK:
            refusal, scored = screen.check_ood(
                model, prepared=infer.prepare(to_ras_image(volume.array, volume.affine), spec.preprocessing)
            )
            if refusal is not None:
                raise screen.not_evaluated(headers.all(), refusal, model, revision, SOFTWARE_VERSION)
        else:
            ood = VolumeScore(load_stats(spec.ood))
    label_map = segment(model, volume, ood)
    if ood is not None:
        scored = ood.result()
        if (refusal := screen.judge_ood(model, scored)) is not None:
            raise screen.not_evaluated(headers.all(), refusal, model, revision, SOFTWARE_VERSION)
    return label_map, scored


def _encode_segmentation(
    model: LoadedModel,
    volume: Volume,
    label_map: NDArray[np.uint8],
    scored: tuple[float, float] | None,
    options: Options,
) -> list[Dataset]:
    started = time.monotonic()
    uids = output_uids(str(volume.datasets[0].SeriesInstanceUID), model.spec.name, model.spec.version, options.revision)
    stats = encode_sr.measure_labels(volume, label_map, model.spec)  # one pass: the SR's figures and the SEG's labels
    labels = [measured.label for measured in stats]

    def report(seg: Dataset | None) -> hd.sr.Comprehensive3DSR:
        return encode_sr.encode_sr(
            seg,
            volume,
            label_map,
            model.spec,
            uids,
            software_version=SOFTWARE_VERSION,
            revision=options.revision,
            predecessor=encode_sr.predecessor_of(options.supersedes, volume.datasets[0].StudyInstanceUID),
            ood=scored,
            stats=stats,
        )

    # the SR only needs to know the SEG's UIDs and segments: it is built and serialised beside it, in a child process
    reference = encode_seg.seg_reference(volume, labels, uids) if labels else None
    child = forked.Child(lambda: result_bytes.to_bytes(report(reference)), "the SR")
    try:
        seg: hd.seg.Segmentation | None = encode_seg.encode_seg(
            volume,
            label_map,
            model.spec,
            uids,
            software_version=SOFTWARE_VERSION,
            omit_empty_frames=options.omit_empty_frames,
            revision=options.revision,
            replaces_earlier=options.supersedes is not None,
            labels=labels,
        )
    except encode_seg.NothingFound:
        log.info("model found no segment in this series; the SR goes alone")
        seg = None
    except BaseException:
        child.cancel()
        raise
    written = child.result()
    sr = report(seg) if written is None else result_bytes.Written(written)
    results: list[Dataset] = [ds for ds in (seg, sr) if ds is not None]
    if options.overlays and seg is not None and volume.frame_numbers:
        log.warning("no SC overlays: drawing the frames of an enhanced multi-frame source is not supported")
    elif options.overlays and seg is not None:
        results += encode_overlay.encode_seg_overlays(seg, volume)
    log.info("stage encode: %d dataset(s) in %.2f s", len(results), time.monotonic() - started)
    note_stage("encode", time.monotonic() - started)
    return results


def segment(model: LoadedModel, volume: Volume, ood: VolumeScore | None = None) -> NDArray[np.uint8]:
    """Our own networks go through infer.segment (summing `ood` from the same pass, if given); a MONAI bundle through
    its own transforms and inferer; a MeshNet through brainchop's conformed grid (models/conform.py)."""
    if model.spec.network == MESHNET_NETWORK:
        settings = conform.ConformSettings.from_args(model.spec.network_args.get("conform", {}))
        return conform.segment(model.module, model.device, volume.array, volume.affine, settings)
    if model.bundle is None:
        return infer.segment(model, volume, ood)
    args = model.spec.network_args
    try:
        labels = run_bundle(
            model.bundle, volume, roi_size=args.get("roi_size"), sw_batch_size=args.get("sw_batch_size")
        )
    except BundleError as exc:
        raise ModelError(f"model {model.spec.name}: {exc}") from exc
    return np.asarray(labels, dtype=np.uint8)


def classify_image(
    paths: Sequence[Path], model: LoadedModel, *, revision: int = 1, supersedes: Dataset | None = None
) -> list[Dataset]:
    """Classify the series' first image (one projection per series); SR with the finding, SC with the heat-map."""
    pre = classification_spec(model.spec).preprocessing
    source = load_volume.read_source(sorted(paths)[0])  # C8: its text as UTF-8, like a volume's
    image = load_image.prepare_image(source, pre)
    refusal, scored = screen.check_ood(model, grey=image.network_grey)
    if refusal is not None:
        raise screen.not_evaluated([image.header], refusal, model, revision, SOFTWARE_VERSION)
    result = classify.classify(model, image)
    log.info("classification: probability %.3f, threshold %.3f", result.probability, result.threshold)
    series_uid = str(source.SeriesInstanceUID)
    uids = output_uids(series_uid, model.spec.name, model.spec.version, revision) | encode_sc.heatmap_uids(
        series_uid, model.spec.name, model.spec.version, revision
    )
    sr = encode_sr.encode_classification_sr(
        image.header,
        result,
        model.spec,
        uids,
        software_version=SOFTWARE_VERSION,
        revision=revision,
        predecessor=encode_sr.predecessor_of(supersedes, source.StudyInstanceUID),
        ood=scored,
    )
    sc = encode_sc.encode_heatmap_sc(
        source,
        result.heatmap,
        model.spec,
        uids,
        software_version=SOFTWARE_VERSION,
        caption=encode_sc.caption_for(result),
        revision=revision,
    )
    return [sr, sc]


def run(job: SeriesJob, settings: Settings, spool: Spool, *, fallback_overlays: bool = True) -> Results:
    """Run one job and leave its results in the outbox; raises WorkerError subclasses on purpose.

    Everything the destination may get is made here, its SEG fallback's overlays too when the profile's fallback is
    `sc` and `fallback_overlays` (the peer is not known to take SEG): a delivery only reads and sends files.
    """
    model = warm_model(job.model, settings)
    try:
        paths = spool.read_manifest(job.manifest, check_files=False)  # process_series checks them as it reads
    except (OSError, ValueError) as exc:
        raise StudyRejected(f"spooled series unreadable ({type(exc).__name__})") from exc
    profile = settings.delivery.profile_for(job.destination)  # only what this destination may get is made
    try:
        datasets = process_series(
            paths,
            model,
            memory_limit_bytes=settings.worker.memory_mb << 20,
            overlays=Output.SC in profile.outputs or (fallback_overlays and profile.may_fall_back_to_sc),
            omit_empty_frames=profile.seg_omit_empty_frames,
            revision=job.revision,
            supersedes=superseded_sr(settings, job),
            check_files=True,
        )
    except screen.NotEvaluated as refused:  # an outcome, not a failure: the report goes like any result
        reports = [refused.report] if profile.report_not_evaluated and refused.report is not None else []
        files = _write(outbox_for(settings, job.job_id), reports, reserve_bytes=settings.storage.spool_reserve_bytes)
        return Results(files=files, segments=0, not_evaluated=str(refused))
    started = time.monotonic()
    files = _write(outbox_for(settings, job.job_id), datasets, reserve_bytes=settings.storage.spool_reserve_bytes)
    log.info("stage write: %d file(s) to the outbox in %.2f s", len(files), time.monotonic() - started)
    note_stage("encode", time.monotonic() - started)
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
    except (OSError, InvalidDicomError) as exc:  # retention removed it, or that job made no SR
        log.warning(
            "the SR of superseded job %s is not in the outbox (%s); the new SR names no predecessor",
            job.supersedes[:8],
            type(exc).__name__,
        )
        return None


def write_overlays(job: SeriesJob, settings: Settings, spool: Spool) -> tuple[Path, ...]:
    """The job's SEG in the outbox drawn over its source slices (a SEG fallback, E5), written next to it."""
    outbox = outbox_for(settings, job.job_id)
    try:
        seg = pydicom.dcmread(outbox / "seg.dcm")
        paths = spool.read_manifest(job.manifest)
    except (OSError, ValueError) as exc:
        raise StudyRejected(f"SEG or spooled series unreadable ({type(exc).__name__})") from exc
    volume = load_volume.load_series(paths)
    if volume.frame_numbers:
        raise StudyRejected("SC overlays of an enhanced multi-frame source are not supported")
    overlays = encode_overlay.encode_seg_overlays(seg, volume)
    return _write(outbox, overlays, reserve_bytes=settings.storage.spool_reserve_bytes)


def _write(outbox: Path, datasets: Sequence[Dataset], *, reserve_bytes: int) -> tuple[Path, ...]:
    """Each dataset into the outbox under the name of its kind (worker/profiles.py), overlays numbered; all of them
    must fit above the disk reserve the node keeps for incoming data (else ResourceExhausted, nothing written)."""
    named: list[tuple[Path, bytes]] = []
    overlays = 0
    for ds in datasets:
        if ds.get("SeriesNumber") == encode_overlay.OVERLAY_SERIES_NUMBER:
            overlays += 1
            name = overlay_file(overlays)
        else:
            name = f"{_ROLE.get(str(ds.SOPClassUID), str(ds.Modality).lower())}.dcm"
        named.append((outbox / name, _to_bytes(ds)))
    require_room(outbox, sum(len(data) for _, data in named), reserve_bytes)
    for path, data in named:
        write_atomic(path, data, reserve_bytes=reserve_bytes)
    return tuple(path for path, _ in named)


def _to_bytes(dataset: Dataset) -> bytes:
    return result_bytes.to_bytes(dataset)  # what save_as writes; a SEG's per-frame groups and an SR's content faster
