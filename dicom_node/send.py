"""C-STORE SCU: send result files to a PACS (over TLS for `+tls` peers); outcomes become our errors or per-file
outcomes.

We propose one presentation context per SOP class among the files, with the transfer syntaxes of the peer's
destination profile the files can go in: any uncompressed one listed (pynetdicom converts between explicit and
implicit VR little endian), and JPEG baseline for 8-bit images when listed (then compressed here, lossy, marked
so). A SOP class the peer accepts no context for is not sent: its files come back as refused with 0x0122 (SOP class
not supported), the same code a peer answers a C-STORE with when it cannot store the class.

A file that goes in its own transfer syntax is streamed from disk as written (pynetdicom's chunked send: never
decoded and encoded again; 0.30 → 0.21 s for a 28 MB SEG to storescp, docs/benchmarks.md); one that is converted
(implicit VR, JPEG baseline) is read whole and encoded by pynetdicom.
"""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path

import numpy as np
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit
from pynetdicom import AE, _config, evt
from pynetdicom.association import Association

from dicom_node.tcp import set_nodelay
from dicom_node.tls import tls_args
from pacsai import dimse
from pacsai.errors import PeerRefused, PeerUnavailable
from pacsai.settings import Peer

log = logging.getLogger(__name__)
SOP_CLASS_NOT_SUPPORTED = 0x0122  # PS3.7 C.5.4 "Refused: SOP Class not supported"
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
JPEG_QUALITY = 90
HEADER_ONLY = "1 MB"  # read for negotiation: larger values (the pixel data) stay on disk, present but not loaded
_STREAMING = threading.Lock()
_streaming_sends = 0  # our send_c_store(path) calls in progress in this process


@dataclass(frozen=True, slots=True)
class SendResult:
    path: Path
    outcome: dimse.StoreOutcome
    code: int
    negotiated: bool = True  # False: the peer accepted no presentation context for the file's SOP class

    @property
    def sop_class_refused(self) -> bool:
        """The peer cannot take this SOP class at all (refused in negotiation or with 0x0122)."""
        return self.code == SOP_CLASS_NOT_SUPPORTED


def send_files(
    files: Sequence[Path],
    peer: Peer,
    *,
    calling_ae: str,
    timeout_s: float = 60.0,
    transfer_syntaxes: Sequence[str] = UNCOMPRESSED,
    dimse_timeout_s: float | None = None,
) -> list[SendResult]:
    """C-STORE each file on one association; raise PeerUnavailable when the peer cannot be reached or drops us,
    PeerRefused when it rejects the association permanently (E2).

    A C-STORE unanswered after `dimse_timeout_s` (default `timeout_s`) aborts the association (E6).
    """
    datasets = [dcmread(path, defer_size=HEADER_ONLY) for path in files]
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    if dimse_timeout_s is not None:
        ae.dimse_timeout = dimse_timeout_s
    ae.connection_timeout = min(timeout_s, 15.0)
    for sop_class, syntaxes in proposed_contexts(datasets, transfer_syntaxes).items():
        ae.add_requested_context(sop_class, syntaxes)
    try:
        tls = tls_args(peer.host, peer.tls)  # built per delivery: renewed certificate files are picked up
    except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError
        raise PeerUnavailable(f"TLS for {peer.ae_title} cannot be set up ({type(exc).__name__})") from exc
    assoc = ae.associate(
        peer.host, peer.port, ae_title=peer.ae_title, evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)], tls_args=tls
    )
    if not assoc.is_established:
        raise association_failure(assoc, peer, tls=bool(tls))
    results: list[SendResult] = []
    try:
        for path, ds in zip(files, datasets, strict=True):
            results.append(_store(assoc, path, ds, peer))
    finally:
        if assoc.is_established:
            assoc.release()
    return results


@contextmanager
def _streamed(on: bool) -> Iterator[None]:
    """pynetdicom streams send_c_store(path) from the file only while its process-wide STORE_SEND_CHUNKED_DATASET is
    set (and then never converts the transfer syntax). It is set only while at least one of our streamed sends runs,
    back to pynetdicom's default (off) after the last, so that a path given to send_c_store anywhere else in the
    process (nothing of ours does, tests do) is read whole and converted as pynetdicom does by default."""
    global _streaming_sends
    if not on:
        yield
        return
    with _STREAMING:
        _streaming_sends += 1
        _config.STORE_SEND_CHUNKED_DATASET = True
    try:
        yield
    finally:
        with _STREAMING:
            _streaming_sends -= 1
            if not _streaming_sends:
                _config.STORE_SEND_CHUNKED_DATASET = False


def association_failure(assoc: Association, peer: Peer, *, tls: bool = False) -> PeerUnavailable | PeerRefused:
    """Why an association did not start: a permanent A-ASSOCIATE-RJ (called AE unknown, …) is PeerRefused and not
    retried; a transient one (local limit exceeded, congestion), an abort or no connection is PeerUnavailable."""
    suffix = " (TLS)" if tls else ""
    answer = assoc.acceptor.primitive
    if assoc.is_rejected and answer is not None:
        result, source, reason = int(answer.result or 0), int(answer.result_source or 0), int(answer.diagnostic or 0)
        text = f"association with {peer.ae_title} {dimse.describe_rejection(result, source, reason)}{suffix}"
        if dimse.classify_rejection(result) is dimse.StoreOutcome.PERMANENT:
            return PeerRefused(text)
        return PeerUnavailable(text)
    why = "rejected" if assoc.is_rejected else "aborted" if assoc.is_aborted else "unreachable"
    return PeerUnavailable(f"association with {peer.ae_title} {why}{suffix}")


