"""The console's pages and actions; each route checks the session first (Console.require / require_post)."""

from __future__ import annotations

import logging
import time

from celery import Celery
from fastapi import FastAPI, Request, Response
from fastapi.responses import HTMLResponse, RedirectResponse
from pydicom import dcmread

from dicom_node.console import preview, queries
from dicom_node.console.app import JOB_ACTION, PHI_VIEW, Console, Forbidden
from dicom_node.route import SeriesHeader
from pacsai import job_actions
from pacsai.enqueue import broker_queues, enqueue_delivery, queue_depths
from pacsai.jobs import Delivery, JobState
from pacsai.storage import outbox_for

log = logging.getLogger(__name__)
ACTIONS = {
    "retry": "Retry the job from the start (fresh attempts)",
    "rerun": "Re-run the series with the model as installed now (a new job whose results replace these)",
    "cancel": "Cancel the job before it runs",
    "redeliver": "Send the results in the outbox to the destination again",
}


def _filters(request: Request) -> queries.Filters:
    q = request.query_params
    try:
        since_h = float(q.get("since_h") or 0)
    except ValueError:
        since_h = 0.0
    return queries.Filters(q.get("state", ""), q.get("model", ""), q.get("sender", ""), since_h)


def add_pages(app: FastAPI, console: Console) -> None:
    _add_lists(app, console)
    _add_job(app, console)
    _add_job_views(app, console)
    _add_actions(app, console)
    _add_rules(app, console)


def _queues(console: Console) -> list[str]:
    return broker_queues(rule.model for rule in console.rules)


def _celery(console: Console) -> Celery:
    if console.celery is None:
        from pacsai.celery_app import create_app

        console.celery = create_app(console.settings)
    return console.celery


def _add_lists(app: FastAPI, console: Console) -> None:
    @app.get("/", response_class=HTMLResponse)
    async def overview(request: Request) -> Response:
        user, csrf = console.require(request, "viewer")
        depths = queue_depths(_celery(console), _queues(console))
        data = queries.overview(console.state, console.settings, list(depths), depths.get, time.time())
        return console.page(request, "overview.html", user, csrf, o=data, peak=max(data.arrivals_per_hour) or 1)

    @app.get("/jobs", response_class=HTMLResponse)
    async def jobs(request: Request) -> Response:
        user, csrf = console.require(request, "viewer")
        filters = _filters(request)
        rows = queries.jobs(console.state, filters)
        return console.page(request, "jobs.html", user, csrf, jobs=rows, f=filters, states=[s.value for s in JobState])

    @app.get("/series", response_class=HTMLResponse)
    async def series(request: Request) -> Response:
        user, csrf = console.require(request, "viewer")
        filters = _filters(request)
        return console.page(
            request, "series.html", user, csrf, series=queries.series(console.state, filters), f=filters
        )

    @app.get("/studies", response_class=HTMLResponse)
    async def studies(request: Request) -> Response:
        user, csrf = console.require(request, "viewer")
        filters = _filters(request)
        by_study: dict[str, list[queries.SeriesLine]] = {}
        for line in queries.series(console.state, filters):
            by_study.setdefault(line.study_key, []).append(line)
        return console.page(request, "studies.html", user, csrf, studies=by_study, f=filters)


def _add_job(app: FastAPI, console: Console) -> None:
    @app.get("/jobs/{job_id}", response_class=HTMLResponse)
    async def job(request: Request, job_id: str) -> Response:
        user, csrf = console.require(request, "viewer")
        row = console.state.job(job_id)
        if row is None:
            return console.page(request, "error.html", user, csrf, message="no such job", status_code=404)
        outbox = outbox_for(console.settings, job_id)
        stages = console.state._query(
            "SELECT stage, seconds, at FROM job_stages WHERE job_id=? ORDER BY stage_id", (job_id,)
        )
        header = queries.series_header(console.state, row.series_key)
        return console.page(
            request,
            "job.html",
            user,
            csrf,
            job=row,
            events=console.state.job_events(job_id),
            stages=stages,
            deliveries=console.state.deliveries(job_id),
            confirmations=console.state.result_instances(job_id),  # proof of delivery (profile verify)
            feedback=console.state.feedback(job_id),  # radiologists' corrections and rejections
            routing=queries.routing_decision(console.rules, header),
            files=preview.result_files(outbox),
            thumbnails=preview.thumbnail_names(outbox),
            actions=_possible_actions(row.state),
        )


