"""The mr-head-brain-mask routing rule over every MR series of the corpus: it sends the head MR volume of
dcm_qa_toshiba to mr-brain-mindgrab and nothing else (dcm_qa_nih's GE fMRI, 150 instances at 15 positions, is a time
series; it used to match and was then refused only because its anonymised age is 0)."""

from __future__ import annotations

from collections import defaultdict
from pathlib import Path

import pytest
from pydicom import dcmread

from dicom_node.route import SeriesHeader, load_rules, route
from pacsai.settings import Settings

pytestmark = pytest.mark.integration


def mr_series(dicom: Path) -> dict[str, list[str]]:
    """Series Instance UID → relative paths of its MR files, from the corpus manifest."""
    series: dict[str, list[str]] = defaultdict(list)
    for line in (dicom / "MANIFEST.tsv").read_text(encoding="utf-8").splitlines()[1:]:
        path, _, modality, _, series_uid, *_ = line.split("\t")
        if modality == "MR":
            series[series_uid].append(path)
    return series


def test_only_the_head_mr_volume_is_routed_to_the_brain_mask(shared: Path) -> None:
    rules = load_rules(Settings.from_env({"PACSAI_DATA_DIR": "/tmp"}).node.routes_file)
    routed = []
    for paths in mr_series(shared / "dicom").values():
        ds = dcmread(shared / "dicom" / paths[0], stop_before_pixels=True)
        header = SeriesHeader(
            modality="MR",
            sop_class=str(ds.SOPClassUID),
            body_part=str(ds.get("BodyPartExamined", "")),
            series_description=str(ds.get("SeriesDescription", "")),
            instances=len(paths),
            calling_ae="STORESCU",
            called_ae="PACSAI",
        )
        routed += [(Path(paths[0]).parent.as_posix(), model) for model in route(rules, header)]
    assert routed == [("dcm_qa_toshiba", "mr-brain-mindgrab")]
