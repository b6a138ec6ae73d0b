"""TCP options both DICOM directions use, kept apart so the sending side never loads the SCP."""

from __future__ import annotations

import socket

from pynetdicom import evt


def set_nodelay(event: evt.Event) -> None:
    """Turn Nagle off: DIMSE is request/response with small PDUs, Nagle costs ~40 ms per instance."""
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
