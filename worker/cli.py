"""`pacsai` command line: node, worker, run, models, status, audit, web, users, jobs.

Over 300 lines on purpose: the argument parser of every subcommand; each command's work lives in the module it names.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from pacsai import logs
from pacsai.errors import ConfigError, ModelError, PacsaiError
from pacsai.settings import Settings
from pacsai.state import State

if TYPE_CHECKING:
    from models.registry import LoadedModel


def _settings() -> Settings:
    return Settings.from_env(os.environ).with_log_key()


def cmd_node(settings: Settings, args: argparse.Namespace) -> int:
    from dicom_node.node import run_node

    return run_node(settings)


def served_models(settings: Settings) -> tuple[str, ...]:
    """The models this worker serves: PACSAI_WORKER_MODELS, or every installed model."""
    from models.registry import list_specs

    return settings.worker.models or tuple(spec.name for spec in list_specs(settings.worker.models_dir))


def check_models(settings: Settings, names: tuple[str, ...]) -> str:
    """Load each served model once on the CPU (spec, checksum, weights); return the first error, or ''."""
    from models.registry import ModelLoadError, load_model, load_spec
    from models.spec import SpecError

    try:
        for name in names:
            load_model(load_spec(name, settings.worker.models_dir), "cpu")
    except (ModelLoadError, SpecError) as exc:
        return str(exc)
    return ""


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    from pacsai.celery_app import create_app
    from pacsai.enqueue import DELIVER_QUEUE, infer_queues

    try:
        # in a spawned child: torch must not even load in the parent of Celery's forked pool (W6: CUDA initialised
        # there is unusable in the children, and its thread pools deadlock them); the pool processes load it
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            names = pool.apply(served_models, (settings,))
            problem = pool.apply(check_models, (settings, names)) if names else "no model installed"
    except PacsaiError as exc:
        problem = str(exc)
    if problem:  # W5: refuse to start, so no job is consumed by a worker that cannot run it
        print(f"pacsai worker: not starting: {problem}", file=sys.stderr)
        return 2
    # deliveries first (short, and each finishes a job: results waiting in the outbox never queue behind new
    # inference), then every model's STAT queue, routine, background
    by_urgency = zip(*(infer_queues(name) for name in names), strict=True)
    queues = ([] if args.no_deliver else [DELIVER_QUEUE]) + [queue for tier in by_urgency for queue in tier]
    app = create_app(settings)
    argv = [
        "worker",
        "-Q",
        ",".join(queues),
        "--concurrency",
        str(settings.worker.concurrency),
        "--loglevel",
        settings.log_level,
        "--hostname",
        f"pacsai-{os.getpid()}@%h",
    ]
    if not settings.queue.broker_url:
        argv += ["--without-mingle", "--without-gossip"]
    app.worker_main(argv)
    return 0


def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    """Node and worker on one box: the worker as a child process, the node in this one."""
    from dicom_node.node import run_node
    from worker.supervise import claim_data_dir, dying_with_this_process, watch_worker

    lock = claim_data_dir(settings.storage.data_dir)  # one run per data dir; a dead run's worker is stopped
    # the worker dies with this process (kill -9 too); no threads yet, so preexec_fn is safe
    worker = subprocess.Popen([sys.executable, "-m", "worker.cli", "worker"], preexec_fn=dying_with_this_process())
    lock.record(worker.pid)
    stopping = threading.Event()
    lost = watch_worker(worker, stopping)  # the worker died by itself: the node stops too
    try:
        code = run_node(settings)
    finally:
        stopping.set()
        worker.terminate()
        try:
            worker.wait(timeout=60)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()
        lock.release()
    return 1 if lost.is_set() else code


def cmd_models(settings: Settings, args: argparse.Namespace) -> int:
    from models.registry import list_specs

    specs = list_specs(settings.worker.models_dir)
    print(f"{'name':<24} {'version':<10} {'task':<14} {'modalities':<12} labels")
    for spec in specs:
        labels = ", ".join(label.name for label in spec.labels)
        print(f"{spec.name:<24} {spec.version:<10} {spec.task.value:<14} {','.join(spec.modalities):<12} {labels}")
    return 0


def _load(settings: Settings, name: str) -> LoadedModel:
    from models.registry import ModelLoadError, load_model, load_spec, pick_device
    from models.spec import SpecError

    try:
        return load_model(load_spec(name, settings.worker.models_dir), pick_device(settings.worker.device))
    except (ModelLoadError, SpecError) as exc:
        raise ModelError(str(exc)) from None


def cmd_models_check(settings: Settings, args: argparse.Namespace) -> int:
    from worker.run_folder import check_model

    model = _load(settings, args.name)
    print(f"{args.name}: spec valid, weights checksum ok, loaded on {model.device}; {check_model(model)}")
    return 0


def cmd_models_run(settings: Settings, args: argparse.Namespace) -> int:
    from worker.run_folder import run_folder

    if not args.dicom_dir.is_dir():
        print(f"pacsai: {args.dicom_dir} is not a folder", file=sys.stderr)
        return 2
    outcomes = run_folder(_load(settings, args.name), args.dicom_dir, args.out)
    for ordinal, outcome in outcomes.items():
        print(f"series {ordinal}: {outcome}")
    print(f"results in {args.out}")
    return 0 if any(not text.startswith("not processed") for text in outcomes.values()) else 1


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    from pacsai.state import State

    if not settings.storage.database_url and not settings.storage.database_path.exists():
        print(f"no database yet at {settings.storage.database_path}")
        return 1
    from dicom_node import feedback_report

    state = State(settings.storage.database)
    counts, agreements = state.counts(), state.agreement()
    if args.json:
        print(json.dumps({**counts, "feedback": feedback_report.as_json(agreements)}, indent=2, sort_keys=True))
        return 0
    for table, by_state in counts.items():
        print(f"{table:<11} " + ("  ".join(f"{k}={v}" for k, v in sorted(by_state.items())) or "none"))
    print(feedback_report.status_line(agreements))
    from dicom_node.console.cli import status_table

    print(status_table(settings))
    return 0


def cmd_feedback_export(settings: Settings, args: argparse.Namespace) -> int:
    """Corrected SEGs with their source images (NIfTI) and every feedback row (CSV) for retraining."""
    from pacsai.state import State
    from worker.feedback_export import CSV_NAME, export

    if not settings.storage.database_url and not settings.storage.database_path.exists():
        print(f"no database yet at {settings.storage.database_path}")
        return 1
    done = export(settings, State(settings.storage.database), args.dir)
    print(f"{done.rows} feedback row(s) in {args.dir / CSV_NAME}, {done.pairs} image + label pair(s)")
    if done.missing:
        print(f"{done.missing} correction(s) without source images (past retention): CSV only")
    return 0


def cmd_check_peers(settings: Settings, args: argparse.Namespace) -> int:
    """E7: C-ECHO every configured peer (DICOMweb peers: a QIDO-RS query); one line each, exit status 1 if any fails."""
    from dicom_node.echo_peers import check_peers, report

    if not settings.delivery.peers and not settings.delivery.web_peers:
        print("no peers configured (PACSAI_PEERS, PACSAI_DICOMWEB_PEERS)")
        return 1
    checks = check_peers(settings)
    report(checks)
    for check in checks:
        print(
            f"{check.peer.ae_title:<16} {check.address:<28} {'ok' if check.reachable else 'FAILED':<7} {check.detail}"
        )
    return 0 if all(check.reachable for check in checks) else 1


def cmd_audit(settings: Settings, args: argparse.Namespace) -> int:
    """Print the audit trail, filtered by time and study (a study key, or a Study Instance UID to hash)."""
    from dicom_node.read_audit import format_entry, parse_time, read_entries, select, study_key_for

    try:
        since, until = (parse_time(value) if value else None for value in (args.since, args.until))
    except ValueError as exc:
        print(f"pacsai audit: {exc}", file=sys.stderr)
        return 2
    study = study_key_for(args.study, settings.log_key) if args.study else ""
    for entry in select(read_entries(settings.audit_path), since=since, until=until, study_key=study):
        print(entry.xml if args.xml else format_entry(entry))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pacsai", description="PACS-integrated DICOM inference worker")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("node", help="run the DICOM node (SCP, spool, completeness, routing)").set_defaults(func=cmd_node)
    worker = sub.add_parser("worker", help="run a Celery worker (inference and delivery)")
    worker.add_argument("--no-deliver", action="store_true", help="do not take delivery jobs (inference only)")
    worker.set_defaults(func=cmd_worker)
    sub.add_parser("run", help="node + worker on one box").set_defaults(func=cmd_run)
    models = sub.add_parser("models", help="model registry")
    models_sub = models.add_subparsers(dest="models_command", required=True)
    models_sub.add_parser("list", help="list the installed models").set_defaults(func=cmd_models)
    check = models_sub.add_parser("check", help="validate one model and run it once on a synthetic volume")
    check.add_argument("name")
    check.set_defaults(func=cmd_models_check)
    run_model = models_sub.add_parser("run", help="run a model on a folder of DICOM files, no server needed")
    run_model.add_argument("name")
    run_model.add_argument("dicom_dir", type=Path)
    run_model.add_argument("--out", type=Path, required=True, help="folder for the SEG/SR results")
    run_model.set_defaults(func=cmd_models_run)
    status = sub.add_parser("status", help="counts of instances, series, jobs and deliveries by state")
    status.add_argument("--json", action="store_true")
    status.set_defaults(func=cmd_status)
    peers_help = "C-ECHO every peer (PACSAI_PEERS), QIDO-RS every DICOMweb peer; exit 1 if one fails"
    sub.add_parser("check-peers", help=peers_help).set_defaults(func=cmd_check_peers)
    audit = sub.add_parser("audit", help="show the audit trail (DICOM audit messages), filtered")
    audit.add_argument("--since", help="ISO 8601 date or date-time (UTC unless a zone is given)")
    audit.add_argument("--until", help="ISO 8601 date or date-time")
    audit.add_argument("--study", help="study key (as in the logs) or Study Instance UID")
    audit.add_argument("--xml", action="store_true", help="print the messages as stored (one XML message a line)")
    audit.set_defaults(func=cmd_audit)
    feedback = sub.add_parser("feedback", help="radiologists' corrections and rejections of our results")
    feedback_sub = feedback.add_subparsers(dest="feedback_command", required=True)
    export = feedback_sub.add_parser("export", help="write image + corrected-label NIfTI pairs and a CSV to DIR")
    export.add_argument("dir", type=Path)
    export.set_defaults(func=cmd_feedback_export)
    from dicom_node.console.cli import add_commands

    add_jobs_actions(add_commands(sub))  # web, users, jobs (the operator console's commands)
    return parser


def add_jobs_actions(jobs: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """`pacsai jobs retry|rerun|cancel|redeliver`: the operator's recovery commands (pacsai.job_actions)."""
    retry = jobs.add_parser("retry", help="start a failed, dead or cancelled job again with a fresh attempt budget")
    target = retry.add_mutually_exclusive_group(required=True)
    target.add_argument("job_id", nargs="?", help="job id or a unique prefix of it")
    target.add_argument("--all-dead", action="store_true", help="every dead job")
    retry.set_defaults(func=cmd_jobs_retry)
    for name, func, text in (
        (
            "rerun",
            cmd_jobs_rerun,
            "run the job's series again with the current model (a delivered job: a new revision)",
        ),
        ("cancel", cmd_jobs_cancel, "cancel a job that has not started or waits (pending, queued, retrying, waiting)"),
        ("redeliver", cmd_jobs_redeliver, "send a delivered job's results again from the outbox"),
    ):
        action = jobs.add_parser(name, help=text)
        action.add_argument("job_id", help="job id or a unique prefix of it")
        action.set_defaults(func=func)


