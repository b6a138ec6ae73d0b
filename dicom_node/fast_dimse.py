"""The two fixed-layout messages of every received instance, encoded directly: the C-STORE response and the stored
file's meta information.

For each instance pynetdicom builds the response from a deep copy of a command-set template, validates every element,
encodes the set twice (once for its group length) and then sends it; and it writes the received file's meta
information through a pydicom FileMetaDataset. Together that was about a third of the node's Python time per instance
(yappi, CPU clock). Both are a handful of elements in a fixed order, so they are encoded here, byte for byte what
pynetdicom and pydicom write (unit tests compare them on the same inputs). Anything outside that layout goes
pynetdicom's way: a response with an error comment or an offending element, a peer whose maximum PDU cannot take the
response in one fragment, or an association where something listens for EVT_DIMSE_SENT (which wants pynetdicom's
message object).

A third piece is per association: pynetdicom deep-copies the AE's supported presentation contexts for each one it
accepts (172 contexts: ~50 ms of CPU per association, for a PACS that opens one per series). A context holds a
list of immutable UIDs and a few flags, so a copy of the object with its own list is the same as the deep copy.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from typing import Any

from pydicom.filewriter import write_file_meta_info
from pynetdicom import PYNETDICOM_IMPLEMENTATION_UID, PYNETDICOM_IMPLEMENTATION_VERSION, dimse_messages, evt
from pynetdicom.dimse import DIMSEServiceProvider
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import create_file_meta
from pynetdicom.pdu_primitives import P_DATA
from pynetdicom.presentation import PresentationContext

_C_STORE_RSP = 0x8001
_NO_DATA_SET = 0x0101
_LAST_COMMAND_FRAGMENT = b"\x03"  # message control header: command information, last fragment
_PDV_HEADER_BYTES = 6  # what pynetdicom subtracts from the peer's maximum PDU length per fragment
_pynetdicom_send_msg = DIMSEServiceProvider.send_msg


def _implicit(group: int, element: int, value: bytes) -> bytes:
    return struct.pack("<HHI", group, element, len(value)) + value


def _uid(value: Any) -> bytes:
    """A UI value as pydicom writes it: ASCII, padded to an even length with a NUL byte."""
    encoded = str(value).encode("ascii")
    return encoded + b"\x00" if len(encoded) % 2 else encoded


def store_response_command(primitive: Any) -> bytes | None:
    """The encoded command set of a C-STORE response, or None when it is not of the fixed layout encoded here."""
    if (
        type(primitive) is not C_STORE
        or primitive.MessageIDBeingRespondedTo is None
        or primitive.Status is None
        or primitive.ErrorComment is not None
        or primitive.OffendingElement is not None
        or getattr(primitive, "_dataset_path", None)
    ):
        return None
    try:
        elements = [
            _implicit(0x0000, 0x0002, _uid(primitive.AffectedSOPClassUID))
            if primitive.AffectedSOPClassUID is not None
            else b"",
            _implicit(0x0000, 0x0100, struct.pack("<H", _C_STORE_RSP)),
            _implicit(0x0000, 0x0120, struct.pack("<H", primitive.MessageIDBeingRespondedTo)),
            _implicit(0x0000, 0x0800, struct.pack("<H", _NO_DATA_SET)),
            _implicit(0x0000, 0x0900, struct.pack("<H", primitive.Status)),
            _implicit(0x0000, 0x1000, _uid(primitive.AffectedSOPInstanceUID))
            if primitive.AffectedSOPInstanceUID is not None
            else b"",
        ]
    except (UnicodeEncodeError, struct.error):  # not ASCII, out of range: pynetdicom's encoder says what is wrong
        return None
    body = b"".join(elements)
    return _implicit(0x0000, 0x0000, struct.pack("<I", len(body))) + body


def send_msg(self: DIMSEServiceProvider, primitive: Any, context_id: int) -> None:
    """DIMSEServiceProvider.send_msg, with C-STORE responses of the fixed layout encoded directly."""
    command = store_response_command(primitive)
    max_pdu = self.maximum_pdu_size
    if (
        command is None
        or (max_pdu and len(command) > max_pdu - _PDV_HEADER_BYTES)
        or self.assoc.get_handlers(evt.EVT_DIMSE_SENT)
    ):
        _pynetdicom_send_msg(self, primitive, context_id)
        return
    pdata = P_DATA()
    pdata.presentation_data_value_list.append((context_id, _LAST_COMMAND_FRAGMENT + command))
    self.dul.send_pdu(pdata)


@dataclass(frozen=True, slots=True)
class FileMeta:
    """What pynetdicom puts in a received file's meta information, before it is encoded."""

    sop_class_uid: Any
    sop_instance_uid: Any
    transfer_syntax: Any


