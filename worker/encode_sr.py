# over 300 lines: the segmentation and the classification report share their helpers here
"""Step 7: findings → highdicom Comprehensive 3D SR (TID 1500 Measurement Report), built but not written.

encode_sr reports a segmentation (one group per label); encode_classification_sr reports one image's classification.
A later result of the same series and model (revision 2, 3, …) names the SR it supersedes in its Predecessor
Documents Sequence (see predecessor_of).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import cast

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.sr.coding import Code
from pydicom.uid import Comprehensive3DSRStorage

from models.spec import Label, ModelSpec
from worker.classify import Classification
from worker.encode_ood import ood_group, ood_measurements
from worker.encode_seg import (
    MANUFACTURER,
    check_label_map,
    clip_lo,
    coded,
    declare_charset,
    device_serial_number,
    disclaimed,
    labels_counted,
    revised,
    source_images,
    tracking_uid,
)
from worker.image_library import with_library
from worker.uids import derive_uid
from worker.volume import Volume

SR_SERIES_NUMBER = 9902
_ML = hd.sr.CodedConcept(value="ml", scheme_designator="UCUM", meaning="milliliter")
_NO_UNITS = hd.sr.CodedConcept(value="1", scheme_designator="UCUM", meaning="no units")
# Procedure reported, from CID 100 "Quantitative Diagnostic Imaging Procedures", by source Modality.
_PROCEDURES = {
    "CT": hd.sr.CodedConcept(value="25045-6", scheme_designator="LN", meaning="CT unspecified body region"),
    "MR": hd.sr.CodedConcept(value="25056-3", scheme_designator="LN", meaning="MRI unspecified body region"),
    "PT": hd.sr.CodedConcept(value="44136-0", scheme_designator="LN", meaning="PET unspecified body region"),
}
# Classification reports: procedure by source Modality, what the numbers are, and the finding's presence.
_RADIOGRAPHY = {"CR": codes.SCT.PlainRadiography, "DX": codes.SCT.PlainRadiography}
_PROBABILITY = hd.sr.CodedConcept(value="122157", scheme_designator="DCM", meaning="Probability")
_THRESHOLD = hd.sr.CodedConcept(value="122411", scheme_designator="DCM", meaning="Threshold Value")
# What the modality values measure (CID 7469/7180) and their unit; other modalities get no intensity statistics.
_QUANTITIES = {
    "CT": (codes.DCM.AttenuationCoefficient, codes.UCUM.HounsfieldUnit),
    "MR": (codes.DCM.MRSignalIntensity, _NO_UNITS),
}


_BLOCK_VOXELS = 1 << 20  # voxels per block of slices in measure_labels: its temporaries stay in the CPU's cache


@dataclass(frozen=True, slots=True)
class LabelStats:
    """One label's voxel count, volume, and mean and population SD (ddof=0) of the modality values inside it."""

    label: Label
    voxel_count: int
    volume_ml: float
    mean: float
    sd: float


def measure_labels(volume: Volume, label_map: NDArray[np.uint8], spec: ModelSpec) -> tuple[LabelStats, ...]:
    """Stats of every spec label with at least one voxel, by ascending label number (the SEG's segment order).

    One pass over the labelled voxels only, a block of slices at a time (no volume-sized temporaries): each block's
    counts, sums and squared deviations about its own means, merged into the totals by Chan et al.'s update (no
    cancellation). The counts also give the labels present (encode_seg.labels_counted, without present_labels' pass).
    """
    check_label_map(volume, label_map, spec)
    counts, means, squares = np.zeros(256), np.zeros(256), np.zeros(256)
    for labels_k, values_k in _labelled(label_map, volume.array):
        counts_k = np.bincount(labels_k, minlength=256).astype(np.float64)
        means_k = np.bincount(labels_k, weights=values_k, minlength=256) / np.maximum(counts_k, 1)
        squares_k = np.bincount(labels_k, weights=(values_k - means_k[labels_k]) ** 2, minlength=256)
        share = counts_k / np.maximum(counts + counts_k, 1)  # 1.0 for a label first seen in this block
        delta = means_k - means
        means += delta * share
        squares += squares_k + delta**2 * counts * share
        counts += counts_k
    return tuple(
        LabelStats(
            label=label,
            voxel_count=int(counts[label.number]),
            volume_ml=float(counts[label.number]) * volume.voxel_volume_ml,
            mean=float(means[label.number]),
            sd=float(np.sqrt(squares[label.number] / counts[label.number])),
        )
        for label in labels_counted(counts, spec)
    )


