"""Agreement of our SEG with a radiologist's corrected one: per segment Dice and volumes, matched by code or label."""

from __future__ import annotations

from collections import Counter

import highdicom as hd
import numpy as np
import numpy.typing as npt

from pacsai.feedback_table import SegmentAgreement

Masks = dict[str, npt.NDArray[np.bool_]]  # source SOP Instance UID → that slice's 2-D mask (rows, columns)


def compare(ours: hd.seg.Segmentation, theirs: hd.seg.Segmentation) -> tuple[SegmentAgreement, ...]:
    """Every segment of either SEG, ours first in segment order: Dice (1.0 when both are empty) and mL of each.

    A segment is matched by its Segmented Property Type code (scheme and value) when that code names one segment
    in its SEG, else by its label (case-insensitive); one the other SEG lacks counts as empty there.
    """
    mine, corrected = segments_of(ours), segments_of(theirs)
    ours_ml, theirs_ml = voxel_ml(ours), voxel_ml(theirs)
    result = []
    for key in [*mine, *(k for k in corrected if k not in mine)]:
        label, a = mine.get(key, ("", {}))
        other_label, b = corrected.get(key, ("", {}))
        result.append(
            SegmentAgreement(
                label or other_label,
                dice(a, b),
                round(_count(a) * ours_ml, 3),
                round(_count(b) * theirs_ml, 3),
            )
        )
    return tuple(result)


def dice(a: Masks, b: Masks) -> float:
    """2|A∩B| / (|A|+|B|) over all slices of both; 1.0 when both are empty."""
    total = _count(a) + _count(b)
    if total == 0:
        return 1.0
    overlap = sum(int(np.count_nonzero(mask & b[uid])) for uid, mask in a.items() if uid in b)
    return round(2.0 * overlap / total, 6)


def _count(masks: Masks) -> int:
    return sum(int(np.count_nonzero(mask)) for mask in masks.values())


def segments_of(seg: hd.seg.Segmentation) -> dict[str, tuple[str, Masks]]:
    """Match key → (label, masks by source instance) for every segment of the SEG."""
    sources = [str(sop) for _, _, sop in seg.get_source_image_uids()]
    numbers = list(seg.segment_numbers)
    pixels = seg.get_pixels_by_source_instance(
        sources,
        segment_numbers=numbers,
        assert_missing_frames_are_empty=True,
        ignore_spatial_locations=True,
        skip_overlap_checks=True,
    )
    keys = match_keys(seg)
    return {
        keys[number]: (
            str(seg.get_segment_description(number).segment_label),
            {uid: pixels[i, :, :, index] > 0 for i, uid in enumerate(sources)},
        )
        for index, number in enumerate(numbers)
    }


def match_keys(seg: hd.seg.Segmentation) -> dict[int, str]:
    """Segment number → 'code:SCHEME:VALUE' when that code is unique in the SEG, else 'label:<label>'."""
    codes, labels = {}, {}
    for number in seg.segment_numbers:
        description = seg.get_segment_description(number)
        code = description.segmented_property_type
        codes[number] = f"code:{code.scheme_designator}:{code.value}"
        labels[number] = f"label:{str(description.segment_label).strip().lower()}"
    repeated = Counter(codes.values())
    return {n: codes[n] if repeated[codes[n]] == 1 else labels[n] for n in codes}


def voxel_ml(seg: hd.seg.Segmentation) -> float:
    """One voxel's volume in mL: Pixel Spacing × the step between slices, / 1000.

    The step is the smallest distance along the normal between the SEG's frame positions (slices are often closer
    than their Slice Thickness); with frames on one slice only, Spacing Between Slices, else Slice Thickness.
    """
    measures = seg.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
    row_mm, column_mm = (float(v) for v in measures.PixelSpacing)
    depth = slice_step_mm(seg) or float(measures.get("SpacingBetweenSlices") or measures.get("SliceThickness") or 1)
    return row_mm * column_mm * abs(depth) / 1000.0


def slice_step_mm(seg: hd.seg.Segmentation) -> float | None:
    """The smallest distance between two of the SEG's frame planes; None when all frames lie in one plane."""
    shared = seg.SharedFunctionalGroupsSequence[0]
    orientation = np.array(shared.PlaneOrientationSequence[0].ImageOrientationPatient, dtype=float)
    normal = np.cross(orientation[:3], orientation[3:])
    positions = sorted(
        {
            round(float(np.dot(normal, np.array(item.PlanePositionSequence[0].ImagePositionPatient, dtype=float))), 3)
            for item in seg.PerFrameFunctionalGroupsSequence
        }
    )
    steps = [b - a for a, b in zip(positions, positions[1:], strict=False) if b - a > 1e-3]
    return min(steps) if steps else None
