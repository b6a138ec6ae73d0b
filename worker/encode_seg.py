"""Step 7: label map → highdicom Segmentation (BINARY, uncompressed), built but not written."""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import TypeVar

import highdicom as hd
import numpy as np
import torch
from numpy.typing import NDArray
from pydicom.dataset import Dataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, SegmentationStorage

from models.spec import Code, Label, ModelSpec
from pacsai.errors import ModelError, PacsaiError
from worker import iod_lookups
from worker.load_volume import TEXT_VRS, text_values
from worker.uids import derive_uid
from worker.volume import Volume

MANUFACTURER = "pacsai"
SEG_SERIES_NUMBER = 9901
LO_MAX = 64  # DICOM LO value length
DISCLAIMER = " - not for diagnosis"
_Result = TypeVar("_Result", bound=Dataset)
iod_lookups.install()  # highdicom asks each source image's IOD the same question (worker/iod_lookups.py)


class NothingFound(PacsaiError):
    """The label map holds no voxel of any label: there is no SEG to send, only the SR."""


def encode_seg(
    volume: Volume,
    label_map: NDArray[np.uint8],
    spec: ModelSpec,
    uids: Mapping[str, str],
    *,
    software_version: str,
    omit_empty_frames: bool = True,
    revision: int = 1,
    replaces_earlier: bool = False,
    labels: Sequence[Label] | None = None,
) -> hd.seg.Segmentation:
    """One BINARY segment per label present, one frame per source slice that holds it (every slice when
    omit_empty_frames is false: a destination profile's choice), aligned with the source.

    Segment numbers run 1..n over the present labels in ascending label number (see `present_labels`).
    From `revision` 2 on the descriptions carry "v<n>", and with `replaces_earlier` say that this result replaces
    an earlier one: a SEG has no attribute naming its predecessor (the SR has, see encode_sr). `labels`: the present
    labels when the caller has counted them already (encode_sr.measure_labels), else they are counted here.
    """
    labels = tuple(labels) if labels is not None else present_labels(volume, label_map, spec)
    if not labels:
        raise NothingFound(f"model {spec.name}: the label map holds no label")
    name = f"AI {spec.name} {spec.version}"
    seg = hd.seg.Segmentation(
        source_images=source_images(volume),
        pixel_array=segment_numbers(label_map, labels),
        plane_positions=plane_positions(volume),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=_describe(labels, spec, uids),
        series_instance_uid=uids["seg_series"],
        series_number=SEG_SERIES_NUMBER,
        sop_instance_uid=uids["seg_instance"],
        instance_number=1,
        manufacturer=MANUFACTURER,
        manufacturer_model_name=clip_lo(spec.name),
        software_versions=clip_lo(software_version),
        device_serial_number=device_serial_number(spec),
        transfer_syntax_uid=ExplicitVRLittleEndian,
        omit_empty_frames=omit_empty_frames,
        content_label="AI_SEGMENTATION",
        content_creator_name=content_creator(spec),
        content_description=disclaimed(
            f"{name} v{revision} replaces earlier"
            if replaces_earlier
            else f"{name} {revised('segmentation', revision)}"
        ),
        series_description=disclaimed(f"{name} {revised('SEG', revision)}"),
    )
    return declare_charset(reference_own_frames(seg, volume))


def segment_numbers(label_map: NDArray[np.uint8], labels: Sequence[Label]) -> NDArray[np.uint8]:
    """The label map with each present label's segment number (1..n in `labels` order); the map itself, not a
    volume-sized copy, when the numbers already agree."""
    if all(label.number == number for number, label in enumerate(labels, start=1)):
        return label_map
    lookup = np.zeros(256, dtype=np.uint8)
    for number, label in enumerate(labels, start=1):
        lookup[label.number] = number
    result: NDArray[np.uint8] = lookup[label_map]
    return result


def source_images(volume: Volume) -> list[Dataset]:
    """The source instances as highdicom takes them: the slices' headers, or the one enhanced multi-frame header.

    highdicom reads a multi-frame source's orientation and pixel spacing from its shared functional groups only;
    when the source keeps them per frame (Philips), a copy gets those of the volume's frames as shared ones.
    """
    if not volume.frame_numbers:
        return list(volume.datasets)
    source = copy.deepcopy(volume.datasets[0])
    if not source.get("SharedFunctionalGroupsSequence"):
        source.SharedFunctionalGroupsSequence = [Dataset()]
    shared = source.SharedFunctionalGroupsSequence[0]
    first = source.PerFrameFunctionalGroupsSequence[volume.frame_numbers[0] - 1]
    for keyword in ("PlaneOrientationSequence", "PixelMeasuresSequence"):
        if keyword not in shared and keyword in first:
            shared[keyword] = copy.deepcopy(first[keyword])
    return [source]


