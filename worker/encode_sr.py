"""Step 7: findings → highdicom Comprehensive 3D SR (TID 1500 Measurement Report), built but not written.

encode_sr reports a segmentation (one group per label); encode_classification_sr reports one image's classification.
A later result of the same series and model (revision 2, 3, …) names the SR it supersedes in its Predecessor
Documents Sequence (see predecessor_of).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import Comprehensive3DSRStorage

from models.spec import Label, ModelSpec
from worker.classify import Classification
from worker.encode_seg import (
    MANUFACTURER,
    clip_lo,
    coded,
    declare_charset,
    device_serial_number,
    disclaimed,
    present_labels,
    revised,
    tracking_uid,
)
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


@dataclass(frozen=True, slots=True)
class LabelStats:
    """One label's voxel count, volume, and mean and population SD (ddof=0) of the modality values inside it."""

    label: Label
    voxel_count: int
    volume_ml: float
    mean: float
    sd: float


def measure_labels(volume: Volume, label_map: NDArray[np.uint8], spec: ModelSpec) -> tuple[LabelStats, ...]:
    """Stats of every spec label with at least one voxel, by ascending label number (the SEG's segment order)."""
    labels = present_labels(volume, label_map, spec)
    counts, sums, squares = np.zeros(256), np.zeros(256), np.zeros(256)
    for labels_k, values_k in zip(label_map, volume.array, strict=True):  # slice by slice: no volume-sized temporaries
        counts += np.bincount(labels_k.ravel(), minlength=256)
        sums += np.bincount(labels_k.ravel(), weights=values_k.ravel(), minlength=256)
    means = sums / np.maximum(counts, 1)
    for labels_k, values_k in zip(label_map, volume.array, strict=True):  # second pass about the mean: no cancellation
        deviations = values_k.ravel().astype(np.float64) - means[labels_k.ravel()]
        squares += np.bincount(labels_k.ravel(), weights=deviations**2, minlength=256)
    return tuple(
        LabelStats(label=label, voxel_count=int(counts[label.number]),
                   volume_ml=float(counts[label.number]) * volume.voxel_volume_ml, mean=float(means[label.number]),
                   sd=float(np.sqrt(squares[label.number] / counts[label.number])))
        for label in labels
    )


def encode_sr(seg: hd.seg.Segmentation | None, volume: Volume, label_map: NDArray[np.uint8], spec: ModelSpec,
              uids: Mapping[str, str], *, software_version: str, revision: int = 1,
              predecessor: Dataset | None = None) -> hd.sr.Comprehensive3DSR:
    """TID 1500 report with one group per spec label: a TID 1411 group per SEG segment, a 0 mL TID 1501 group otherwise.

    `seg` is None when encode_seg raised NothingFound; the report then says 0 mL for every label.
    `predecessor` is the reference to the SR this one supersedes (predecessor_of), `revision` this result's number.
    """
    stats = measure_labels(volume, label_map, spec)
    if stats and seg is None:
        raise ValueError(f"model {spec.name}: labels were found but no SEG was given")
    segments = {} if seg is None else {str(item.TrackingUID): int(item.SegmentNumber) for item in seg.SegmentSequence}
    found = {s.label.number: s for s in stats}
    groups: list[hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations
                 | hd.sr.MeasurementsAndQualitativeEvaluations] = []
    for label in sorted((lb for lb in spec.labels if lb.number > 0), key=lambda lb: lb.number):
        if label.number in found and seg is not None:
            groups.append(_found_group(found[label.number], seg, segments, volume, spec, uids))
        else:
            groups.append(_absent_group(label, spec, uids))
    name = f"AI {spec.name} {spec.version}"
    modality = str(volume.datasets[0].Modality)
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=_device(spec)),
        procedure_reported=_PROCEDURES.get(modality, codes.SCT.ImagingProcedure), imaging_measurements=groups)
    return declare_charset(hd.sr.Comprehensive3DSR(
        evidence=[*volume.datasets, *([] if seg is None else [seg])], content=report,
        series_instance_uid=uids["sr_series"], series_number=SR_SERIES_NUMBER,
        sop_instance_uid=uids["sr_instance"], instance_number=1, manufacturer=MANUFACTURER,
        is_complete=True, is_final=False, is_verified=False,  # unverified machine output: PRELIMINARY
        series_description=disclaimed(f"{name} {revised('SR', revision)}"), manufacturer_model_name=clip_lo(spec.name),
        software_versions=clip_lo(software_version), device_serial_number=device_serial_number(spec),
        previous_versions=None if predecessor is None else [predecessor],
    ))


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
            uid=device_uid(spec), name=clip_lo(spec.name), manufacturer_name=MANUFACTURER,
            model_name=clip_lo(spec.name), serial_number=device_serial_number(spec)))


