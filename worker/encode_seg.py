"""Step 7: label map → highdicom Segmentation (BINARY, uncompressed), built but not written."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import highdicom as hd
import numpy as np
from numpy.typing import NDArray
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian

from models.spec import Code, Label, ModelSpec
from worker.errors import ModelError, PacsaiError
from worker.uids import derive_uid
from worker.volume import Volume

MANUFACTURER = "pacsai"
SEG_SERIES_NUMBER = 9901
_LO_MAX = 64  # DICOM LO value length


class NothingFound(PacsaiError):
    """The label map holds no voxel of any label: there is no SEG to send, only the SR."""


def encode_seg(volume: Volume, label_map: NDArray[np.uint8], spec: ModelSpec, uids: Mapping[str, str], *,
               software_version: str, omit_empty_frames: bool = True) -> hd.seg.Segmentation:
    """One BINARY segment per label present, one frame per source slice that holds it (every slice when
    omit_empty_frames is false: a destination profile's choice), aligned with the source.

    Segment numbers run 1..n over the present labels in ascending label number (see `present_labels`).
    """
    labels = present_labels(volume, label_map, spec)
    if not labels:
        raise NothingFound(f"model {spec.name}: the label map holds no label")
    lookup = np.zeros(256, dtype=np.uint8)
    for segment_number, label in enumerate(labels, start=1):
        lookup[label.number] = segment_number
    name = f"AI {spec.name} {spec.version}"
    return hd.seg.Segmentation(
        source_images=list(volume.datasets), pixel_array=lookup[label_map],
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=_describe(labels, spec, uids),
        series_instance_uid=uids["seg_series"], series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=uids["seg_instance"], instance_number=1,
        manufacturer=MANUFACTURER, manufacturer_model_name=clip_lo(spec.name),
        software_versions=clip_lo(software_version),
        device_serial_number=device_serial_number(spec), transfer_syntax_uid=ExplicitVRLittleEndian,
        omit_empty_frames=omit_empty_frames, content_label="AI_SEGMENTATION",
        content_description=clip_lo(f"{name} segmentation - not for diagnosis"),
        series_description=clip_lo(f"{name} SEG - not for diagnosis"),
    )


def present_labels(volume: Volume, label_map: NDArray[np.uint8], spec: ModelSpec) -> tuple[Label, ...]:
    """Spec labels with at least one voxel, by ascending label number; a map that does not fit is a ModelError."""
    if label_map.shape != volume.array.shape or label_map.dtype != np.uint8:
        raise ModelError(f"model {spec.name}: label map is {label_map.dtype} {label_map.shape}, "
                         f"expected uint8 {volume.array.shape}")
    counts = sum((np.bincount(plane.ravel(), minlength=256) for plane in label_map), np.zeros(256, np.int64))
    known = {label.number: label for label in spec.labels}
    unknown = sorted(int(v) for v in np.flatnonzero(counts[1:]) + 1 if int(v) not in known)
    if unknown:
        raise ModelError(f"model {spec.name}: label map holds values {unknown} that its spec does not define")
    return tuple(known[number] for number in sorted(known) if number > 0 and counts[number] > 0)


def tracking_uid(uids: Mapping[str, str], label: Label) -> str:
    """Tracking UID of one label's finding; the SEG segment and the SR measurement group share it."""
    return derive_uid(uids["seg_series"], "tracking", str(label.number))


def device_serial_number(spec: ModelSpec) -> str:
    """The model's 'serial number': the start of its weights' sha256, which names the exact weights run."""
    return spec.weights_sha256[:16] or spec.version


def algorithm_identification(spec: ModelSpec) -> hd.AlgorithmIdentificationSequence:
    """The model as an AI algorithm (family DCM 123110 'Artificial Intelligence')."""
    return hd.AlgorithmIdentificationSequence(
        name=clip_lo(spec.name), family=codes.cid7162.ArtificialIntelligence, version=clip_lo(spec.version),
        source=MANUFACTURER)


def coded(code: Code) -> hd.sr.CodedConcept:
    """Our Code as a highdicom coded concept."""
    return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def _describe(labels: Sequence[Label], spec: ModelSpec, uids: Mapping[str, str]) -> list[hd.seg.SegmentDescription]:
    algorithm = algorithm_identification(spec)
    return [
        hd.seg.SegmentDescription(
            segment_number=segment_number, segment_label=clip_lo(label.name),
            segmented_property_category=coded(label.category), segmented_property_type=coded(label.type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC, algorithm_identification=algorithm,
            tracking_uid=tracking_uid(uids, label), tracking_id=clip_lo(label.name),
            display_color=hd.color.CIELabColor.from_rgb(*label.colour_rgb),
        )
        for segment_number, label in enumerate(labels, start=1)
    ]


def clip_lo(text: str) -> str:
    """Cut text to the 64 characters a DICOM LO value may hold."""
    return text[:_LO_MAX]