def _labelled(
    label_map: NDArray[np.uint8], array: NDArray[np.float32]
) -> Iterator[tuple[NDArray[np.intp], NDArray[np.float64]]]:
    """Block by block of slices: the label (as an index) and the modality value (float64) of each labelled voxel."""
    step = max(1, _BLOCK_VOXELS // max(1, int(np.prod(label_map.shape[1:]))))
    for k in range(0, len(label_map), step):
        inside = label_map[k : k + step] != 0
        yield label_map[k : k + step][inside].astype(np.intp), array[k : k + step][inside].astype(np.float64)


def encode_sr(
    seg: Dataset | None,
    volume: Volume,
    label_map: NDArray[np.uint8],
    spec: ModelSpec,
    uids: Mapping[str, str],
    *,
    software_version: str,
    revision: int = 1,
    predecessor: Dataset | None = None,
    ood: tuple[float, float] | None = None,
    stats: Sequence[LabelStats] | None = None,
) -> hd.sr.Comprehensive3DSR:
    """TID 1500 report with one group per spec label: a TID 1411 group per SEG segment, a 0 mL TID 1501 group otherwise.

    `seg` is None when encode_seg raised NothingFound; the report then says 0 mL for every label. Only its header is
    read (UIDs, SegmentSequence): encode_seg.seg_reference serves as well as the SEG itself.
    `predecessor` is the reference to the SR this one supersedes (predecessor_of), `revision` this result's number.
    `stats`: measure_labels' result when the caller has it already (it also gave encode_seg its labels).
    """
    measured = stats if stats is not None else measure_labels(volume, label_map, spec)
    groups = _groups(seg, volume, measured, spec, uids)
    if ood is not None:  # the model's OOD score and threshold (worker/screen.py)
        groups.append(ood_group(ood, volume.datasets[0], spec, uids))
    modality = str(volume.datasets[0].Modality)
    report = measurement_report(spec, _PROCEDURES.get(modality, codes.SCT.ImagingProcedure), groups)
    evidence = [*volume.datasets, *([] if seg is None else [seg])]
    sr = sr_document(report, evidence, spec, uids, software_version, revision, predecessor)
    # The Image Library goes in once the document is built: highdicom deep-copies, parses and searches the content
    # it is given, which for one entry per source image costs seconds. The document's ContentSequence is the report's
    # own (highdicom keeps its elements), so the library lands in the written dataset; its text is ASCII.
    with_library(report, source_images(volume))
    return written_as_built(sr)


def _groups(
    seg: Dataset | None,
    volume: Volume,
    stats: Sequence[LabelStats],
    spec: ModelSpec,
    uids: Mapping[str, str],
) -> list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations | hd.sr.MeasurementsAndQualitativeEvaluations]:
    """One measurement group per spec label, by label number: its SEG segment's, or a 0 mL one when absent."""
    if stats and seg is None:
        raise ValueError(f"model {spec.name}: labels were found but no SEG was given")
    segments = {} if seg is None else {str(item.TrackingUID): int(item.SegmentNumber) for item in seg.SegmentSequence}
    found = {s.label.number: s for s in stats}
    groups: list[
        hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations | hd.sr.MeasurementsAndQualitativeEvaluations
    ] = []
    for label in sorted((lb for lb in spec.labels if lb.number > 0), key=lambda lb: lb.number):
        if label.number in found and seg is not None:
            groups.append(_found_group(found[label.number], seg, segments, volume, spec, uids))
        else:
            groups.append(_absent_group(label, spec, uids))
    return groups


def predecessor_of(sr: Dataset | None, study_uid: str) -> Dataset | None:
    """A reference to an earlier SR of ours (its header as written to the outbox) in the study `study_uid`.

    The study is the new result's own: the earlier SR is in the same study, and for a de-identified job only the
    new job's study pseudonym is mapped back to the original on delivery (the SR's own UIDs are never replaced).
    """
    if sr is None:
        return None
    if str(sr.get("SOPClassUID", "")) != Comprehensive3DSRStorage:
        raise ValueError("the superseded result is not a Comprehensive 3D SR")
    reference = Dataset()
    reference.StudyInstanceUID = study_uid
    reference.SeriesInstanceUID = sr.SeriesInstanceUID
    reference.SOPClassUID = sr.SOPClassUID
    reference.SOPInstanceUID = sr.SOPInstanceUID
    return reference


