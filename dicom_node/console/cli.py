"""Console subcommands of `pacsai`: web, users add/remove/list, jobs list/show, and the status table."""

from __future__ import annotations

import argparse
import getpass
import sys
import threading
import time
from pathlib import Path
from typing import Any

from dicom_node.console.stages import stage_summary
from pacsai.console_db import ROLES, ConsoleTables
from pacsai.errors import ConfigError
from pacsai.settings import Settings
from pacsai.state import State

DEFAULT_WEB_PORT = 8080


def add_commands(sub: Any) -> Any:
    """Register `web`, `users` and `jobs` on the `pacsai` subparsers; return the `jobs` subparsers (the operator's
    recovery commands are added to them in worker/cli.py)."""
    web = sub.add_parser(
        "web", help="serve the operator console (PACSAI_WEB_HOST, PACSAI_WEB_PORT; default 127.0.0.1:8080)"
    )
    web.add_argument("--host", help="address to listen on (default PACSAI_WEB_HOST, 127.0.0.1)")
    web.add_argument("--port", type=int, help="TCP port (default PACSAI_WEB_PORT, else 8080)")
    web.set_defaults(func=cmd_web)
    users = sub.add_parser("users", help="console users").add_subparsers(dest="users_command", required=True)
    add = users.add_parser("add", help="add a user, or set an existing user's password and role")
    add.add_argument("username")
    add.add_argument("--role", choices=ROLES, default="viewer")
    add.add_argument("--phi", action="store_true", help="may see patient identifiers (admins always may)")
    add.add_argument("--password-file", type=Path, help="read the password from this file (else: prompt)")
    add.set_defaults(func=cmd_users_add)
    remove = users.add_parser("remove", help="remove a user")
    remove.add_argument("username")
    remove.set_defaults(func=cmd_users_remove)
    users.add_parser("list", help="list the users and their roles").set_defaults(func=cmd_users_list)
    jobs = sub.add_parser("jobs", help="jobs in the system of record").add_subparsers(
        dest="jobs_command", required=True
    )
    listing = jobs.add_parser("list", help="the latest jobs, filtered")
    listing.add_argument("--state")
    listing.add_argument("--model")
    listing.add_argument("--sender", help="calling AE title of the series")
    listing.set_defaults(func=cmd_jobs_list)
    show = jobs.add_parser("show", help="one job: timeline, stage times, deliveries, reason")
    show.add_argument("job_id", help="job id or a unique prefix of it")
    show.set_defaults(func=cmd_jobs_show)
    return jobs


def _state(settings: Settings) -> State:
    return State(settings.storage.database)


def cmd_web(settings: Settings, args: argparse.Namespace) -> int:
    host = args.host or settings.node.web_host
    port = args.port or settings.node.web_port or DEFAULT_WEB_PORT
    serve(settings, host, port)
    return 0


def serve(settings: Settings, host: str, port: int) -> None:
    """Run the console until interrupted; HTTPS with PACSAI_TLS_CERT/PACSAI_TLS_KEY when they are set."""
    import uvicorn

    from dicom_node.console.app import create_app

    security = settings.security
    uvicorn.run(
        create_app(settings),
        host=host,
        port=port,
        ssl_certfile=str(security.tls_cert) if security.tls_cert else None,
        ssl_keyfile=str(security.tls_key) if security.tls_key else None,
        access_log=False,  # paths and forms are ours, but a console's access log adds nothing the audit trail lacks
        log_level="warning",
        server_header=False,
    )


def serve_in_thread(settings: Settings) -> threading.Thread:
    """The console beside the node (PACSAI_WEB_PORT set): a daemon thread."""
    thread = threading.Thread(
        target=serve, args=(settings, settings.node.web_host, settings.node.web_port), name="console", daemon=True
    )
    thread.start()
    return thread


def _read_password(args: argparse.Namespace) -> str:
    if args.password_file:
        return str(args.password_file.read_text(encoding="utf-8").rstrip("\r\n"))
    first = getpass.getpass("password: ")
    if first != getpass.getpass("again: "):
        raise ConfigError("the two passwords differ")
    return first


