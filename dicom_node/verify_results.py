"""Proof of delivery: ask the destination to confirm a delivered job's results, follow up until every instance is
confirmed (the job becomes committed) or the attempts run out (ALERT, the job stays delivered with the reason).

The worker makes the first request right after delivering (worker/verify.py); the node's watcher thread makes the
later ones from the database, so pending commitments survive a restart of either process:
- commitment: an N-ACTION; its report (N-EVENT-REPORT, to the node's SCP or on the same association) is recorded by
  Transaction UID. No report within PACSAI_VERIFY_TIMEOUT_S: asked again.
- query: C-FIND; the answer is recorded at once.
- instances reported failed or not found are sent again (C-STORE, same SOP Instance UIDs) after
  PACSAI_VERIFY_RETRY_S and asked about again; after PACSAI_VERIFY_MAX_ATTEMPTS requests: ALERT.
- a peer that does not support storage commitment is asked by C-FIND instead; one supporting neither: ALERT at once.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path

from pydicom import dcmread

from dicom_node import deidentify
from dicom_node.commitment import Report, Unsupported, find_instances, new_transaction_uid, request_commitment
from dicom_node.send import send_files
from pacsai.commitment_table import Confirmation, Request, ResultInstance, Verification
from pacsai.errors import PacsaiError
from pacsai.jobs import DeliveryStatus, JobState
from pacsai.profiles import Verify
from pacsai.settings import Peer, Settings
from pacsai.state import JobRow, State
from pacsai.storage import Spool, outbox_for

log = logging.getLogger(__name__)
WAIT_REPORT_S = 1.0  # how long a commitment request's association stays open for a report on it
FOLLOW_UP_EVERY_S = 1.0
NOT_FOUND = "not found by C-FIND"


def read_instances(files: Sequence[Path], names: Sequence[str]) -> list[ResultInstance]:
    """The UIDs of result files as sent (`names`: their outbox names)."""
    tags = ["SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID"]
    instances = []
    for path, name in zip(files, names, strict=True):
        ds = dcmread(path, stop_before_pixels=True, specific_tags=tags)
        instances.append(
            ResultInstance(
                name, str(ds.SOPClassUID), str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID)
            )
        )
    return instances


def sent_files(settings: Settings, spool: Spool, state: State, job: JobRow) -> tuple[list[Path], list[str]]:
    """The job's result files the destination stored (as sent: re-identified for a de-identified job), and names."""
    stored = (DeliveryStatus.SUCCESS.value, DeliveryStatus.WARNING.value)
    names = [name for name, status, _, _ in state.deliveries(job.job_id) if status in stored]
    outbox = outbox_for(settings, job.job_id)
    return deidentify.restore_identity(spool, job, [outbox / name for name in names]), names


def begin(settings: Settings, state: State, spool: Spool, job: JobRow, peer: Peer, method: Verify) -> None:
    """The first request for a job just delivered (after a re-delivery: anew)."""
    files, names = sent_files(settings, spool, state, job)
    if not files:
        return
    request = _request(settings, job.job_id, peer, method.value, attempt=1)
    instances = read_instances(files, names)
    state.start_verification(request, instances)
    ask(settings, state, peer, request, instances)


def _request(settings: Settings, job_id: str, peer: Peer, method: str, *, attempt: int) -> Verification:
    due_at = time.time() + settings.delivery.verify_timeout_s
    return Verification(new_transaction_uid(), job_id, peer.ae_title, method, attempt, Request.REQUESTED, due_at)


def ask(
    settings: Settings,
    state: State,
    peer: Peer,
    request: Verification,
    instances: Sequence[ResultInstance],
    *,
    no_commitment: str = "",
) -> None:
    """Send one request (recorded before it goes); a C-FIND's answer is recorded at once. A peer unreachable or
    failing is asked again when the request is due; one without storage commitment is asked by C-FIND instead."""
    retry_at = time.time() + settings.delivery.verify_retry_s
    try:
        if request.method == Verify.COMMITMENT.value:
            request_commitment(
                peer,
                request.transaction_uid,
                instances,
                recorder(state, settings),
                calling_ae=settings.node.ae_title,
                timeout_s=settings.delivery.dimse_timeout_s,
                wait_report_s=WAIT_REPORT_S,
            )
            return
        found = find_instances(
            peer, instances, calling_ae=settings.node.ae_title, timeout_s=settings.delivery.dimse_timeout_s
        )
        missing = [(i.sop_instance_uid, NOT_FOUND) for i in instances if i.sop_instance_uid not in found]
        state.record_confirmations(request.transaction_uid, sorted(found), missing, retry_at)
        log.info("C-FIND at %s found %d of %d result instance(s)", peer.ae_title, len(found), len(instances))
    except Unsupported as exc:
        if request.method == Verify.COMMITMENT.value:
            log.warning("%s; verifying by C-FIND instead", exc)
            query = replace(request, transaction_uid=new_transaction_uid(), method=Verify.QUERY.value)
            state.next_verification(query)
            ask(settings, state, peer, query, instances, no_commitment=str(exc))
            return
        give_up(state, request, f"not verified: {no_commitment}; {exc}" if no_commitment else f"not verified: {exc}")
    except PacsaiError as exc:  # unreachable, aborted, a failure status: asked again when due
        log.warning("proof of delivery from %s not obtained (%s); asking again later", peer.ae_title, exc)
        state.record_confirmations(request.transaction_uid, [], [], retry_at)