def _store(assoc: Association, path: Path, ds: Dataset, peer: Peer) -> SendResult:
    """One C-STORE on the context the peer accepted for the file's SOP class (none: refused without sending)."""
    accepted = [cx.transfer_syntax[0] for cx in assoc.accepted_contexts if cx.abstract_syntax == ds.SOPClassUID]
    if not accepted:
        log.warning(
            "C-STORE to %s: no presentation context accepted for %s; not sent", peer.ae_title, UID(ds.SOPClassUID).name
        )
        return SendResult(path, dimse.StoreOutcome.PERMANENT, SOP_CLASS_NOT_SUPPORTED, negotiated=False)
    payload: Dataset | Path = path  # in its own transfer syntax: streamed as written
    if accepted[0] == JPEGBaseline8Bit and not ds.file_meta.TransferSyntaxUID.is_compressed:
        if not jpeg_baseline_fits(ds):  # another file of its class fitted; this one cannot go in JPEG baseline
            log.warning(
                "C-STORE to %s: only JPEG baseline accepted for %s, which this image cannot use; not sent",
                peer.ae_title,
                UID(ds.SOPClassUID).name,
            )
            return SendResult(path, dimse.StoreOutcome.PERMANENT, SOP_CLASS_NOT_SUPPORTED, negotiated=False)
        payload = as_jpeg_baseline(dcmread(path))
    elif accepted[0] != ds.file_meta.TransferSyntaxUID:
        payload = dcmread(path)  # pynetdicom converts between the uncompressed syntaxes
    started = time.monotonic()
    with _streamed(isinstance(payload, Path)):
        reply = assoc.send_c_store(payload)
    if "Status" not in reply:  # DIMSE timeout (pynetdicom aborts the association then), abort, closed connection
        waited_s, limit_s = time.monotonic() - started, float(assoc.dimse_timeout or 0)
        timed_out = bool(limit_s) and waited_s >= limit_s * 0.95
        why = f" within the DIMSE timeout of {limit_s:g} s; association aborted" if timed_out else ""
        raise PeerUnavailable(f"no C-STORE reply from {peer.ae_title}{why}")
    code = int(reply.Status)
    result = SendResult(path, dimse.classify(code), code)
    log.info("C-STORE to %s: 0x%04X (%s)", peer.ae_title, code, result.outcome.value)
    return result


def proposed_contexts(datasets: Sequence[Dataset], transfer_syntaxes: Sequence[str]) -> dict[str, list[str]]:
    """SOP class → transfer syntaxes to propose, in the profile's order; a compressed file goes as it is."""
    contexts: dict[str, list[str]] = {}
    for ds in datasets:
        own = UID(ds.file_meta.TransferSyntaxUID)
        if own.is_compressed:
            wanted = [own]
        else:
            wanted = [
                UID(ts)
                for ts in transfer_syntaxes
                if ts in UNCOMPRESSED or (ts == JPEGBaseline8Bit and jpeg_baseline_fits(ds))
            ]
        syntaxes = contexts.setdefault(str(ds.SOPClassUID), [])
        syntaxes += [str(ts) for ts in wanted or [own] if str(ts) not in syntaxes]
    return contexts


def jpeg_baseline_fits(ds: Dataset) -> bool:
    """JPEG baseline holds 8-bit unsigned grey or RGB single-frame images."""
    return (
        "PixelData" in ds
        and int(ds.get("BitsAllocated", 0)) == 8
        and int(ds.get("NumberOfFrames", 1) or 1) == 1
        and (int(ds.get("SamplesPerPixel", 1)), str(ds.get("PhotometricInterpretation", "")))
        in ((1, "MONOCHROME2"), (3, "RGB"))
        and int(ds.get("PixelRepresentation", 0)) == 0
    )


def as_jpeg_baseline(ds: Dataset) -> Dataset:
    """A copy in JPEG baseline (process 1), colour as YBR_FULL_422; lossy, so marked (PS3.3 C.7.6.1.1.5).

    The SOP Instance UID stays: this is the same image in a transfer syntax the peer asked for.
    """
    pixels = np.asarray(ds.pixel_array, dtype=np.uint8)
    colour = int(ds.SamplesPerPixel) == 3
    buffer = BytesIO()
    Image.fromarray(pixels, "RGB" if colour else "L").save(
        buffer, "JPEG", quality=JPEG_QUALITY, subsampling=1
    )  # 1: 4:2:2
    compressed = copy.deepcopy(ds)  # a shallow copy would share (and change) the original's elements
    compressed.file_meta.TransferSyntaxUID = JPEGBaseline8Bit
    compressed.PixelData = encapsulate([buffer.getvalue()])
    compressed["PixelData"].VR = "OB"
    compressed["PixelData"].is_undefined_length = True
    if colour:
        compressed.PhotometricInterpretation = "YBR_FULL_422"
        compressed.PlanarConfiguration = 0
    compressed.LossyImageCompression = "01"
    compressed.LossyImageCompressionRatio = f"{pixels.nbytes / len(buffer.getvalue()):.2f}"
    compressed.LossyImageCompressionMethod = "ISO_10918_1"
    return compressed
