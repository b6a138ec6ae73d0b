"""What a radiologist's viewer would send back: an edited copy of our SEG, or a KOS rejecting a result; and the
Dice and volume of two SEGs computed here with numpy from pydicom's frames alone (independently of pacsai)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import numpy.typing as npt
from pydicom import Dataset, dcmread
from pydicom.sr.codedict import codes
from pydicom.uid import generate_uid

Mask = npt.NDArray[np.bool_]


def sources_of(seg: hd.seg.Segmentation, ct_dir: Path) -> list[Dataset]:
    """The CT datasets the SEG references, in its order."""
    by_uid = {str(ds.SOPInstanceUID): ds for ds in (dcmread(p) for p in sorted(ct_dir.iterdir()))}
    return [by_uid[str(sop)] for _, _, sop in seg.get_source_image_uids()]


def make_seg(
    sources: Sequence[Dataset],
    masks: npt.NDArray[np.bool_],
    descriptions: Sequence[hd.seg.SegmentDescription],
    *,
    creator: str = "READER^A",
) -> hd.seg.Segmentation:
    """A binary SEG of `masks` (sources, rows, columns, segments) over `sources`, as a viewer would write it."""
    return hd.seg.Segmentation(
        source_images=list(sources),
        pixel_array=masks.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=list(descriptions),
        series_instance_uid=generate_uid(),
        series_number=901,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="Test Viewer",
        manufacturer_model_name="editor",
        software_versions="1.0",
        device_serial_number="1",
        content_creator_name=creator,
    )


def manual(description: hd.seg.SegmentDescription, number: int, label: str = "") -> hd.seg.SegmentDescription:
    """The same segment (category and type), drawn by hand."""
    return hd.seg.SegmentDescription(
        segment_number=number,
        segment_label=label or str(description.segment_label),
        segmented_property_category=description.segmented_property_category,
        segmented_property_type=description.segmented_property_type,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
    )


def edit_seg(ours_path: Path, ct_dir: Path, edit: Callable[[Mask], Mask], segment: int) -> hd.seg.Segmentation:
    """Our SEG with `edit` applied to segment number `segment`'s masks (sources, rows, columns)."""
    ours = hd.seg.segread(ours_path)
    sources = sources_of(ours, ct_dir)
    numbers = list(ours.segment_numbers)
    uids = [str(ds.SOPInstanceUID) for ds in sources]
    masks = ours.get_pixels_by_source_instance(uids, segment_numbers=numbers, assert_missing_frames_are_empty=True)
    masks = masks > 0
    index = numbers.index(segment)
    masks[..., index] = edit(masks[..., index])
    descriptions = [manual(ours.get_segment_description(n), i) for i, n in enumerate(numbers, start=1)]
    return make_seg(sources, masks, descriptions)


def erase_half(mask: Mask) -> Mask:
    """Erase the segment on the first half of the slices that hold it."""
    edited = mask.copy()
    slices = [i for i in range(mask.shape[0]) if mask[i].any()]
    for i in slices[: len(slices) // 2]:
        edited[i] = False
    return edited


def frames_by_code(ds: Dataset) -> dict[str, dict[str, Mask]]:
    """'SCHEME:VALUE' of each segment's property type → {source SOP Instance UID: frame mask}, from pydicom only."""
    codes_of = {
        int(item.SegmentNumber): "{0.CodingSchemeDesignator}:{0.CodeValue}".format(
            item.SegmentedPropertyTypeCodeSequence[0]
        )
        for item in ds.SegmentSequence
    }
    pixels = ds.pixel_array.reshape(int(ds.NumberOfFrames), int(ds.Rows), int(ds.Columns)) > 0
    result: dict[str, dict[str, Mask]] = {code: {} for code in codes_of.values()}
    for frame, item in enumerate(ds.PerFrameFunctionalGroupsSequence):
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        source = str(item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID)
        result[codes_of[number]][source] = pixels[frame]
    return result


def numpy_dice(a: dict[str, Mask], b: dict[str, Mask]) -> float:
    total = sum(int(m.sum()) for m in a.values()) + sum(int(m.sum()) for m in b.values())
    overlap = sum(int((m & b[uid]).sum()) for uid, m in a.items() if uid in b)
    return 1.0 if total == 0 else 2.0 * overlap / total


def voxels(masks: dict[str, Mask]) -> int:
    return sum(int(m.sum()) for m in masks.values())


def rejection(result: Dataset, *, safety: bool = False) -> hd.ko.KeyObjectSelectionDocument:
    """A KOS titled 'Rejected for Quality Reasons' (or Patient Safety) naming `result`, as a viewer would make it."""
    title = codes.DCM.RejectedForPatientSafetyReasons if safety else codes.DCM.RejectedForQualityReasons
    return hd.ko.KeyObjectSelectionDocument(
        evidence=[result],
        content=hd.ko.KeyObjectSelection(document_title=title, referenced_objects=[result]),
        series_instance_uid=generate_uid(),
        series_number=902,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="Test Viewer",
    )