def _add_job_views(app: FastAPI, console: Console) -> None:
    """A job's result thumbnails and, for roles that may see them, its patient identifiers (audited)."""

    @app.get("/jobs/{job_id}/thumbnails/{name}")
    async def thumbnail(request: Request, job_id: str, name: str) -> Response:
        console.require(request, "viewer")
        row = console.state.job(job_id)
        if row is None or "/" in name or ".." in name:
            return Response(status_code=404)
        spool = console.settings.storage.spool_dir
        sources = [spool / path for _, path in console.state.series_instances(row.series_key)]
        png = preview.render_thumbnail(outbox_for(console.settings, job_id), name, sources, console.cache_dir / job_id)
        return Response(png, media_type="image/png") if png else Response(status_code=404)

    @app.get("/jobs/{job_id}/patient", response_class=HTMLResponse)
    async def patient(request: Request, job_id: str) -> Response:
        user, csrf = console.require(request, "viewer")
        if not user.sees_phi:
            raise Forbidden("patient identifiers are shown only to admins and users with the phi flag")
        row = console.state.job(job_id)
        instances = console.state.series_instances(row.series_key) if row else []
        if row is None or not instances:
            return console.page(request, "error.html", user, csrf, message="no spooled instance", status_code=404)
        try:
            ds = dcmread(console.settings.storage.spool_dir / instances[0][1], stop_before_pixels=True)
            name, patient_id = str(ds.get("PatientName", "")), str(ds.get("PatientID", ""))
        except Exception:
            return console.page(request, "error.html", user, csrf, message="spooled header unreadable", status_code=404)
        console.audit(request, user, PHI_VIEW, "R", "patient identifiers shown in the console", study_key=row.study_key)
        return console.page(request, "patient.html", user, csrf, job=row, patient_name=name, patient_id=patient_id)


def _possible_actions(state: JobState) -> list[str]:
    possible = []
    if state in job_actions.RETRYABLE:
        possible.append("retry")
    if state in job_actions.RERUNNABLE:
        possible.append("rerun")
    if state in job_actions.CANCELLABLE:
        possible.append("cancel")
    if state in job_actions.REDELIVERABLE:
        possible.append("redeliver")
    return possible


def _add_actions(app: FastAPI, console: Console) -> None:
    @app.get("/jobs/{job_id}/{action}", response_class=HTMLResponse)
    async def confirm(request: Request, job_id: str, action: str) -> Response:
        user, csrf = console.require(request, "operator")
        row = console.state.job(job_id)
        if action not in ACTIONS or row is None:
            return console.page(request, "error.html", user, csrf, message="no such job or action", status_code=404)
        return console.page(request, "confirm.html", user, csrf, job=row, action=action, what=ACTIONS[action])

    @app.post("/jobs/{job_id}/{action}")
    async def act(request: Request, job_id: str, action: str) -> Response:
        user, _ = await console.require_post(request, "operator")
        if action not in ACTIONS:
            return Response("no such action", status_code=404)
        by = f"console user {user.username}"
        # settings: results or instances deleted after the retention period are refused (409) as by the CLI; the
        # console writes its own audit message below
        settings = console.settings
        try:
            if action == "redeliver":
                done, delivery = job_actions.redeliver(
                    console.state, job_id, by=by, settings=settings, write_audit=False
                )
                _send_delivery(console, delivery)
            else:
                act_on = getattr(job_actions, action)
                done = act_on(console.state, job_id, by=by, settings=settings, write_audit=False)
        except job_actions.ActionRefused as exc:
            return console.page(request, "error.html", user, message=str(exc), status_code=409)
        console.audit(request, user, JOB_ACTION, "U", done.detail, study_key=done.study_key)
        log.info("console: %s by %s on job %s", action, user.username, job_id[:8])
        return RedirectResponse(f"/jobs/{done.job_id}", status_code=303)


def _send_delivery(console: Console, delivery: Delivery) -> None:
    try:
        enqueue_delivery(_celery(console), delivery)
    except Exception as exc:  # the job is encoded: the node's reconciler sends it when the broker takes messages
        log.warning(
            "console: broker unreachable (%s); the node re-sends job %s later", type(exc).__name__, delivery.job_id[:8]
        )


def _add_rules(app: FastAPI, console: Console) -> None:
    @app.get("/rules", response_class=HTMLResponse)
    async def rules(request: Request) -> Response:
        user, csrf = console.require(request, "viewer")
        recent = queries.series(console.state, queries.Filters())[:50]
        return console.page(request, "rules.html", user, csrf, recent=recent, rules=console.rules, outcomes=None)

    @app.post("/rules", response_class=HTMLResponse)
    async def test_rules(request: Request) -> Response:
        user, form = await console.require_post(request, "viewer")
        _, csrf = console.user_for(request)
        header: SeriesHeader | None
        if form.get("series_key"):
            header = queries.series_header(console.state, form["series_key"])
        else:
            try:
                count = int(form.get("instances") or 1)
            except ValueError:
                count = 1
            header = SeriesHeader(
                modality=form.get("modality", "").strip(),
                sop_class=form.get("sop_class", "").strip(),
                body_part=form.get("body_part", "").strip(),
                series_description=form.get("series_description", ""),
                instances=count,
                calling_ae=form.get("calling_ae", "").strip(),
                called_ae=form.get("called_ae", "").strip() or console.settings.node.ae_title,
            )
        outcomes = queries.test_rules(console.rules, header) if header else []
        recent = queries.series(console.state, queries.Filters())[:50]
        return console.page(
            request, "rules.html", user, csrf, recent=recent, rules=console.rules, outcomes=outcomes, header=header
        )