def recorder(state: State, settings: Settings) -> Callable[[Report, str], bool]:
    """Record a storage commitment report (from the node's SCP or on the requesting association)."""

    def record(report: Report, calling_ae: str) -> bool:
        retry_at = time.time() + settings.delivery.verify_retry_s
        tally = state.record_confirmations(
            report.transaction_uid, report.committed, report.failed, retry_at, reporter=calling_ae
        )
        if tally is not None and tally.all_confirmed:
            log.info(
                "job %s committed: %d result instance(s) confirmed by %s", tally.job_id[:8], tally.confirmed, calling_ae
            )
        elif tally is not None and tally.failed:
            log.warning(
                "%s did not commit %d result instance(s) of job %s; sent again after %.0f s",
                calling_ae,
                tally.failed,
                tally.job_id[:8],
                settings.delivery.verify_retry_s,
            )
        return tally is not None

    return record


def give_up(state: State, request: Verification, reason: str) -> None:
    log.error("ALERT: results of job %s at %s: %s", request.job_id[:8], request.destination, reason)
    state.close_verification(request.job_id, reason)


def follow_up(settings: Settings, state: State, spool: Spool, now: float) -> int:
    """Requests due (unanswered past the deadline, or answered with instances not confirmed): send the failed
    instances again and ask again, or give up after the last attempt. Returns how many were handled."""
    due = state.verifications_due(now)
    for request in due:
        job, peer = state.job(request.job_id), settings.delivery.peer(request.destination)
        if job is None or job.state is not JobState.DELIVERED or peer is None:  # re-delivered, re-run, peer removed
            state.close_verification(request.job_id, job.reason if job is not None else "")
            continue
        unconfirmed = [i for i in state.result_instances(job.job_id) if i.status is not Confirmation.COMMITTED]
        if request.attempt >= settings.delivery.verify_max_attempts:
            give_up(state, request, _failure_summary(request, unconfirmed, len(state.result_instances(job.job_id))))
            continue
        failed = [i for i in unconfirmed if i.status is Confirmation.FAILED]
        if failed and not _send_again(settings, spool, state, job, peer, failed):
            state.record_confirmations(request.transaction_uid, [], [], now + settings.delivery.verify_retry_s)
            continue
        following = _request(settings, job.job_id, peer, request.method, attempt=request.attempt + 1)
        state.next_verification(following)
        ask(settings, state, peer, following, unconfirmed)
    return len(due)


def _failure_summary(request: Verification, unconfirmed: Sequence[ResultInstance], total: int) -> str:
    how = "committed" if request.method == Verify.COMMITMENT.value else "found by C-FIND"
    reasons = sorted({i.detail or "no answer" for i in unconfirmed})
    return (
        f"not verified: {len(unconfirmed)} of {total} result instance(s) not {how} by {request.destination} "
        f"after {request.attempt} request(s) ({'; '.join(reasons)})"
    )


def _send_again(
    settings: Settings, spool: Spool, state: State, job: JobRow, peer: Peer, failed: Sequence[ResultInstance]
) -> bool:
    """C-STORE the instances the peer did not commit again (the same files, so the same SOP Instance UIDs)."""
    outbox = outbox_for(settings, job.job_id)
    try:
        files = deidentify.restore_identity(spool, job, [outbox / i.file for i in failed])
        results = send_files(
            files,
            peer,
            calling_ae=settings.node.ae_title,
            transfer_syntaxes=settings.delivery.profile_for(peer.ae_title).transfer_syntaxes,
            dimse_timeout_s=settings.delivery.dimse_timeout_s,
        )
    except (PacsaiError, OSError) as exc:
        log.warning("results not committed by %s could not be sent again (%s)", peer.ae_title, exc)
        return False
    stored = [r for r in results if r.outcome.value in (DeliveryStatus.SUCCESS.value, DeliveryStatus.WARNING.value)]
    for result in stored:  # a refusal now is not recorded over the first success: the next request reports it
        state.record_delivery(job.job_id, result.path.name, peer.ae_title, result.outcome.value, f"0x{result.code:04X}")
    log.info("sent %d of %d result instance(s) again to %s", len(stored), len(results), peer.ae_title)
    return True


def watch(settings: Settings, state: State, spool: Spool, stop: threading.Event) -> threading.Thread:
    """The node's follow-up thread: every second, the requests due (until `stop` is set)."""

    def run() -> None:
        while not stop.wait(FOLLOW_UP_EVERY_S):
            try:
                follow_up(settings, state, spool, time.time())
            except Exception as exc:  # never let the thread die; the next round tries again
                log.error("proof-of-delivery follow-up failed (%s)", type(exc).__name__)

    thread = threading.Thread(target=run, name="pacsai-verify", daemon=True)
    thread.start()
    return thread