def cmd_users_add(settings: Settings, args: argparse.Namespace) -> int:
    from dicom_node.console.auth import hash_password

    try:
        hashed = hash_password(_read_password(args))
    except ValueError as exc:
        print(f"pacsai users: {exc}", file=sys.stderr)
        return 2
    ConsoleTables(_state(settings)).add_user(args.username, hashed, args.role, phi=args.phi)
    print(f"user {args.username}: role {args.role}{', sees patient identifiers' if args.phi else ''}")
    return 0


def cmd_users_remove(settings: Settings, args: argparse.Namespace) -> int:
    if not ConsoleTables(_state(settings)).remove_user(args.username):
        print(f"pacsai users: no user {args.username}", file=sys.stderr)
        return 1
    print(f"user {args.username} removed")
    return 0


def cmd_users_list(settings: Settings, args: argparse.Namespace) -> int:
    print(f"{'user':<24} {'role':<9} phi")
    for user in ConsoleTables(_state(settings)).users():
        print(f"{user.username:<24} {user.role:<9} {'yes' if user.sees_phi else 'no'}")
    return 0


def cmd_jobs_list(settings: Settings, args: argparse.Namespace) -> int:
    from dicom_node.console.queries import Filters, jobs

    rows = jobs(_state(settings), Filters(args.state or "", args.model or "", args.sender or ""))
    print(f"{'job':<24} {'model':<20} {'state':<10} {'tries':>5} {'sender':<16} {'updated':<19} reason")
    for j in rows:
        updated = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(j.updated_at))
        print(f"{j.job_id:<24} {j.model:<20} {j.state:<10} {j.attempts:>5} {j.sender:<16} {updated:<19} {j.reason}")
    return 0


def cmd_jobs_show(settings: Settings, args: argparse.Namespace) -> int:
    state = _state(settings)
    matches = [r[0] for r in state._query("SELECT job_id FROM jobs WHERE job_id LIKE ?", (args.job_id + "%",))]
    if len(matches) != 1:
        print(f"pacsai jobs: {'no job' if not matches else 'more than one job'} matches {args.job_id}", file=sys.stderr)
        return 1
    job = state.job(str(matches[0]))
    assert job is not None
    print(f"job {job.job_id}\n  model {job.model} (revision {job.revision}), destination {job.destination}")
    print(f"  state {job.state.value}, attempts {job.attempts}, reason: {job.reason or '-'}")
    print("timeline:")
    for event in state.job_events(job.job_id):
        at = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(event.at))
        print(f"  {at}  {event.from_state or '(created)':>9} → {event.to_state:<10} {event.reason}")
    print("stage times:")
    for stage, seconds in state._query(
        "SELECT stage, seconds FROM job_stages WHERE job_id=? ORDER BY stage_id", (job.job_id,)
    ):
        print(f"  {stage:<20} {float(seconds):9.3f} s")
    print("deliveries:")
    for file, status, attempts, detail in state.deliveries(job.job_id):
        print(f"  {file:<20} {status:<10} {attempts} attempt(s)  {detail}")
    return 0


def status_table(settings: Settings) -> str:
    """Per-stage latency (p50/p95 over the last hour) and queue depth, for `pacsai status`."""
    from pacsai.celery_app import create_app
    from pacsai.enqueue import broker_queues, queue_depths

    state = _state(settings)
    lines = [f"{'stage (last hour)':<22} {'n':>6} {'p50':>9} {'p95':>9}"]
    for summary in stage_summary(state, 3600):
        lines.append(f"{summary.stage:<22} {summary.count:>6} {summary.p50_s:>8.2f}s {summary.p95_s:>8.2f}s")
    if len(lines) == 1:
        lines.append("(no stage finished in the last hour)")
    models = sorted({str(r[0]) for r in state._query("SELECT DISTINCT model FROM jobs")})
    app = create_app(settings)
    queues = broker_queues(models)
    width = max(22, *(len(queue) for queue in queues))
    lines.append(f"{'queue':<{width}} {'depth':>6}")
    for queue, depth in queue_depths(app, queues).items():
        lines.append(f"{queue:<{width}} {depth if depth is not None else 'broker unreachable':>6}")
    return "\n".join(lines)
