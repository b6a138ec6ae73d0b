"""The pretrained model end to end (issue 12 item 3): the real head MR of the corpus (dcm_qa_toshiba, 40 slices) sent
with dcmtk storescu to a real node, routed to mr-brain-mindgrab, run by a real worker, its SEG and SR delivered to a
real Orthanc and read back from there by dcmjs (as OHIF loads them) and dcmqi (as 3D Slicer does).

The brain mask costs 30-60 s of CPU; this is the one slow test of the model.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from tests.checks import check_seg_and_sr
from tests.conftest import need
from tests.services import free_port, start_orthanc, wait_until
from tests.stack import Stack
from tests.viewers import check_seg_in_viewers, check_sr_in_viewers

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ADULT_BRAIN_ML = (1000.0, 1700.0)  # as in tests/integration/test_meshnet.py (measured: 1278 mL)


@pytest.fixture()
def head_mr(shared: Path, tmp_path: Path) -> Path:
    """The 40 slices of the head MR, linked into a folder of their own (the corpus folder holds a LICENSE too)."""
    folder = tmp_path / "head-mr"
    folder.mkdir()
    for path in sorted((shared / "dicom" / "dcm_qa_toshiba").glob("*.dcm")):
        (folder / path.name).symlink_to(path)
    return folder


def results_in(orthanc: Any) -> dict[str, str] | None:
    """Orthanc instance id of the SEG and of the SR once both have arrived, else None."""
    found = {}
    for series in orthanc.request("GET", "/series?expand"):
        modality = series["MainDicomTags"].get("Modality")
        if modality in ("SEG", "SR") and series["Instances"]:
            found[modality] = series["Instances"][0]
    return found if len(found) == 2 else None


def test_head_mr_comes_back_to_orthanc_as_a_brain_mask_viewers_read(
    tmp_path: Path, head_mr: Path, stack: Callable[..., Stack]
) -> None:
    need("Orthanc"), need("storescu"), need("dciodvfy")
    orthanc = start_orthanc(tmp_path / "orthanc", modalities={}, lua=None)  # the PACS results go to, nothing more
    pacsai = stack(peers=f"ORTHANC@127.0.0.1:{orthanc.dicom_port}", port=free_port(), PACSAI_QUIET_PERIOD_S="2")
    pacsai.adopt(orthanc.process)
    pacsai.start("node")
    pacsai.start("worker")
    sources = sorted(head_mr.iterdir())
    pacsai.send(sources, "ORTHANC")  # as the PACS would: its AE title is the allowed peer
    instances = wait_until(lambda: results_in(orthanc), 300, "SEG and SR in Orthanc", 1.0)
    files = {}
    for modality, instance in instances.items():
        files[modality] = tmp_path / f"{modality.lower()}.dcm"
        files[modality].write_bytes(orthanc.request("GET", f"/instances/{instance}/file"))
    pacsai.wait_jobs({"delivered": 1}, timeout_s=60)
    (brain_ml,) = check_seg_and_sr(files["SEG"], files["SR"], head_mr).values()  # geometry, volumes, dciodvfy
    assert ADULT_BRAIN_ML[0] <= brain_ml <= ADULT_BRAIN_ML[1]
    assert check_seg_in_viewers(files["SEG"], sources, tmp_path / "viewers").keys() == {1}
    uids = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in sources}
    groups = {m["trackingId"]: m for m in check_sr_in_viewers(files["SR"], uids, tmp_path / "viewers")}
    assert groups.keys() == {"brain", "OOD check"}  # the mask's group and the OOD check's (score, threshold)
    measurement = groups["brain"]
    assert measurement["trackingId"] == "brain"
    assert measurement["values"][0]["value"] == pytest.approx(brain_ml)