def file_meta(*, sop_class_uid: Any, sop_instance_uid: Any, transfer_syntax: Any) -> FileMeta:
    """Stands in for pynetdicom's create_file_meta where it writes a received data set's file."""
    return FileMeta(sop_class_uid, sop_instance_uid, transfer_syntax)


def _explicit(element: int, vr: bytes, value: bytes) -> bytes:
    return struct.pack("<HH", 0x0002, element) + vr + struct.pack("<H", len(value)) + value


def encode_file_meta(meta: FileMeta) -> bytes:
    """Group 0002 (explicit VR little endian) as pydicom's write_file_meta_info writes pynetdicom's file meta."""
    version = PYNETDICOM_IMPLEMENTATION_VERSION.encode("ascii")
    body = b"".join(
        (
            struct.pack("<HH", 0x0002, 0x0001) + b"OB\x00\x00" + struct.pack("<I", 2) + b"\x00\x01",
            _explicit(0x0002, b"UI", _uid(meta.sop_class_uid)),
            _explicit(0x0003, b"UI", _uid(meta.sop_instance_uid)),
            _explicit(0x0010, b"UI", _uid(meta.transfer_syntax)),
            _explicit(0x0012, b"UI", _uid(PYNETDICOM_IMPLEMENTATION_UID)),
            _explicit(0x0013, b"SH", version + b" " if len(version) % 2 else version),
        )
    )
    return _explicit(0x0000, b"UL", struct.pack("<I", len(body))) + body


def write_meta(fp: Any, meta: Any) -> None:
    """Stands in for pydicom's write_file_meta_info in pynetdicom's decode_msg."""
    if isinstance(meta, FileMeta):
        try:
            encoded = encode_file_meta(meta)
        except (UnicodeEncodeError, struct.error):  # a UID that is not ASCII or too long: pydicom's way
            meta = create_file_meta(
                sop_class_uid=meta.sop_class_uid,
                sop_instance_uid=meta.sop_instance_uid,
                transfer_syntax=meta.transfer_syntax,
            )
        else:
            fp.write(encoded)
            return
    write_file_meta_info(fp, meta)


def copy_context(self: PresentationContext, memo: dict[int, Any]) -> PresentationContext:
    """PresentationContext.__deepcopy__: its values are UIDs (immutable str), booleans and ints; only the list of
    transfer syntaxes is mutable, and it is copied."""
    copied = PresentationContext.__new__(PresentationContext)
    copied.__dict__.update(self.__dict__)
    copied._transfer_syntax = list(self._transfer_syntax)
    memo[id(self)] = copied
    return copied


def install() -> None:
    """Process-wide, like the other receive-path patches: every association's responses and received files."""
    DIMSEServiceProvider.send_msg = send_msg  # type: ignore[method-assign]
    dimse_messages.create_file_meta = file_meta  # type: ignore[attr-defined,assignment]
    dimse_messages.write_file_meta_info = write_meta  # type: ignore[attr-defined,assignment]
    PresentationContext.__deepcopy__ = copy_context  # type: ignore[attr-defined]
