"""STOW-RS SCU: results to a DICOMweb peer (PS3.18 10.5) in multipart/related requests; each instance's outcome
read from the response's ReferencedSOPSequence / FailedSOPSequence, so the delivery task treats it as a C-STORE's.

HTTP statuses: 200 all stored, 202 some failed, 409 all failed (each with the sequences); 401/403 and other 4xx
are a refusal (not retried); 408, 429, 5xx and network errors are the peer unavailable (retried with back-off).
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Sequence
from pathlib import Path

import httpx
from pydicom import Dataset, dcmread

from dicom_node.send import SendResult
from pacsai import dimse
from pacsai.dimse import StoreOutcome
from pacsai.errors import PeerRefused, PeerUnavailable
from pacsai.peers import WebPeer

log = logging.getLogger(__name__)
BATCH_BYTES = 32 << 20  # instances per request up to about this many bytes
MISSING = 0x0110  # an instance the response does not mention: processing failure, sent again on the retry
RETRY_STATUSES = (408, 429)


def stow_files(files: Sequence[Path], peer: WebPeer, *, timeout_s: float) -> list[SendResult]:
    """POST the files to {peer.url}/studies in batches; one SendResult per file."""
    results: list[SendResult] = []
    with peer.client(timeout_s) as client:
        for batch in _batches(files):
            results += _post(client, peer, batch)
    return results


def _batches(files: Sequence[Path]) -> list[list[Path]]:
    batches: list[list[Path]] = [[]]
    size = 0
    for path in files:
        if batches[-1] and size + path.stat().st_size > BATCH_BYTES:
            batches.append([])
            size = 0
        batches[-1].append(path)
        size += path.stat().st_size
    return [batch for batch in batches if batch]


def multipart_body(parts: Sequence[bytes], boundary: str) -> bytes:
    """multipart/related body of application/dicom parts (RFC 2387)."""
    chunks = [b"--%s\r\nContent-Type: application/dicom\r\n\r\n%s\r\n" % (boundary.encode(), data) for data in parts]
    return b"".join(chunks) + b"--%s--\r\n" % boundary.encode()


def _post(client: httpx.Client, peer: WebPeer, files: list[Path]) -> list[SendResult]:
    boundary = f"pacsai-{secrets.token_hex(16)}"
    body = multipart_body([path.read_bytes() for path in files], boundary)
    content_type = f'multipart/related; type="application/dicom"; boundary={boundary}'
    try:
        response = client.post(f"{peer.url}/studies", content=body, headers={"Content-Type": content_type})
    except httpx.HTTPError as exc:  # connection refused, TLS failure, timeout: the text may name the URL only
        raise PeerUnavailable(f"{peer.ae_title}: STOW-RS request failed ({type(exc).__name__})") from exc
    status = response.status_code
    if status in RETRY_STATUSES or status >= 500:
        raise PeerUnavailable(f"{peer.ae_title} answered HTTP {status} to STOW-RS")
    if status not in (200, 202, 409):
        raise PeerRefused(f"{peer.ae_title} refused STOW-RS with HTTP {status}" + _hint(status))
    log.info("STOW-RS to %s: HTTP %d for %d file(s)", peer.ae_title, status, len(files))
    answer = _response_dataset(response)
    if status == 409 and "FailedSOPSequence" not in answer:
        raise PeerRefused(f"{peer.ae_title} refused every instance (HTTP 409) and said not why")
    return outcomes(files, [_sop_uid(path) for path in files], answer)


def _hint(status: int) -> str:
    return {401: " (check PACSAI_DICOMWEB_CREDENTIALS)", 403: " (our user may not store)"}.get(status, "")


def _sop_uid(path: Path) -> str:
    return str(dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)


def _response_dataset(response: httpx.Response) -> Dataset:
    """The STOW-RS response as a data set; an empty one when it has none we can read (every file then counts as
    not mentioned). DICOM JSON is a list of one data set (PS3.18 F.2)."""
    try:
        body = response.json()
        return Dataset.from_json(body[0] if isinstance(body, list) else body)
    except Exception as exc:  # not JSON, not DICOM JSON: pydicom texts may quote values, so the type only
        log.warning("STOW-RS response of HTTP %d unreadable (%s)", response.status_code, type(exc).__name__)
        return Dataset()


def outcomes(files: Sequence[Path], sop_uids: Sequence[str], response: Dataset) -> list[SendResult]:
    """One result per file from the response's sequences: referenced (success or warning), failed (its
    FailureReason classified like a C-STORE status), or not mentioned (processing failure, sent again)."""
    by_uid: dict[str, tuple[StoreOutcome, int]] = {}
    for item in response.get("ReferencedSOPSequence", []):
        warning = int(item.get("WarningReason", 0) or 0)
        by_uid[str(item.get("ReferencedSOPInstanceUID", ""))] = (dimse.classify(warning), warning)
    for item in response.get("FailedSOPSequence", []):
        reason = int(item.get("FailureReason", 0) or 0) or MISSING
        by_uid[str(item.get("ReferencedSOPInstanceUID", ""))] = (dimse.classify(reason), reason)
    results = []
    for path, uid in zip(files, sop_uids, strict=True):
        outcome, code = by_uid.get(uid, (StoreOutcome.TRANSIENT, MISSING))
        results.append(SendResult(path, outcome, code))
    return results
