"""Notices to the RIS/EHR after a delivery: the Celery task `pacsai.notify` (queue `deliver`), enqueued by
`deliver` when the destination's profile has a `notify` block.

A task of its own, not part of the delivery: the PACS has the results whatever the RIS answers, so a RIS that is
down never holds a job in ENCODED nor sends the DICOM results again; notices retry on their own budget
(Notices.max_attempts, backoff doubling to 300 s) and each channel's outcome is a row of the notices table.
A channel once sent is never sent again (a broker redelivery, an operator's redeliver).
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from celery import Celery, Task, shared_task
from celery.exceptions import Reject
from pydicom import dcmread

from dicom_node import deidentify
from pacsai.enqueue import DELIVER_QUEUE
from pacsai.errors import WorkerError
from pacsai.jobs import DeliveryStatus
from pacsai.logs import log_context
from pacsai.notice_table import FAILED, RETRYING, SENT
from pacsai.notices import Notices
from pacsai.settings import Settings
from pacsai.state import JobRow, State
from pacsai.storage import Spool, outbox_for
from worker.findings import NoticeError, Report, read_report

log = logging.getLogger(__name__)
NOTIFY_TASK = "pacsai.notify"
LINKED = ("sr.dcm", "seg.dcm", "sc.dcm")  # results a notice links to (SC overlays are not listed one by one)
BACKOFF_MAX_S = 300.0


def enqueue_notice(app: Celery, job_id: str, destination: str) -> None:
    message = {"job_id": job_id, "destination": destination}
    app.send_task(NOTIFY_TASK, args=[message], queue=DELIVER_QUEUE, task_id=f"notify-{job_id}")


def load_report(settings: Settings, spool: Spool, job: JobRow, delivered: Sequence[str], notices: Notices) -> Report:
    """The job's Report from its SR and the results the destination took, with their identity restored when the
    job was de-identified (the RIS needs the real Patient ID, Study UID and accession)."""
    outbox = outbox_for(settings, job.job_id)
    if not (outbox / "sr.dcm").exists():
        raise NoticeError("the job has no SR to report", retryable=False)
    names = ["sr.dcm", *(name for name in LINKED[1:] if name in delivered and (outbox / name).exists())]
    try:
        paths = deidentify.restore_identity(spool, job, [outbox / name for name in names])
        datasets = [dcmread(path, stop_before_pixels=True) for path in paths]
    except OSError as exc:
        raise NoticeError(f"the results cannot be read ({type(exc).__name__})", retryable=False) from exc
    except WorkerError as exc:  # e.g. a de-identified job's identity map is not on this host
        raise NoticeError(f"the results cannot be re-identified: {exc}", retryable=False) from exc
    linked = datasets if "sr.dcm" in delivered else datasets[1:]
    return read_report(job.job_id, datasets[0], linked, notices.critical)


def send_notices(report: Report, notices: Notices, state: State) -> dict[str, str]:
    """Send each configured channel not sent yet; record every outcome. Returns channel → status; raises a retryable
    NoticeError when a channel should be tried again (its attempts left)."""
    rows = state.notices(report.job_id)
    sent = {row.channel for row in rows if row.status == SENT}
    attempts = {row.channel: row.attempts for row in rows}
    outcomes: dict[str, str] = {}
    retry: NoticeError | None = None
    for channel in channels(notices):
        if channel in sent:
            continue
        try:
            detail = _send(channel, report, notices)
            outcomes[channel] = SENT
            log.info("%s notice sent (%s)%s", channel, detail.split(" ")[1], " URGENT" if report.urgent else "")
        except NoticeError as exc:
            final = not exc.retryable or attempts.get(channel, 0) + 1 >= notices.max_attempts
            outcomes[channel], detail = (FAILED if final else RETRYING), exc.detail
            if final:
                log.error("ALERT: %s notice failed, not retried: %s", channel, exc)
            else:
                log.warning("%s notice failed, retrying: %s", channel, exc)
            retry = retry if final else exc
        state.record_notice(report.job_id, channel, outcomes[channel], detail, urgent=report.urgent)
    if retry is not None:
        raise retry
    return outcomes


def channels(notices: Notices) -> list[str]:
    return [name for name, target in (("hl7", notices.hl7), ("fhir", notices.fhir)) if target is not None]


def _send(channel: str, report: Report, notices: Notices) -> str:
    """Build, validate and send one channel's notice; the receiver's answer ("ACK AA", "HTTP 201 <Location>")."""
    from worker import notify_fhir, notify_hl7  # hl7apy and fhir.resources load only where notices are sent

    if channel == "hl7" and notices.hl7 is not None:
        er7 = notify_hl7.build_oru(report, notices.hl7)
        return "ACK " + notify_hl7.send_oru(er7, notices.hl7, notify_hl7.control_id(report))
    if channel == "fhir" and notices.fhir is not None:
        return notify_fhir.post_report(notify_fhir.build_report(report, notices.fhir), notices.fhir, report.job_id)
    raise ValueError(f"unknown notice channel {channel}")


@shared_task(bind=True, name=NOTIFY_TASK, acks_late=True, max_retries=None)  # type: ignore[untyped-decorator]
def notify(self: Task, message: dict[str, str]) -> str:
    from worker.task_context import context as _context

    settings, state, spool = _context(self)
    job_id = message["job_id"]
    with log_context(job=job_id[:8], destination=message["destination"]):
        notices = settings.delivery.profile_for(message["destination"]).notices
        job = state.job(job_id)
        if notices is None or job is None:
            return "no notices"
        done = (DeliveryStatus.SUCCESS.value, DeliveryStatus.WARNING.value)
        delivered = [name for name, status, _, _ in state.deliveries(job_id) if status in done]
        try:
            report = load_report(settings, spool, job, delivered, notices)
            outcomes = send_notices(report, notices, state)
        except NoticeError as exc:
            if not exc.retryable:  # nothing could be built or read: every channel fails with that reason
                for channel in channels(notices):
                    state.record_notice(job_id, channel, FAILED, exc.detail, urgent=False)
                log.error("ALERT: notices not sent: %s", exc)
                raise Reject(str(exc), requeue=False) from exc
            countdown = min(notices.backoff_s * 2**self.request.retries, BACKOFF_MAX_S)
            raise self.retry(exc=exc, countdown=countdown) from exc
        return ",".join(f"{channel} {status}" for channel, status in sorted(outcomes.items())) or "already sent"