def _found_group(stats: LabelStats, seg: hd.seg.Segmentation, segments: Mapping[str, int], volume: Volume,
                 spec: ModelSpec, uids: Mapping[str, str]) -> hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations:
    label = stats.label
    uid = tracking_uid(uids, label)
    if uid not in segments:
        raise ValueError(f"model {spec.name}: the SEG has no segment for label {label.number}")
    segment = hd.sr.ReferencedSegment(
        sop_class_uid=seg.SOPClassUID, sop_instance_uid=seg.SOPInstanceUID, segment_number=segments[uid],
        source_series=hd.sr.SourceSeriesForSegmentation(volume.datasets[0].SeriesInstanceUID))
    return hd.sr.VolumetricROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=uid, identifier=clip_lo(label.name)),
        referenced_segment=segment, finding_type=coded(label.type), finding_category=coded(label.category),
        algorithm_id=_algorithm(spec), measurements=_measurements(stats, str(volume.datasets[0].Modality)))


def _absent_group(label: Label, spec: ModelSpec,
                  uids: Mapping[str, str]) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=tracking_uid(uids, label), identifier=clip_lo(label.name)),
        finding_type=coded(label.type), finding_category=coded(label.category), algorithm_id=_algorithm(spec),
        measurements=[hd.sr.Measurement(name=codes.SCT.Volume, value=0.0, unit=_ML)])


def _measurements(stats: LabelStats, modality: str) -> Sequence[hd.sr.Measurement]:
    measurements = [hd.sr.Measurement(name=codes.SCT.Volume, value=stats.volume_ml, unit=_ML)]
    if modality in _QUANTITIES:
        quantity, unit = _QUANTITIES[modality]
        measurements += [
            hd.sr.Measurement(name=quantity, value=stats.mean, unit=unit, derivation=codes.SCT.Mean),
            hd.sr.Measurement(name=quantity, value=stats.sd, unit=unit, derivation=codes.SCT.StandardDeviation),
        ]
    return measurements


def _algorithm(spec: ModelSpec) -> hd.sr.AlgorithmIdentification:
    return hd.sr.AlgorithmIdentification(name=clip_lo(spec.name), version=clip_lo(spec.version),
                                         manufacturer=MANUFACTURER)


def encode_classification_sr(source: Dataset, result: Classification, spec: ModelSpec, uids: Mapping[str, str], *,
                             software_version: str, revision: int = 1,
                             predecessor: Dataset | None = None) -> hd.sr.Comprehensive3DSR:
    """TID 1500 report with one TID 1501 group on the source image: the finding Present/Absent (qualitative
    evaluation), the probability and the decision threshold (UCUM "1"), all by the model as observer device.

    `source` is the classified image's header (pixel data not needed); uids needs "sr_series" and "sr_instance".
    `revision` and `predecessor` as for encode_sr.
    """
    finding = coded(result.finding)
    group = hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=derive_uid(uids["sr_series"], "tracking", "finding"),
                                                     identifier=clip_lo(result.finding.meaning)),
        finding_type=finding, algorithm_id=_algorithm(spec),
        source_images=[hd.sr.SourceImageForMeasurementGroup.from_source_image(source)],
        qualitative_evaluations=[hd.sr.QualitativeEvaluation(
            name=finding, value=codes.SCT.Present if result.present else codes.SCT.Absent)],
        measurements=[hd.sr.Measurement(name=_PROBABILITY, value=result.probability, unit=_NO_UNITS),
                      hd.sr.Measurement(name=_THRESHOLD, value=result.threshold, unit=_NO_UNITS)])
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_device_context=_device(spec)),
        procedure_reported=_RADIOGRAPHY.get(str(source.get("Modality", "")), codes.SCT.ImagingProcedure),
        imaging_measurements=[group])
    return declare_charset(hd.sr.Comprehensive3DSR(
        evidence=[source], content=report, series_instance_uid=uids["sr_series"], series_number=SR_SERIES_NUMBER,
        sop_instance_uid=uids["sr_instance"], instance_number=1, manufacturer=MANUFACTURER,
        is_complete=True, is_final=False, is_verified=False,  # unverified machine output: PRELIMINARY
        series_description=disclaimed(f"AI {spec.name} {spec.version} {revised('SR', revision)}"),
        manufacturer_model_name=clip_lo(spec.name), software_versions=clip_lo(software_version),
        device_serial_number=device_serial_number(spec),
        previous_versions=None if predecessor is None else [predecessor],
    ))
