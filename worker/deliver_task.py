"""The delivery task: send a job's results from the outbox to its destination, record each file's outcome, retry
with back-off, then ask for proof of delivery and send notices when the destination's profile says so."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

from celery import Task, shared_task
from celery.exceptions import Reject

import worker.notify
from dicom_node import deidentify
from dicom_node.send import SendResult, send_files
from pacsai import audit, lease
from pacsai.dimse import StoreOutcome
from pacsai.enqueue import DELIVER_TASK
from pacsai.errors import PeerRefused, PeerUnavailable, exhausted_resource
from pacsai.jobs import Delivery, JobState
from pacsai.logs import log_context
from pacsai.peers import WebPeer
from pacsai.profiles import Profile
from pacsai.settings import Peer, Settings
from pacsai.state import JobRow, State
from pacsai.storage import Spool, SpoolCorrupted, check_intact, outbox_for
from worker import deliver as profiles_side
from worker.stow import stow_files
from worker.task_context import context, wait_for
from worker.verify import after_delivery as verify_delivery

log = logging.getLogger(__name__)


@shared_task(bind=True, name=DELIVER_TASK, acks_late=True, max_retries=None)
def deliver(self: Task, message: dict[str, str]) -> str:
    settings, state, spool = context(self)
    delivery = Delivery.from_message(message)
    job_id = delivery.job_id
    with log_context(job=job_id[:8], destination=delivery.destination):
        peer: Peer | WebPeer | None = settings.delivery.peer(delivery.destination)
        peer = peer or settings.delivery.web_peer(delivery.destination)  # a DICOMweb peer: STOW-RS
        if peer is None:
            state.set_job(job_id, JobState.FAILED, f"destination {delivery.destination} is not a known peer")
            raise Reject("unknown destination", requeue=False)
        owner = lease.owner()
        if not state.claim_delivery(job_id, owner, lease_s=lease.LEASE_S, alive=lease.alive):
            # the broker handed this delivery out again while another process is sending it (Q10)
            log.warning("results are being sent by another worker process; this second delivery is dropped")
            return "duplicate"
        job = state.job(job_id)
        if job is not None and job.state is not JobState.ENCODED:  # delivered, waiting, cancelled meanwhile
            state.release_lease(job_id, owner)
            log.info("job is %s; this delivery message is dropped", job.state.value)
            return str(job.state.value)
        sending = Sending(self, settings, state, spool, job_id, job, peer, owner)
        with lease.renewed(state, job_id, owner):
            sent = sending.send()
        sending.delivered(sent)
        return "delivered"


@dataclass(slots=True)
class Sending:
    """One delivery attempt of one job's results to one peer."""

    task: Task
    settings: Settings
    state: State
    spool: Spool
    job_id: str
    job: JobRow | None
    peer: Peer | WebPeer
    owner: str

    @property
    def profile(self) -> Profile:
        """Which results this peer gets (pacsai/profiles.py)."""
        return self.settings.delivery.profile_for(self.peer.ae_title)

    def send(self) -> int:
        """Send what is pending, record each file's outcome; returns how many files went. A failure retries the
        task, fails the job or parks it waiting for a resource (each raises)."""
        files = profiles_side.pending(
            outbox_for(self.settings, self.job_id), self.state.deliveries(self.job_id), self.profile
        )
        send = sender(self.settings, self.spool, self.job, self.peer)
        started = time.monotonic()
        try:
            results = profiles_side.with_seg_fallback(
                send(files),
                send,
                profile=self.profile,
                peer=self.peer,
                job_id=self.job_id,
                settings=self.settings,
                state=self.state,
            )  # E5
            self._record(results, time.monotonic() - started)
        except PeerUnavailable as exc:
            self._retry(exc)
        except (SpoolCorrupted, PeerRefused) as exc:
            audit.record_undelivered(self.settings, self.job, self.peer, str(exc), final=True)
            self.state.set_job(self.job_id, JobState.FAILED, str(exc))
            if isinstance(exc, SpoolCorrupted):
                log.error("ALERT: results not sent: %s", exc)
            else:  # E2 permanent RJ, E3 refusals
                log.error("ALERT: delivery failed for good, not retried: %s", exc)
            raise Reject(str(exc), requeue=False) from exc
        except Exception as exc:  # e.g. no space for the re-identified results
            if (resource := exhausted_resource(exc)) is None:
                raise
            wait_for(self.state, self.job_id, resource, exc, give_back_attempt=False)
        return len(files)

    def _record(self, results: list[SendResult], seconds: float) -> None:
        """Audit and record every file's outcome; a refusal or a busy peer raises for the handlers in send()."""
        audit.record_sent(self.settings, self.job, self.peer, results)
        self.state.record_stage(self.job_id, self.job.model if self.job else "", "delivery", seconds)
        for result in results:
            self.state.record_delivery(
                self.job_id, result.path.name, self.peer.ae_title, result.outcome.value, f"0x{result.code:04X}"
            )
        refused = [r for r in results if r.outcome is StoreOutcome.PERMANENT]
        if refused:
            raise PeerRefused(f"{self.peer.ae_title} refused {len(refused)} file(s) with 0x{refused[0].code:04X}")
        if any(r.outcome is StoreOutcome.TRANSIENT for r in results):
            raise PeerUnavailable(f"{self.peer.ae_title} is out of resources")

    def _retry(self, exc: PeerUnavailable) -> None:
        """Retry later with capped exponential back-off, or end the job dead after the last attempt (raises)."""
        delivery = self.settings.delivery
        attempt = self.task.request.retries + 1
        audit.record_undelivered(
            self.settings, self.job, self.peer, str(exc), final=attempt >= delivery.send_max_attempts
        )
        if attempt >= delivery.send_max_attempts:
            self.state.set_job(self.job_id, JobState.DEAD, f"{exc} after {attempt} attempts")
            raise Reject(str(exc), requeue=False) from exc
        countdown = min(delivery.send_backoff_s * 2**self.task.request.retries, delivery.send_backoff_max_s)
        failures = self.state.note_delivery_failure(self.job_id, f"delivery failing: {exc}")
        log.warning("%s; attempt %d, retrying in %.0f s", exc, attempt, countdown)
        if failures == delivery.send_alert_after:
            log.error(
                "ALERT: results for %s undelivered after %d attempts; still retrying", self.peer.ae_title, failures
            )
        self.state.release_lease(self.job_id, self.owner)  # the retry may run in any process
        raise self.task.retry(exc=exc, countdown=countdown) from exc

    def delivered(self, files: int) -> None:
        """The job is delivered; then proof of delivery and notices, as the profile asks."""
        row = self.state.job(self.job_id)  # a "not evaluated" report keeps its reason (pacsai status shows it)
        kept = row.reason if row is not None and row.reason.startswith("not evaluated") else ""
        self.state.set_job(self.job_id, JobState.DELIVERED, kept)
        log.info("delivered %d file(s) to %s", files, self.peer.ae_title)
        verify_delivery(self.settings, self.state, self.spool, self.job_id, self.peer)
        if self.profile.notices is not None:  # notices to the RIS/EHR: a task with its own retries (worker/notify.py)
            try:
                worker.notify.enqueue_notice(self.task.app, self.job_id, self.peer.ae_title)
            except Exception as exc:  # the results are delivered whatever the broker does now
                log.error("ALERT: notices not enqueued (%s); `pacsai jobs redeliver` sends them", type(exc).__name__)


