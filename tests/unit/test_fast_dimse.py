"""The hand-encoded C-STORE response and file meta information equal pynetdicom's and pydicom's bytes."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_file_meta_info
from pydicom.uid import UID, ExplicitVRLittleEndian
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_messages import C_STORE_RSP
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta
from pynetdicom.presentation import PresentationContext

from dicom_node import fast_dimse

CT = "1.2.840.10008.5.1.4.1.1.2"
SEG = "1.2.840.10008.5.1.4.1.1.66.4"


def response(message_id: int, status: int, instance: str | None, sop_class: str | None = CT) -> C_STORE:
    """A C-STORE response as pynetdicom's storage SCP fills it in."""
    rsp = C_STORE()
    rsp.MessageIDBeingRespondedTo = message_id
    rsp.AffectedSOPInstanceUID = instance
    rsp.AffectedSOPClassUID = sop_class
    rsp.Status = status
    return rsp


def pynetdicom_pdvs(primitive: C_STORE, max_pdu: int) -> list[tuple[int, bytes]]:
    message = C_STORE_RSP()
    message.primitive_to_message(primitive)
    return [pdv for pdata in message.encode_msg(3, max_pdu) for pdv in pdata.presentation_data_value_list]


@pytest.mark.parametrize(
    ("message_id", "status", "instance", "sop_class"),
    [
        (1, 0x0000, "1.2.3.4", CT),  # even-length instance UID
        (65535, 0xA700, "1.2.3.45", CT),  # odd length: NUL padding; largest message ID; out of resources
        (7, 0xB007, "1.2.826.0.1.3680043.8.498.12345678901234567890123456789012345678", SEG),
        (2, 0x0000, None, None),  # the optional UIDs left out
    ],
)
def test_store_response_equals_pynetdicoms_encoding(
    message_id: int, status: int, instance: str | None, sop_class: str | None
) -> None:
    primitive = response(message_id, status, instance, sop_class)
    command = fast_dimse.store_response_command(primitive)
    assert command is not None
    assert [(3, b"\x03" + command)] == pynetdicom_pdvs(primitive, 16384)


def test_responses_outside_the_fixed_layout_go_pynetdicoms_way() -> None:
    with_comment = response(1, 0xC000, "1.2.3.4")
    with_comment.ErrorComment = "cannot understand"  # type: ignore[assignment]
    with_element = response(1, 0xA900, "1.2.3.4")
    with_element.OffendingElement = [0x00080018]  # type: ignore[assignment]
    request = C_STORE()
    request.MessageID = 1
    request.AffectedSOPInstanceUID = "1.2.3.4"
    request.AffectedSOPClassUID = CT
    no_status = response(1, 0, "1.2.3.4")
    no_status.Status = None
    for primitive in (with_comment, with_element, request, no_status):
        assert fast_dimse.store_response_command(primitive) is None


def wire_bytes(status: int, max_pdu: int, *, listening: bool, fast: bool, monkeypatch: pytest.MonkeyPatch) -> bytes:
    """What a real pynetdicom SCU receives from a real pynetdicom SCP for one C-STORE (every PDU after the
    A-ASSOCIATE-AC, up to the release), with or without the fast path; what EVT_DIMSE_SENT heard is checked too."""
    with monkeypatch.context() as patch:
        if fast:
            patch.setattr(DIMSEServiceProvider, "send_msg", fast_dimse.send_msg)
        heard: list[str] = []
        scp = AE(ae_title="SCP")
        scp.add_supported_context(CT, ExplicitVRLittleEndian)
        handlers: list[Any] = [(evt.EVT_C_STORE, lambda event: status)]
        if listening:
            handlers.append((evt.EVT_DIMSE_SENT, lambda event: heard.append(type(event.message).__name__)))
        server = scp.start_server(("127.0.0.1", 0), block=False, evt_handlers=handlers)
        assert server is not None
        try:
            received: list[bytes] = []
            scu = AE(ae_title="SCU")
            scu.add_requested_context(CT, ExplicitVRLittleEndian)
            scu.maximum_pdu_size = max_pdu
            port = server.server_address[1]
            assoc = scu.associate(
                "127.0.0.1", port, ae_title="SCP", evt_handlers=[(evt.EVT_DATA_RECV, lambda e: received.append(e.data))]
            )
            assert assoc.is_established
            answer = assoc.send_c_store(instance(), msg_id=9)
            assoc.release()
        finally:
            server.shutdown()
        assert answer.Status == status
        assert heard == (["C_STORE_RSP"] if listening else [])
        return b"".join(received[1:])  # after the A-ASSOCIATE-AC (it carries pynetdicom's implementation data)