def _operator() -> str:
    import getpass

    return f"{getpass.getuser()} (pacsai jobs)"


def _job_id(state: State, prefix: str) -> str:
    """The one job whose id starts with `prefix` (ActionRefused when none or several do)."""
    from pacsai.job_actions import ActionRefused

    matches = [row[0] for row in state._query("SELECT job_id FROM jobs WHERE job_id LIKE ?", (prefix + "%",))]
    if len(matches) != 1:
        raise ActionRefused(f"{'no job' if not matches else 'more than one job'} matches {prefix}")
    return str(matches[0])


def cmd_jobs_retry(settings: Settings, args: argparse.Namespace) -> int:
    from pacsai import job_actions

    state = State(settings.storage.database)
    refused: list[str] = []
    if args.all_dead:
        done, refused = job_actions.retry_all_dead(state, by=_operator(), settings=settings)
    else:
        done = [job_actions.retry(state, _job_id(state, args.job_id), by=_operator(), settings=settings)]
    for one in done:
        print(one.detail)
    for reason in refused:
        print(reason)
    print(f"{len(done)} job(s) retried; the node enqueues them on its next tick")
    return 0


def cmd_jobs_rerun(settings: Settings, args: argparse.Namespace) -> int:
    from pacsai import job_actions

    state = State(settings.storage.database)
    print(job_actions.rerun(state, _job_id(state, args.job_id), by=_operator(), settings=settings).detail)
    return 0


