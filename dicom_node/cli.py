"""`pacsai` command line: node, worker, run, models, status, audit."""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from worker import logs
from worker.errors import ConfigError, ModelError, PacsaiError
from worker.settings import Settings

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

    return settings.worker_models or tuple(spec.name for spec in list_specs(settings.models_dir))


def check_models(settings: Settings, names: tuple[str, ...]) -> str:
    """Load each served model once on the CPU (spec, checksum, weights); return the first error, or ''."""
    from models.registry import ModelLoadError, load_model, load_spec
    from models.spec import SpecError

    try:
        for name in names:
            load_model(load_spec(name, settings.models_dir), "cpu")
    except (ModelLoadError, SpecError) as exc:
        return str(exc)
    return ""


def cmd_worker(settings: Settings, args: argparse.Namespace) -> int:
    from worker.celery_app import create_app
    from worker.enqueue import DELIVER_QUEUE, infer_queue

    try:
        # in a spawned child: torch must not even load in the parent of Celery's forked pool (W6: CUDA initialised
        # there is unusable in the children, and its thread pools deadlock them); the pool processes load it
        with multiprocessing.get_context("spawn").Pool(1) as pool:
            names = pool.apply(served_models, (settings,))
            problem = pool.apply(check_models, (settings, names)) if names else "no model installed"
    except PacsaiError as exc:
        problem = str(exc)
    if problem:   # W5: refuse to start, so no job is consumed by a worker that cannot run it
        print(f"pacsai worker: not starting: {problem}", file=sys.stderr)
        return 2
    queues = [infer_queue(name) for name in names] + ([DELIVER_QUEUE] if not args.no_deliver else [])
    app = create_app(settings)
    argv = ["worker", "-Q", ",".join(queues), "--concurrency", str(settings.worker_concurrency),
            "--loglevel", settings.log_level, "--hostname", f"pacsai-{os.getpid()}@%h"]
    if not settings.broker_url:
        argv += ["--without-mingle", "--without-gossip"]
    app.worker_main(argv)
    return 0


def cmd_run(settings: Settings, args: argparse.Namespace) -> int:
    """Node and worker on one box: the worker as a child process, the node in this one."""
    from dicom_node.node import run_node

    worker = subprocess.Popen([sys.executable, "-m", "dicom_node.cli", "worker"])
    try:
        return run_node(settings)
    finally:
        worker.terminate()
        worker.wait(timeout=60)


def cmd_models(settings: Settings, args: argparse.Namespace) -> int:
    from models.registry import list_specs

    specs = list_specs(settings.models_dir)
    print(f"{'name':<24} {'version':<10} {'task':<14} {'modalities':<12} labels")
    for spec in specs:
        labels = ", ".join(label.name for label in spec.labels)
        print(f"{spec.name:<24} {spec.version:<10} {spec.task.value:<14} {','.join(spec.modalities):<12} {labels}")
    return 0


def _load(settings: Settings, name: str) -> LoadedModel:
    from models.registry import ModelLoadError, load_model, load_spec, pick_device
    from models.spec import SpecError

    try:
        return load_model(load_spec(name, settings.models_dir), pick_device(settings.device))
    except (ModelLoadError, SpecError) as exc:
        raise ModelError(str(exc)) from None


def cmd_models_check(settings: Settings, args: argparse.Namespace) -> int:
    from worker.offline import check_model

    model = _load(settings, args.name)
    print(f"{args.name}: spec valid, weights checksum ok, loaded on {model.device}; {check_model(model)}")
    return 0


def cmd_models_run(settings: Settings, args: argparse.Namespace) -> int:
    from worker.offline import run_folder

    if not args.dicom_dir.is_dir():
        print(f"pacsai: {args.dicom_dir} is not a folder", file=sys.stderr)
        return 2
    outcomes = run_folder(_load(settings, args.name), args.dicom_dir, args.out)
    for ordinal, outcome in outcomes.items():
        print(f"series {ordinal}: {outcome}")
    print(f"results in {args.out}")
    return 0 if any(not text.startswith("not processed") for text in outcomes.values()) else 1


def cmd_status(settings: Settings, args: argparse.Namespace) -> int:
    from worker.state import State

    if not settings.database_url and not settings.database_path.exists():
        print(f"no database yet at {settings.database_path}")
        return 1
    counts = State(settings.database).counts()
    if args.json:
        print(json.dumps(counts, indent=2, sort_keys=True))
        return 0
    for table, by_state in counts.items():
        print(f"{table:<11} " + ("  ".join(f"{k}={v}" for k, v in sorted(by_state.items())) or "none"))
    return 0


def cmd_check_peers(settings: Settings, args: argparse.Namespace) -> int:
    """E7: C-ECHO every configured peer; one line each, exit status 1 when any fails."""
    from dicom_node.peers_check import check_peers, report

    if not settings.peers:
        print("no peers configured (PACSAI_PEERS)")
        return 1
    checks = check_peers(settings)
    report(checks)
    for check in checks:
        print(f"{check.peer.ae_title:<16} {check.address:<28} {'ok' if check.reachable else 'FAILED':<7} "
              f"{check.detail}")
    return 0 if all(check.reachable for check in checks) else 1


def cmd_audit(settings: Settings, args: argparse.Namespace) -> int:
    """Print the audit trail, filtered by time and study (a study key, or a Study Instance UID to hash)."""
    from dicom_node.audit_log import format_entry, parse_time, read_entries, select, study_key_for

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
    sub.add_parser("check-peers", help="C-ECHO every configured peer (PACSAI_PEERS); exit 1 if one fails"
                   ).set_defaults(func=cmd_check_peers)
    audit = sub.add_parser("audit", help="show the audit trail (DICOM audit messages), filtered")
    audit.add_argument("--since", help="ISO 8601 date or date-time (UTC unless a zone is given)")
    audit.add_argument("--until", help="ISO 8601 date or date-time")
    audit.add_argument("--study", help="study key (as in the logs) or Study Instance UID")
    audit.add_argument("--xml", action="store_true", help="print the messages as stored (one XML message a line)")
    audit.set_defaults(func=cmd_audit)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
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