def instance() -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.99"
    ds.StudyInstanceUID = "1.2.826.0.1.3680043.8.498.98"
    ds.SeriesInstanceUID = "1.2.826.0.1.3680043.8.498.97"
    ds.Modality = "CT"
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


@pytest.mark.parametrize(
    ("status", "max_pdu", "listening"),
    [(0x0000, 16384, False), (0xB007, 0, False), (0x0000, 128, False), (0x0000, 16384, True)],
    ids=["success", "warning-unlimited-pdu", "pdu-too-small-for-one-fragment", "evt-dimse-sent-bound"],
)
def test_a_real_scu_receives_the_same_bytes(
    status: int, max_pdu: int, listening: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Fast, or pynetdicom's way when the response must be fragmented or is listened to: the wire does not change."""
    ours = wire_bytes(status, max_pdu, listening=listening, fast=True, monkeypatch=monkeypatch)
    theirs = wire_bytes(status, max_pdu, listening=listening, fast=False, monkeypatch=monkeypatch)
    assert ours == theirs
    assert b"1.2.826.0.1.3680043.8.498.99" in ours


@pytest.mark.parametrize(
    ("sop_class", "instance", "syntax"),
    [
        (CT, "1.2.3.4", "1.2.840.10008.1.2.1"),
        (SEG, "1.2.826.0.1.3680043.8.498.123", "1.2.840.10008.1.2.4.90"),
        (CT, "1.2.3", "1.2.840.10008.1.2"),
    ],
)
def test_file_meta_equals_pydicoms_encoding(sop_class: str, instance: str, syntax: str) -> None:
    ours, theirs = DicomBytesIO(), DicomBytesIO()
    fast_dimse.write_meta(
        ours, fast_dimse.file_meta(sop_class_uid=sop_class, sop_instance_uid=instance, transfer_syntax=syntax)
    )
    write_file_meta_info(
        theirs,
        create_file_meta(sop_class_uid=UID(sop_class), sop_instance_uid=UID(instance), transfer_syntax=UID(syntax)),
    )
    assert ours.getvalue() == theirs.getvalue()


def test_file_meta_with_a_non_ascii_uid_is_left_to_pydicom() -> None:
    ours, theirs = DicomBytesIO(), DicomBytesIO()
    meta = {
        "sop_class_uid": UID(CT),
        "sop_instance_uid": UID("1.2.3.\u00e9"),
        "transfer_syntax": UID("1.2.840.10008.1.2.1"),
    }
    fast_dimse.write_meta(ours, fast_dimse.file_meta(**meta))
    write_file_meta_info(theirs, create_file_meta(**meta))
    assert ours.getvalue() == theirs.getvalue()


def test_context_copies_equal_deep_copies_and_share_nothing_mutable(monkeypatch: pytest.MonkeyPatch) -> None:
    ae = AE()
    ae.supported_contexts = StoragePresentationContexts
    ae.add_supported_context(CT, [ExplicitVRLittleEndian], scu_role=True, scp_role=True)
    contexts = ae.supported_contexts
    deep = copy.deepcopy(contexts)
    monkeypatch.setattr(PresentationContext, "__deepcopy__", fast_dimse.copy_context, raising=False)
    ours = copy.deepcopy(contexts)
    assert [vars(c) for c in ours] == [vars(c) for c in deep] == [vars(c) for c in contexts]
    assert all(a is not b and a._transfer_syntax is not b._transfer_syntax for a, b in zip(ours, contexts, strict=True))
    ours[0].add_transfer_syntax("1.2.840.10008.1.2.4.50")
    ours[0].context_id = 5
    assert "1.2.840.10008.1.2.4.50" not in contexts[0].transfer_syntax
    assert contexts[0].context_id is None