def sender(
    settings: Settings, spool: Spool, job: JobRow | None, peer: Peer | WebPeer
) -> Callable[[list[Path]], list[SendResult]]:
    """How files go to this peer: C-STORE with its profile's transfer syntaxes, or STOW-RS to a DICOMweb peer."""
    timeout_s = settings.delivery.dimse_timeout_s
    if isinstance(peer, WebPeer):
        return partial(_stow, spool, job, peer, timeout_s=timeout_s)
    syntaxes = settings.delivery.profile_for(peer.ae_title).transfer_syntaxes
    return partial(_send, spool, job, peer, settings.node.ae_title, syntaxes, dimse_timeout_s=timeout_s)


def _stow(spool: Spool, job: JobRow | None, peer: WebPeer, files: list[Path], *, timeout_s: float) -> list[SendResult]:
    """STOW-RS the files to a DICOMweb peer, checked and re-identified as for C-STORE."""
    check_intact(files, what="result")
    files = deidentify.restore_identity(spool, job, files)
    return stow_files(files, peer, timeout_s=timeout_s) if files else []


def _send(
    spool: Spool,
    job: JobRow | None,
    peer: Peer,
    calling_ae: str,
    transfer_syntaxes: tuple[str, ...],
    files: list[Path],
    *,
    dimse_timeout_s: float | None = None,
) -> list[SendResult]:
    """C-STORE files to the peer, proposing the transfer syntaxes of its profile (no files: nothing to do)."""
    check_intact(files, what="result")  # S7 for results: a file changed since it was written is never sent
    # A10: a de-identified job's results get their identity back here, on the node's host
    files = deidentify.restore_identity(spool, job, files)
    if not files:
        return []
    return send_files(
        files, peer, calling_ae=calling_ae, transfer_syntaxes=transfer_syntaxes, dimse_timeout_s=dimse_timeout_s
    )
