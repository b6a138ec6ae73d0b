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

from dicom_node.send import SendResult
from dicom_node.spool import Spool
from worker import pipeline
from worker.errors import WorkerError
from worker.peers import Peer
from worker.profiles import OVERLAY_PREFIX, Output, Profile, SegFallback, output_of
from worker.settings import Settings
from worker.state import State

log = logging.getLogger(__name__)
FALLBACK = "fallback"            # deliveries status of a SEG the peer refused and the profile's fallback replaced
DONE = ("success", "warning", FALLBACK)
Record = tuple[str, str, int, str]  # (file, status, attempts, detail) as State.deliveries returns them


def pending(outbox: Path, records: Sequence[Record], profile: Profile) -> list[Path]:
    """Outbox files the profile sends that are not delivered yet (after a SEG refusal, the fallback's too)."""
    done = delivered(records)
    return sorted(p for p in outbox.glob("*.dcm")
                  if p.name not in done and profile.sends(p.name, seg_refused=seg_was_refused(records)))


def delivered(records: Sequence[Record]) -> set[str]:
    """Files the peer has (stored, stored with a warning) or that a fallback replaced: never sent again."""
    return {name for name, status, _, _ in records if status in DONE}


def seg_was_refused(records: Sequence[Record]) -> bool:
    return any(status == FALLBACK and output_of(name) is Output.SEG for name, status, _, _ in records)


def with_seg_fallback(results: list[SendResult], send: Callable[[list[Path]], list[SendResult]], *, profile: Profile,
                      peer: Peer, job_id: str, settings: Settings, state: State, spool: Spool) -> list[SendResult]:
    """If the peer refused the SEG's SOP class and the profile has a fallback: record it, send the fallback's files
    and return the other results plus theirs; otherwise (no refusal, fallback "fail") the results unchanged."""
    refusal = next((r for r in results if output_of(r.path.name) is Output.SEG and r.sop_class_refused), None)
    if refusal is None or profile.seg_fallback is SegFallback.FAIL:
        return results
    how = "no presentation context accepted" if not refusal.negotiated else f"C-STORE answered 0x{refusal.code:04X}"
    try:
        files = fallback_files(job_id, profile, settings, state, spool)
    except WorkerError as exc:
        log.error("%s refused the SEG (%s) and the %s fallback cannot be made: %s", peer.ae_title, how,
                  profile.seg_fallback.value, exc)
        return results
    state.record_delivery(job_id, refusal.path.name, peer.ae_title, FALLBACK,
                          f"0x{refusal.code:04X}: {how}; fallback {profile.seg_fallback.value}, {len(files)} file(s)")
    log.warning("%s cannot store SEG (%s); fallback %s: sending %d file(s) instead", peer.ae_title, how,
                profile.seg_fallback.value, len(files))
    # Sent on a second association. Should it fail, the first association's results are not recorded and go again
    # on the retry, under the same SOP Instance UIDs (the PACS replaces them, as in E4).
    return [r for r in results if r is not refusal] + (send(files) if files else [])


def fallback_files(job_id: str, profile: Profile, settings: Settings, state: State, spool: Spool) -> list[Path]:
    """The files that go only because the SEG was refused, made first when they are overlays not made yet."""
    outbox = pipeline.outbox_for(settings, job_id)
    row = state.job(job_id)
    if profile.seg_fallback is SegFallback.SC and not any(outbox.glob(f"{OVERLAY_PREFIX}*.dcm")):
        if row is None:
            raise WorkerError("the job is not in the database")
        pipeline.write_overlays(row.to_job(), settings, spool)
    done = delivered(state.deliveries(job_id))
    return sorted(p for p in outbox.glob("*.dcm") if p.name not in done
                  and profile.sends(p.name, seg_refused=True) and not profile.sends(p.name))