def cmd_jobs_cancel(settings: Settings, args: argparse.Namespace) -> int:
    from pacsai import job_actions

    state = State(settings.storage.database)
    print(job_actions.cancel(state, _job_id(state, args.job_id), by=_operator(), settings=settings).detail)
    return 0


def cmd_jobs_redeliver(settings: Settings, args: argparse.Namespace) -> int:
    from pacsai import job_actions
    from pacsai.celery_app import create_app
    from pacsai.enqueue import enqueue_delivery

    state = State(settings.storage.database)
    done, delivery = job_actions.redeliver(state, _job_id(state, args.job_id), by=_operator(), settings=settings)
    try:
        enqueue_delivery(create_app(settings), delivery)
    except Exception as exc:  # the node's reconciler sends it when the broker takes messages again
        print(f"pacsai jobs: broker unreachable ({type(exc).__name__}); the node sends it later", file=sys.stderr)
    print(done.detail)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    os.umask(0o077)  # the data dir holds patient data: files 0600, folders 0700 (docs/security.md)
    args = build_parser().parse_args(argv)
    try:
        settings = _settings()
    except ConfigError as exc:
        print(f"pacsai: configuration error: {exc}", file=sys.stderr)
        return 2
    logs.configure(settings.log_level)
    try:
        return int(args.func(settings, args))
    except PacsaiError as exc:
        print(f"pacsai: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