def plane_positions(volume: Volume) -> list[hd.PlanePositionSequence] | None:
    """Positions of a multi-frame source's frames in slice order; None: highdicom takes each slice's own."""
    if not volume.frame_numbers:
        return None
    return [
        hd.PlanePositionSequence(hd.CoordinateSystemNames.PATIENT, frame_position(volume, k))
        for k in range(len(volume.frame_numbers))
    ]


def frame_position(volume: Volume, k: int) -> tuple[float, float, float]:
    """ImagePositionPatient of slice k's source frame (per-frame functional group, else shared)."""
    ds = volume.datasets[k]
    groups = ds.PerFrameFunctionalGroupsSequence[volume.frame_numbers[k] - 1]
    if "PlanePositionSequence" not in groups:
        groups = ds.SharedFunctionalGroupsSequence[0]
    x, y, z = (float(v) for v in groups.PlanePositionSequence[0].ImagePositionPatient)
    return x, y, z


def seg_reference(volume: Volume, labels: Sequence[Label], uids: Mapping[str, str]) -> Dataset:
    """What a report needs of the SEG that encode_seg makes from these labels and UIDs, without making it: its study,
    series, SOP class and instance, and each segment's number and tracking UID (so the SR can be built beside the
    SEG, worker/forked.py). tests/unit/test_parallel_encode.py checks the SR built from it equals the SR built from
    the SEG itself."""
    reference = Dataset()
    reference.SOPClassUID = SegmentationStorage  # BINARY, as encode_seg makes it
    reference.SOPInstanceUID = uids["seg_instance"]
    reference.StudyInstanceUID = volume.datasets[0].StudyInstanceUID
    reference.SeriesInstanceUID = uids["seg_series"]
    items = []
    for number, label in enumerate(labels, start=1):  # segment numbers as encode_seg gives them
        item = Dataset()
        item.SegmentNumber = number
        item.TrackingUID = tracking_uid(uids, label)
        items.append(item)
    reference.SegmentSequence = items
    return reference


def reference_own_frames(seg: hd.seg.Segmentation, volume: Volume) -> hd.seg.Segmentation:
    """Each SEG frame's source reference names exactly the frame it was made from.

    highdicom matches a multi-frame source's frames by position and references every match; another stack at the
    same positions (a Philips field map's phase frames) would be referenced too. Keep only the volume's frame.
    """
    if not volume.frame_numbers:
        return seg
    positions = np.asarray([frame_position(volume, k) for k in range(len(volume.frame_numbers))])
    for groups in seg.PerFrameFunctionalGroupsSequence:
        offsets = np.linalg.norm(
            positions - np.asarray(groups.PlanePositionSequence[0].ImagePositionPatient, dtype=np.float64), axis=1
        )
        number = volume.frame_numbers[int(np.argmin(offsets))]
        for derivation in groups.get("DerivationImageSequence", []):
            items = [item for item in derivation.SourceImageSequence if int(item.ReferencedFrameNumber) == number]
            if not items:
                raise ModelError("a SEG frame does not reference the source frame it was made from")
            derivation.SourceImageSequence = items
    return seg


def present_labels(volume: Volume, label_map: NDArray[np.uint8], spec: ModelSpec) -> tuple[Label, ...]:
    """Spec labels with at least one voxel, by ascending label number; a map that does not fit is a ModelError."""
    check_label_map(volume, label_map, spec)
    return labels_counted(value_counts(label_map), spec)


def check_label_map(volume: Volume, label_map: NDArray[np.uint8], spec: ModelSpec) -> None:
    """A label map that is not uint8 and shaped like the volume is a ModelError."""
    if label_map.shape != volume.array.shape or label_map.dtype != np.uint8:
        raise ModelError(
            f"model {spec.name}: label map is {label_map.dtype} {label_map.shape}, expected uint8 {volume.array.shape}"
        )


def labels_counted(counts: NDArray[np.int64] | NDArray[np.float64], spec: ModelSpec) -> tuple[Label, ...]:
    """Spec labels whose count (voxels of each value 0..255) is not 0, by ascending number; a counted value the spec
    does not define is a ModelError."""
    known = {label.number: label for label in spec.labels}
    unknown = sorted(int(v) for v in np.flatnonzero(counts[1:]) + 1 if int(v) not in known)
    if unknown:
        raise ModelError(f"model {spec.name}: label map holds values {unknown} that its spec does not define")
    return tuple(known[number] for number in sorted(known) if number > 0 and counts[number] > 0)