def device_uid(spec: ModelSpec) -> str:
    """Observer device UID of a model version (TID 1004), derived so that it is stable across runs and hosts."""
    return derive_uid("device", spec.name, spec.version)


def _device(spec: ModelSpec) -> hd.sr.ObserverContext:
    return hd.sr.ObserverContext(
        observer_type=codes.cid270.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=device_uid(spec),
            name=clip_lo(spec.name),
            manufacturer_name=MANUFACTURER,
            model_name=clip_lo(spec.name),
            serial_number=device_serial_number(spec),
        ),
    )


def _found_group(
    stats: LabelStats,
    seg: Dataset,
    segments: Mapping[str, int],
    volume: Volume,
    spec: ModelSpec,
    uids: Mapping[str, str],
) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    label = stats.label
    uid = tracking_uid(uids, label)
    if uid not in segments:
        raise ValueError(f"model {spec.name}: the SEG has no segment for label {label.number}")
    segment = hd.sr.ReferencedSegment(
        sop_class_uid=seg.SOPClassUID,
        sop_instance_uid=seg.SOPInstanceUID,
        segment_number=segments[uid],
        source_series=hd.sr.SourceSeriesForSegmentation(volume.datasets[0].SeriesInstanceUID),
    )
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=uid, identifier=clip_lo(label.name)),
        referenced_segment=segment,
        finding_type=coded(label.type),
        finding_category=coded(label.category),
        algorithm_id=_algorithm(spec),
        measurements=_measurements(stats, str(volume.datasets[0].Modality), spec),
    )


def _absent_group(
    label: Label, spec: ModelSpec, uids: Mapping[str, str]
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid(uids, label), identifier=clip_lo(label.name)),
        finding_type=coded(label.type),
        finding_category=coded(label.category),
        algorithm_id=_algorithm(spec),
        measurements=[hd.sr.Measurement(name=codes.SCT.Volume, value=0.0, unit=_ML, algorithm_id=_algorithm(spec))],
    )


def _measurements(stats: LabelStats, modality: str, spec: ModelSpec) -> Sequence[hd.sr.Measurement]:
    algorithm = _algorithm(spec)
    measurements = [hd.sr.Measurement(name=codes.SCT.Volume, value=stats.volume_ml, unit=_ML, algorithm_id=algorithm)]
    if modality in _QUANTITIES:
        quantity, unit = _QUANTITIES[modality]
        measurements += [
            hd.sr.Measurement(name=quantity, value=stats.mean, unit=unit, derivation=codes.SCT.Mean),
            hd.sr.Measurement(name=quantity, value=stats.sd, unit=unit, derivation=codes.SCT.StandardDeviation),
        ]
    return measurements


def _algorithm(spec: ModelSpec) -> hd.sr.AlgorithmIdentification:
    """TID 4019 for a group, and for each NUM that has no other modifier: OHIF's SR loader before 3.13 throws on a
    NUM without content items. No Algorithm Manufacturer: dcmqi reads it as a qualitative evaluation (the device
    observer context names the manufacturer)."""
    return hd.sr.AlgorithmIdentification(name=clip_lo(spec.name), version=clip_lo(spec.version))


def encode_classification_sr(
    source: Dataset,
    result: Classification,
    spec: ModelSpec,
    uids: Mapping[str, str],
    *,
    software_version: str,
    revision: int = 1,
    predecessor: Dataset | None = None,
    ood: tuple[float, float] | None = None,
) -> hd.sr.Comprehensive3DSR:
    """TID 1500 report with one TID 1501 group on the source image: the finding Present/Absent (qualitative
    evaluation), the probability and the decision threshold (UCUM "1"), all by the model as observer device.

    `source` is the classified image's header (pixel data not needed); uids needs "sr_series" and "sr_instance".
    `revision` and `predecessor` as for encode_sr.
    """
    group = _classification_group(source, result, spec, uids, ood)
    report = measurement_report(
        spec, _RADIOGRAPHY.get(str(source.get("Modality", "")), codes.SCT.ImagingProcedure), [group]
    )
    with_library(report, [source])
    return written_as_built(sr_document(report, [source], spec, uids, software_version, revision, predecessor))


