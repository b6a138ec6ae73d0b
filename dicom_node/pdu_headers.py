"""PDU header checks: a PDU whose header is impossible is aborted before its body is read (N1, N5, N13).

pynetdicom reads whatever length a PDU declares (up to 4 GiB) and only then decodes it, so a P-DATA-TF declaring
0xFFFFFFFF bytes or a PDU of an unknown type with a length holds the association until a deadline closes it.
"""

from __future__ import annotations

import contextlib
import socket
import struct
from collections.abc import Callable
from typing import Any

_HEADER = struct.Struct(">BBL")  # PDU type, reserved, length (PS3.8 9.3.1)
_P_DATA, _CONTROL_TYPES, _FIXED_FOUR = 0x04, (0x01, 0x02, 0x03), (0x05, 0x06, 0x07)
_MAX_ASSOCIATE_PDU = 1 << 20  # an A-ASSOCIATE-RQ with 128 contexts x 20 transfer syntaxes is ~20 KB (N13)
UNRECOGNISED_PDU, INVALID_PARAMETER_VALUE = 0x01, 0x06  # A-ABORT reasons (PS3.8 9.3.8), source 2: service provider


def abort_pdu(reason: int) -> bytes:
    """A-ABORT from the service provider (source 2) with this reason."""
    return _HEADER.pack(0x07, 0, 4) + bytes([0, 0, 2, reason])


def header_problem(pdu_type: int, length: int, max_pdu: int) -> tuple[str, int] | None:
    """Why a PDU with this header must be aborted before its body is read (with the A-ABORT reason), or None."""
    if pdu_type == _P_DATA:
        if max_pdu and length > max_pdu:
            return (
                f"P-DATA-TF of {length} bytes is longer than our maximum PDU length {max_pdu}",
                INVALID_PARAMETER_VALUE,
            )
        return None
    if pdu_type in _CONTROL_TYPES:
        return (
            (f"PDU of {length} bytes is implausibly long", INVALID_PARAMETER_VALUE)
            if length > _MAX_ASSOCIATE_PDU
            else None
        )
    if pdu_type in _FIXED_FOUR:
        return (
            None if length == 4 else (f"PDU type 0x{pdu_type:02X} of {length} bytes (not 4)", INVALID_PARAMETER_VALUE)
        )
    return f"unknown PDU type 0x{pdu_type:02X}", UNRECOGNISED_PDU


def check_pdu_headers(assoc: Any, on_abort: Callable[[Any, str], None]) -> None:
    """Check each PDU header as pynetdicom's DUL reads it; abort an impossible one before its body is read.

    The DUL reads a PDU as recv(6) for the header, then recv(length) for the body, on the association's transport
    only. A header that fails is answered with A-ABORT, the socket shut down, and an empty read returned: pynetdicom
    takes that as the transport closing (Evt17) and ends the association, without waiting for the declared bytes.
    """
    transport = assoc.dul.socket
    receive = transport.recv
    body_next = [False]

    def recv(nr_bytes: int) -> bytearray:
        data: bytearray = receive(nr_bytes)
        if body_next[0]:
            body_next[0] = False
            return data
        if nr_bytes != _HEADER.size or len(data) != _HEADER.size:
            return data
        pdu_type, _, length = _HEADER.unpack(bytes(data))
        problem = header_problem(pdu_type, length, int(assoc.acceptor.maximum_length or 0))
        if problem is None:
            body_next[0] = length > 0
            return data
        on_abort(assoc, problem[0])
        sock = transport.socket
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.sendall(abort_pdu(problem[1]))
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)
        return bytearray()

    transport.recv = recv
