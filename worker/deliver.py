"""Delivery side of destination profiles: which outbox files go to a peer, and what replaces a SEG it refuses (E5).

A peer "refuses the SEG" when it accepts no presentation context for the SEG SOP class (with the transfer syntaxes
proposed) or answers its C-STORE with 0x0122 (SOP class not supported). Any other failure status stays a failure.
The refusal is recorded in the job's deliveries as status "fallback" on seg.dcm, so a later attempt sends the
fallback's files and never the SEG again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from pydicom.uid import SegmentationStorage

from dicom_node.echo_peers import takes_sop_class
from dicom_node.send import SendResult
from pacsai.errors import WorkerError
from pacsai.jobs import DeliveryStatus
from pacsai.peers import Peer, WebPeer
from pacsai.profiles import OVERLAY_PREFIX, Output, Profile, SegFallback, output_of
from pacsai.settings import Settings
from pacsai.state import State
from pacsai.storage import outbox_for

log = logging.getLogger(__name__)
FALLBACK = DeliveryStatus.FALLBACK.value  # a SEG the peer refused and the profile's fallback replaced
DONE = (DeliveryStatus.SUCCESS.value, DeliveryStatus.WARNING.value, FALLBACK)
Record = tuple[str, str, int, str]  # (file, status, attempts, detail) as State.deliveries returns them


def peer_takes_seg(settings: Settings, state: State, destination: str) -> bool | None:
    """Whether the destination stores SEG: what the last SEG sent to it showed, else what it answers when asked
    (an association proposing the SEG SOP class); None when neither tells. The worker makes a SEG fallback's
    overlays with the results unless the peer is known to take SEG (a delivery never makes them)."""
    if (known := state.peer_took_seg(destination)) is not None:
        return known
    peer = settings.delivery.peer(destination)
    if peer is None:  # a DICOMweb peer: a SEG it refuses shows only in its STOW-RS answer
        return None
    return takes_sop_class(
        peer,
        SegmentationStorage,
        calling_ae=settings.node.ae_title,
        timeout_s=min(settings.delivery.dimse_timeout_s, 10.0),
    )


def pending(outbox: Path, records: Sequence[Record], profile: Profile) -> list[Path]:
    """Outbox files the profile sends that are not delivered yet (after a SEG refusal, the fallback's too)."""
    done = delivered(records)
    return sorted(
        p
        for p in outbox.glob("*.dcm")
        if p.name not in done and profile.sends(p.name, seg_refused=seg_was_refused(records))
    )


def delivered(records: Sequence[Record]) -> set[str]:
    """Files the peer has (stored, stored with a warning) or that a fallback replaced: never sent again."""
    return {name for name, status, _, _ in records if status in DONE}


def seg_was_refused(records: Sequence[Record]) -> bool:
    return any(status == FALLBACK and output_of(name) is Output.SEG for name, status, _, _ in records)


def with_seg_fallback(
    results: list[SendResult],
    send: Callable[[list[Path]], list[SendResult]],
    *,
    profile: Profile,
    peer: Peer | WebPeer,
    job_id: str,
    settings: Settings,
    state: State,
) -> list[SendResult]:
    """If the peer refused the SEG's SOP class and the profile has a fallback: record it, send the fallback's files
    and return the other results plus theirs; otherwise (no refusal, fallback "fail") the results unchanged."""
    refusal = next((r for r in results if output_of(r.path.name) is Output.SEG and r.sop_class_refused), None)
    if refusal is None or profile.seg_fallback is SegFallback.FAIL:
        return results
    how = "no presentation context accepted" if not refusal.negotiated else f"C-STORE answered 0x{refusal.code:04X}"
    try:
        files = fallback_files(job_id, profile, settings, state)
    except WorkerError as exc:
        log.error(
            "%s refused the SEG (%s) and the %s fallback cannot be made: %s",
            peer.ae_title,
            how,
            profile.seg_fallback.value,
            exc,
        )
        return results
    state.record_delivery(
        job_id,
        refusal.path.name,
        peer.ae_title,
        FALLBACK,
        f"0x{refusal.code:04X}: {how}; fallback {profile.seg_fallback.value}, {len(files)} file(s)",
    )
    log.warning(
        "%s cannot store SEG (%s); fallback %s: sending %d file(s) instead",
        peer.ae_title,
        how,
        profile.seg_fallback.value,
        len(files),
    )
    # Sent on a second association. Should it fail, the first association's results are not recorded and go again
    # on the retry, under the same SOP Instance UIDs (the PACS replaces them, as in E4).
    return [r for r in results if r is not refusal] + (send(files) if files else [])


def fallback_files(job_id: str, profile: Profile, settings: Settings, state: State) -> list[Path]:
    """The files that go only because the SEG was refused; they were made with the results (never here: a delivery
    runs no inference). Overlays missing (the peer took SEG before, so none were made) is a WorkerError: an
    operator's re-run makes them now that the refusal is recorded."""
    outbox = outbox_for(settings, job_id)
    if profile.seg_fallback is SegFallback.SC and not any(outbox.glob(f"{OVERLAY_PREFIX}*.dcm")):
        raise WorkerError("the SC overlays were not made with the results (the peer took SEG before); re-run the job")
    done = delivered(state.deliveries(job_id))
    return sorted(
        p
        for p in outbox.glob("*.dcm")
        if p.name not in done and profile.sends(p.name, seg_refused=True) and not profile.sends(p.name)
    )
