"""worker.iod_lookups: highdicom's IOD lookups memoised give highdicom's own answers."""

from __future__ import annotations

import itertools
from typing import Any

from highdicom import _standard_utils, base
from highdicom._standard_utils import does_iod_have_pixel_data, is_multiframe_image
from pydicom.dataset import Dataset

from worker import encode_seg, iod_lookups

CT = "1.2.840.10008.5.1.4.1.1.2"
ENHANCED_CT = "1.2.840.10008.5.1.4.1.1.2.1"
SEG = "1.2.840.10008.5.1.4.1.1.66.4"
SR = "1.2.840.10008.5.1.4.1.1.88.34"
MR = "1.2.840.10008.5.1.4.1.1.4"


def test_encode_seg_installs_it_where_highdicom_looks_it_up() -> None:
    assert encode_seg is not None  # importing it installed the memoised lookup
    for module in (_standard_utils, base):
        assert hasattr(module.is_attribute_in_iod, "uncached")
    iod_lookups.install()  # idempotent: not wrapped twice
    installed: Any = _standard_utils.is_attribute_in_iod
    assert not hasattr(installed.uncached, "uncached")


def test_memoised_answers_equal_highdicoms_own() -> None:
    fast: Any = _standard_utils.is_attribute_in_iod
    slow = fast.uncached
    attributes = ("NumberOfFrames", "PixelData", "ContentDate", "FloatPixelData", "ImageOrientationPatient")
    exclusions = (None, ["IconImageSequence"], ("IconImageSequence", "ReferencedImageSequence"))
    for attribute, sop_class, excluded in itertools.product(attributes, (CT, ENHANCED_CT, SEG, SR, MR), exclusions):
        expected = slow(attribute, sop_class, exclude_path_elements=None if excluded is None else list(excluded))
        assert fast(attribute, sop_class, excluded) is expected
        assert fast(attribute, sop_class, exclude_path_elements=excluded) is expected  # from the cache
    assert fast.cache_info().hits > 0


def test_highdicoms_helpers_give_the_same_answers() -> None:
    single, enhanced, report = Dataset(), Dataset(), Dataset()
    single.SOPClassUID, enhanced.SOPClassUID, report.SOPClassUID = CT, ENHANCED_CT, SR
    assert (is_multiframe_image(single), is_multiframe_image(enhanced)) == (False, True)
    assert (does_iod_have_pixel_data(CT), does_iod_have_pixel_data(SR)) == (True, False)