def _classification_group(
    source: Dataset,
    result: Classification,
    spec: ModelSpec,
    uids: Mapping[str, str],
    ood: tuple[float, float] | None,
) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """The TID 1501 group of a classification: the finding Present/Absent, probability, threshold, OOD score."""
    finding = coded(result.finding)
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(
            uid=derive_uid(uids["sr_series"], "tracking", "finding"), identifier=clip_lo(result.finding.meaning)
        ),
        finding_type=finding,
        algorithm_id=_algorithm(spec),
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
        qualitative_evaluations=[
            hd.sr.QualitativeEvaluation(name=finding, value=codes.SCT.Present if result.present else codes.SCT.Absent)
        ],
        measurements=[
            hd.sr.Measurement(
                name=_PROBABILITY, value=result.probability, unit=_NO_UNITS, algorithm_id=_algorithm(spec)
            ),
            hd.sr.Measurement(name=_THRESHOLD, value=result.threshold, unit=_NO_UNITS, algorithm_id=_algorithm(spec)),
            *([] if ood is None else ood_measurements(ood, spec)),  # the OOD score the image passed
        ],
    )
    return group


def written_as_built(sr: hd.sr.Comprehensive3DSR) -> hd.sr.Comprehensive3DSR:
    """Mark every dataset of `sr` as already in its file's encoding (Explicit VR Little Endian); returns `sr`.

    pydicom corrects ambiguous VRs (US or SS, OB or OW…) before it writes a dataset not read in the encoding it is
    written in, and does so for each sequence item again with all it holds: a 300-slice CT's SR had 14 000 such
    visits for its 2 700 datasets, ~30 % of its writing time. An SR has no element of ambiguous VR (pydicom would
    refuse to write one), so the marks change nothing written. A charset changed later undoes a mark: pydicom then
    checks that dataset as before.
    """
    stack: list[Dataset] = [sr]
    seen: set[int] = set()
    while stack:
        ds = stack.pop()
        if id(ds) in seen:  # the library shares its equal descriptors between entries
            continue
        seen.add(id(ds))
        ds.set_original_encoding(False, True, ds._character_set)  # what pydicom's write_dataset compares
        stack += (item for element in ds.values() if element.VR == "SQ" for item in cast(list[Dataset], element.value))
    return sr


def measurement_report(
    spec: ModelSpec,
    procedure: hd.sr.CodedConcept | Code,
    groups: Sequence[
        hd.sr.MeasurementsAndQualitativeEvaluations | hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
    ],
) -> hd.sr.MeasurementReport:
    """TID 1500 with the model as observer device, for `procedure`, holding `groups`."""
    return hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=_device(spec)),
        procedure_reported=procedure,
        imaging_measurements=groups,
    )


def sr_document(
    report: hd.sr.MeasurementReport,
    evidence: Sequence[Dataset],
    spec: ModelSpec,
    uids: Mapping[str, str],
    software_version: str,
    revision: int,
    predecessor: Dataset | None,
    *,
    description: str | None = None,
) -> hd.sr.Comprehensive3DSR:
    """The Comprehensive 3D SR around a report: preliminary, unverified machine output of the model as device
    (`description`: the series description, else the model's result SR's)."""
    return declare_charset(
        hd.sr.Comprehensive3DSR(
            evidence=list(evidence),
            content=report,
            series_instance_uid=uids["sr_series"],
            series_number=SR_SERIES_NUMBER,
            sop_instance_uid=uids["sr_instance"],
            instance_number=1,
            manufacturer=MANUFACTURER,
            is_complete=True,
            is_final=False,
            is_verified=False,  # unverified machine output: PRELIMINARY
            series_description=description or disclaimed(f"AI {spec.name} {spec.version} {revised('SR', revision)}"),
            manufacturer_model_name=clip_lo(spec.name),
            software_versions=clip_lo(software_version),
            device_serial_number=device_serial_number(spec),
            previous_versions=None if predecessor is None else [predecessor],
        )
    )