def value_counts(label_map: NDArray[np.uint8]) -> NDArray[np.int64]:
    """Voxels of each value 0..255. torch counts uint8 as it is (~40 ms for 300 x 512², one thread); numpy's
    bincount first widens every voxel to int64 (~90 ms plane by plane, 630 MB at once)."""
    voxels = torch.from_numpy(np.require(label_map, requirements="W"))  # torch takes writable arrays only
    counts: NDArray[np.int64] = torch.bincount(voxels.reshape(-1), minlength=256).numpy()
    return counts


def tracking_uid(uids: Mapping[str, str], label: Label) -> str:
    """Tracking UID of one label's finding; the SEG segment and the SR measurement group share it."""
    return derive_uid(uids["seg_series"], "tracking", str(label.number))


def content_creator(spec: ModelSpec) -> str:
    """ContentCreatorName (type 2, which dcmqi warns about when empty): the model as a person name, PACSAI^<model>."""
    model = "".join(" " if char in "^=\\" else char for char in spec.name)  # PN delimiters
    return f"{MANUFACTURER.upper()}^{model}"[:LO_MAX]  # one component group holds 64 characters


def device_serial_number(spec: ModelSpec) -> str:
    """The model's 'serial number': the start of its weights' sha256, which names the exact weights run."""
    return spec.weights_sha256[:16] or spec.version


def algorithm_identification(spec: ModelSpec) -> hd.AlgorithmIdentificationSequence:
    """The model as an AI algorithm (family DCM 123110 'Artificial Intelligence')."""
    return hd.AlgorithmIdentificationSequence(
        name=clip_lo(spec.name),
        family=codes.cid7162.ArtificialIntelligence,
        version=clip_lo(spec.version),
        source=MANUFACTURER,
    )


def coded(code: Code) -> hd.sr.CodedConcept:
    """Our Code as a highdicom coded concept."""
    return hd.sr.CodedConcept(value=code.value, scheme_designator=code.scheme, meaning=code.meaning)


def _describe(labels: Sequence[Label], spec: ModelSpec, uids: Mapping[str, str]) -> list[hd.seg.SegmentDescription]:
    algorithm = algorithm_identification(spec)
    return [
        hd.seg.SegmentDescription(
            segment_number=segment_number,
            segment_label=clip_lo(label.name),
            segmented_property_category=coded(label.category),
            segmented_property_type=coded(label.type),
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
            algorithm_identification=algorithm,
            tracking_uid=tracking_uid(uids, label),
            tracking_id=clip_lo(label.name),
            display_color=hd.color.CIELabColor.from_rgb(*label.colour_rgb),
        )
        for segment_number, label in enumerate(labels, start=1)
    ]


def clip_lo(text: str) -> str:
    """Cut text to the 64 characters a DICOM LO value may hold."""
    return text[:LO_MAX]


def disclaimed(text: str) -> str:
    """text + " - not for diagnosis" within one LO value: a long text is cut, never the disclaimer."""
    return text[: LO_MAX - len(DISCLAIMER)] + DISCLAIMER


def revised(what: str, revision: int) -> str:
    """`what` for the first result of a series and model ("SEG"), "SEG v2" for the one superseding it, and so on."""
    return what if revision <= 1 else f"{what} v{revision}"


def declare_charset(ds: _Result) -> _Result:
    """Declare ISO_IR 192 (UTF-8) when a text value is not ASCII and UTF-8 is not declared yet; returns `ds`.

    A result mixes the source's patient text (UTF-8 once loaded, see load.utf8_text) with ours (model and label
    names from a spec). A source in the default repertoire declares no character set, so without this a non-ASCII
    name of ours would be written as "?", or as undeclared latin-1.
    """
    if ds.get("SpecificCharacterSet") == "ISO_IR 192" or all(
        _is_ascii(element.value) for element in ds.iterall() if element.VR in TEXT_VRS
    ):
        return ds
    ds.decode()  # values still held as bytes are read with the old declaration before it changes
    ds.SpecificCharacterSet = "ISO_IR 192"
    return ds


def _is_ascii(value: object) -> bool:
    return all(v is None or (v.isascii() if isinstance(v, bytes) else str(v).isascii()) for v in text_values(value))
