"""Reading PDUs off the socket in large chunks: pynetdicom's AssociationSocket.recv asks the socket for 4 KiB at a
time, so a 1 MiB P-DATA-TF costs 256 recv calls; this asks for up to 256 KiB per call, with the same contract (block
until `nr_bytes` are read, return what was read when the peer closes). Memory grows only as bytes arrive, so a PDU
header declaring a huge length costs nothing until its bytes come (the node aborts those at the header anyway).
"""

from __future__ import annotations

import socket
from typing import cast

from pynetdicom.transport import AssociationSocket

_CHUNK = 256 * 1024
_pynetdicom_recv = AssociationSocket.recv


def recv(self: AssociationSocket, nr_bytes: int) -> bytearray:
    """AssociationSocket.recv, in chunks of up to 256 KiB."""
    sock = cast(socket.socket, self.socket)
    data = bytearray()
    while len(data) < nr_bytes:
        chunk = sock.recv(min(nr_bytes - len(data), _CHUNK))
        if not chunk:  # the peer closed: return what there is, as pynetdicom does
            return data
        data += chunk
    return data


def read_in_large_chunks() -> None:
    """Process-wide: every association's transport reads this way (its callers see no difference)."""
    AssociationSocket.recv = recv  # type: ignore[method-assign]
