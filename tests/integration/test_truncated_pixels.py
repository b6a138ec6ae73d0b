"""Issue 9 item 9: a JPEG 2000 CT whose data set ends inside its pixel data is refused 0xC000, and the log says why.

pydicom reads a file that ends inside an element of undefined length as a data set without a single element, so the
node used to refuse it as "StudyInstanceUID is not a valid UID" although the UID is valid.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataelem import RawDataElement
from pydicom.uid import CTImageStorage, JPEG2000Lossless
from pynetdicom import AE, _config

from tests.conftest import need
from tests.services import wait_until
from tests.stack import Stack

pytestmark = [pytest.mark.integration]
J2K_CT = "cornerstone3D-testImages/CTImage.dcm_JPEG2000LosslessOnlyTransferSyntax_1.2.840.10008.1.2.4.90.dcm"
PIXEL_DATA = 0x7FE00010


def cut_inside_pixel_data(source: Path, target: Path, *, fragment_bytes: int) -> Path:
    """A copy that ends `fragment_bytes` into the first fragment after the Basic Offset Table (no delimiter)."""
    element = dcmread(source, defer_size=1024).get_item(PIXEL_DATA, keep_deferred=True)
    assert isinstance(element, RawDataElement) and element.length == 0xFFFFFFFF  # encapsulated
    offset_table = int.from_bytes(source.read_bytes()[element.value_tell + 4 : element.value_tell + 8], "little")
    end = element.value_tell + 8 + offset_table + 8 + fragment_bytes  # BOT item, its value, the fragment's header
    target.write_bytes(source.read_bytes()[:end])
    return target


def send_as_is(port: int, path: Path) -> int:
    """C-STORE the file's data set as its bytes, unparsed (as a PACS streaming a damaged file does); the status.

    dcmtk's storescu cannot be used for this: it parses the file first and refuses one that ends inside an item.
    """
    ae = AE(ae_title="PACS")
    ae.add_requested_context(CTImageStorage, JPEG2000Lossless)
    assoc = ae.associate("127.0.0.1", port, ae_title="PACSAI")
    assert assoc.is_established
    try:
        reply = assoc.send_c_store(path)
    finally:
        assoc.release()
    return int(reply.Status) if reply and "Status" in reply else -1


@pytest.mark.catalogue("C3")
def test_a_jpeg_2000_ct_cut_inside_its_pixel_data_is_refused_naming_the_pixel_data(
    stack: Callable[..., Stack], shared: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    need("storescu")
    source = shared / "dicom" / J2K_CT
    cut = cut_inside_pixel_data(source, tmp_path / "cut.dcm", fragment_bytes=5000)
    node = stack(peers="PACS@127.0.0.1:104")
    process = node.start("node")
    monkeypatch.setattr(_config, "STORE_SEND_CHUNKED_DATASET", True)  # send from the file, byte for byte

    assert send_as_is(node.port, cut) == 0xC000
    line = wait_until(
        lambda: next((line for line in process.log().splitlines() if "refused instance" in line), ""), 10, "refusal"
    )
    assert "PixelData is truncated" in line and "0xC000" in line
    assert "not a valid UID" not in process.log()
    node.send([source], "PACS")  # the same CT whole, from dcmtk's storescu: accepted (raises on a failure status)
