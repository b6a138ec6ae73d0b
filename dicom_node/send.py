"""C-STORE SCU: send result files to a PACS (over TLS for `+tls` peers); outcomes become our errors or per-file
outcomes."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pynetdicom import AE, evt

from dicom_node import status
from dicom_node.receive import set_nodelay
from dicom_node.tls import tls_args
from worker.errors import PeerUnavailable
from worker.settings import Peer

log = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class SendResult:
    path: Path
    outcome: status.Outcome
    code: int


def send_files(files: Sequence[Path], peer: Peer, *, calling_ae: str, timeout_s: float = 60.0) -> list[SendResult]:
    """C-STORE each file on one association; raise PeerUnavailable when the peer cannot be reached or drops us."""
    datasets = [dcmread(path) for path in files]
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = min(timeout_s, 15.0)
    for ds in datasets:
        transfer_syntax = ds.file_meta.TransferSyntaxUID
        if all(cx.abstract_syntax != ds.SOPClassUID for cx in ae.requested_contexts):
            ae.add_requested_context(ds.SOPClassUID, [transfer_syntax])
    try:
        tls = tls_args(peer.host, peer.tls)      # built per delivery: renewed certificate files are picked up
    except (OSError, ValueError) as exc:        # ssl.SSLError is an OSError
        raise PeerUnavailable(f"TLS for {peer.ae_title} cannot be set up ({type(exc).__name__})") from exc
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)],
                         tls_args=tls)
    if not assoc.is_established:
        why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "unreachable"
        raise PeerUnavailable(f"association with {peer.ae_title} {why}" + (" (TLS)" if tls else ""))
    results: list[SendResult] = []
    try:
        for path, ds in zip(files, datasets, strict=True):
            reply = assoc.send_c_store(ds)
            if "Status" not in reply:
                raise PeerUnavailable(f"no C-STORE reply from {peer.ae_title}")
            code = int(reply.Status)
            results.append(SendResult(path, status.classify(code), code))
            log.info("C-STORE to %s: 0x%04X (%s)", peer.ae_title, code, results[-1].outcome.value)
    finally:
        if assoc.is_established:
            assoc.release()
    return results
