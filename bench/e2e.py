# over 300 lines: one benchmark script (stack, timeline, stage log parsing, table)
"""End-to-end benchmark: a synthetic CT (default 300 × 512²) through `pacsai run` to a dcmtk storescp acting as PACS.

Embedded mode (no broker URL), ct-organs-tiny on the CPU. Two studies with different UIDs: "cold" is the first one
after the worker started (the pool process loads the model), "warm" the second. For each it prints the time of every
stage, from the node's database (instances.received_at, job_events) and the worker's "stage …" log lines
(worker/pipeline.py), and the peak RSS of the worker's pool processes (VmHWM from /proc, reset between the studies).

    .venv/bin/python bench/e2e.py [--slices 300] [--size 512]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import re
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.make_ct import write_ct  # noqa: E402
from models.ood import load_stats, save_stats  # noqa: E402
from models.registry import load_spec, sha256_of  # noqa: E402
from tests.services import (  # noqa: E402
    Process,
    free_port,
    pacsai_env,
    require_binary,
    start_pacsai,
    start_storescp,
    wait_until,
)

PACS_AE = "BENCHPACS"  # the storescp playing the PACS; it also sends the studies, so results go back to it
_STAGE_LINE = re.compile(r" job=(?P<job>\w+) .*stage (?P<stage>\w+): .*?(?P<seconds>[\d.]+) s$", re.MULTILINE)
_AT = r"^(?P<at>\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) .* job=(?P<job>\w+) "
_LOADED_LINE = re.compile(_AT + r".*stage load: ", re.MULTILINE)
_OOD_LINE = re.compile(_AT + r".*: OOD score ", re.MULTILINE)
_RESAMPLE_LINE = re.compile(_AT + r".*stage resample: ", re.MULTILINE)


@dataclass
class Stack:
    """storescp as the PACS and `pacsai run` (node + worker) on one data dir."""

    workdir: Path
    pacs: Process
    pacs_inbox: Path
    run: Process
    port: int

    @property
    def database(self) -> Path:
        return self.workdir / "data" / "pacsai.db"

    def stop(self) -> None:
        self.run.stop(timeout_s=60)
        self.pacs.stop()


def bench_models(workdir: Path) -> Path:
    """A copy of the shipped models in which ct-organs-tiny's OOD check still runs but never refuses.

    The generated phantom is no abdomen the model knows (its OOD score is above the threshold): as shipped, the
    worker would refuse it after the forward pass and the benchmark would time a "not evaluated" report.
    """
    target = workdir / "models"
    for spec_file in (REPO / "models").glob("*/spec.yaml"):
        shutil.copytree(spec_file.parent, target / spec_file.parent.name, ignore=shutil.ignore_patterns("__pycache__"))
    spec = load_spec("ct-organs-tiny", target)
    if spec.ood is not None:
        save_stats(
            spec.ood.stats, dataclasses.replace(load_stats(spec.ood), threshold=1e6)
        )  # finite: the SR reports it
        spec_file = target / "ct_organs_tiny" / "spec.yaml"
        text = spec_file.read_text().replace(spec.ood.stats_sha256, sha256_of(spec.ood.stats))
        spec_file.write_text(text)
    return target


def start_stack(workdir: Path, *, concurrency: int = 1, models_dir: Path | None = None) -> Stack:
    """Start the PACS and `pacsai run` with the product's completion timers; wait until the worker's pool is up."""
    pacs, pacs_port, inbox = start_storescp(workdir / "pacs", ae_title=PACS_AE)
    port = free_port()
    env = pacsai_env(
        workdir / "data",
        port=port,
        peers=f"{PACS_AE}@127.0.0.1:{pacs_port}",
        PACSAI_DESTINATION=PACS_AE,
        PACSAI_DEVICE="cpu",
        PACSAI_RELEASE_GRACE_S="2",  # the product's defaults, not the tests' short ones
        PACSAI_QUIET_PERIOD_S="10",
        PACSAI_WORKER_CONCURRENCY=str(concurrency),
        PACSAI_LOG_LEVEL="INFO",
        **({"PACSAI_MODELS_DIR": str(models_dir)} if models_dir else {}),
    )
    run = start_pacsai("run", workdir, env)
    stack = Stack(workdir, pacs, inbox, run, port)
    wait_until(lambda: len(pool_pids(run.popen.pid)) >= concurrency, 180, "the worker's pool processes", 0.5)
    return stack


def children_of() -> dict[int, list[int]]:
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError):
                continue
            tree.setdefault(ppid, []).append(int(entry.name))
    return tree


def pool_pids(run_pid: int) -> list[int]:
    """The Celery pool processes: children of the worker process (`pacsai run` → worker → pool)."""
    tree = children_of()
    workers = [pid for pid in tree.get(run_pid, []) if "worker" in _cmdline(pid)]
    return [pid for worker in workers for pid in tree.get(worker, []) if "worker" in _cmdline(pid)]


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def _status_kb(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


@dataclass
class PeakRss:
    """Polls VmHWM and VmRSS of the pool processes; `reset()` clears the kernel's high-water marks (clear_refs 5)."""

    run_pid: int
    peak_kb: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)

    def __post_init__(self) -> None:
        threading.Thread(target=self._poll, daemon=True).start()

    def _poll(self) -> None:
        while not self._stop.wait(0.2):
            for pid in pool_pids(self.run_pid):
                self.peak_kb = max(self.peak_kb, _status_kb(pid, "VmHWM"), _status_kb(pid, "VmRSS"))

    def reset(self) -> None:
        for pid in pool_pids(self.run_pid):
            with contextlib.suppress(OSError):  # not allowed: the polled VmRSS still bounds the peak from below
                Path(f"/proc/{pid}/clear_refs").write_text("5")
        self.peak_kb = 0

    def stop(self) -> None:
        self._stop.set()


def send(stack: Stack, files: Sequence[Path]) -> None:
    """storescu, one association, as the PACS; raises when it fails."""
    argv = [require_binary("storescu"), "-aet", PACS_AE, "-aec", "PACSAI", "127.0.0.1", str(stack.port)]
    subprocess.run([*argv, *map(str, files)], check=True, timeout=1800, capture_output=True)


def delivered_jobs(database: Path) -> list[str]:
    """Ids of delivered jobs, oldest first."""
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
        rows = db.execute("SELECT job_id FROM jobs WHERE state='delivered' ORDER BY created_at").fetchall()
    return [str(r[0]) for r in rows]


def ended_jobs(database: Path) -> dict[str, int]:
    if not database.exists():
        return {}
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
        return dict(db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall())


@dataclass(frozen=True, slots=True)
class Timeline:
    """Wall-clock times (time.time()) of one job, from the database."""

    last_received: float
    events: dict[str, float]  # first time the job entered each state ("created" for its creation)


def timeline(database: Path, job_id: str) -> Timeline:
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
        (series_key,) = db.execute("SELECT series_key FROM jobs WHERE job_id=?", (job_id,)).fetchone()
        (last,) = db.execute("SELECT MAX(received_at) FROM instances WHERE series_key=?", (series_key,)).fetchone()
        rows = db.execute(
            "SELECT to_state, from_state, at FROM job_events WHERE job_id=? ORDER BY event_id", (job_id,)
        ).fetchall()
    events: dict[str, float] = {}
    for to_state, from_state, at in rows:
        events.setdefault("created" if not from_state else str(to_state), float(at))
    return Timeline(float(last), events)


def stage_seconds(log: str, job_id: str) -> dict[str, float]:
    """The worker's "stage <name>: … <seconds> s" lines of one job (summed when a stage ran more than once)."""
    stages: dict[str, float] = {}
    for match in _STAGE_LINE.finditer(log.replace("\r", "")):
        if match["job"] == job_id[:8]:
            stages[match["stage"]] = stages.get(match["stage"], 0.0) + float(match["seconds"])
    loaded, scored, model = (_last_at(p, log, job_id) for p in (_LOADED_LINE, _OOD_LINE, _RESAMPLE_LINE))
    if loaded is not None and scored is not None and model is not None and loaded <= scored <= model:
        stages["ood"] = scored - loaded  # older code: a pass of its own before the model ("stage load" → its score)
    return stages


def _last_at(pattern: re.Pattern[str], log: str, job_id: str) -> float | None:
    """Wall-clock time of the job's last log line matching `pattern`."""
    times = [
        datetime.strptime(m["at"], "%Y-%m-%d %H:%M:%S,%f").timestamp()
        for m in pattern.finditer(log.replace("\r", ""))
        if m["job"] == job_id[:8]
    ]
    return times[-1] if times else None


def study_rows(tl: Timeline, stages: dict[str, float]) -> list[tuple[str, float]]:
    """The stages of one study, in seconds."""
    ev = tl.events
    in_job = ev["encoded"] - ev["running"]
    known = sum(stages.get(s, 0.0) for s in ("estimate", "load", "ood", "model", "encode", "write"))
    forward = stages.get("forward", stages.get("model", 0.0))  # before the split: the whole model stage
    ood = stages.get("ood", 0.0)
    return [
        ("last ACK → series complete (job created)", ev["created"] - tl.last_received),
        ("complete → queued", ev["queued"] - ev["created"]),
        ("queued → started (running)", ev["running"] - ev["queued"]),
        ("estimate (headers for the memory and domain checks)", stages.get("estimate", 0.0)),
        ("load/decode (read, decode, build the volume)", stages.get("load", 0.0)),
        ("OOD check as a pass of its own (now within the forward pass)", stages.get("ood", 0.0)),
        ("model stage, of which:", stages.get("model", 0.0)),
        ("  resample to the network grid", stages.get("resample", 0.0)),
        ("  forward pass (sliding window)", stages.get("forward", 0.0)),
        ("  labels (argmax, back to the source grid)", stages.get("labels", 0.0)),
        ("encode (SEG + SR, SC overlays when made)", stages.get("encode", 0.0)),
        ("write results to the outbox", stages.get("write", 0.0)),
        ("rest of the job (model load when cold, manifest + integrity, DB)", in_job - known),
        ("encoded → delivered (deliver queue + C-STORE)", ev["delivered"] - ev["encoded"]),
        ("**last ACK → delivered**", ev["delivered"] - tl.last_received),
        ("series complete → delivered, except the forward pass", ev["delivered"] - ev["created"] - forward),
        ("last ACK → delivered, except the forward pass", ev["delivered"] - tl.last_received - forward),
        ("last ACK → delivered, except forward pass and OOD check", ev["delivered"] - tl.last_received - forward - ood),
    ]


def run_study(stack: Stack, files: Sequence[Path], done_before: int) -> str:
    """Send one study and wait until its job is delivered; return the job id."""
    send(stack, files)

    def delivered() -> list[str] | None:
        if stack.run.popen.poll() is not None:
            raise RuntimeError(f"pacsai run exited: {stack.run.log()[-3000:]}")
        jobs = ended_jobs(stack.database)
        if jobs.get("failed") or jobs.get("dead"):
            raise RuntimeError(f"job failed: {jobs}\n{stack.run.log()[-3000:]}")
        ids = delivered_jobs(stack.database)
        return ids if len(ids) > done_before else None

    ids: list[str] = wait_until(delivered, 900, "the study's results delivered", 0.25)
    return ids[-1]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512, help="rows = columns")
    parser.add_argument("--workdir", type=Path, help="keep data and logs here (default: a temporary folder)")
    parser.add_argument(
        "--ood-as-shipped", action="store_true", help="keep ct-organs-tiny's OOD threshold (refuses the phantom)"
    )
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pacsai-e2e-") as tmp:
        workdir = args.workdir or Path(tmp)
        studies = [write_ct(workdir / f"ct{n}", slices=args.slices, size=args.size, study=n) for n in (0, 1)]
        stack = start_stack(workdir, models_dir=None if args.ood_as_shipped else bench_models(workdir))
        rss = PeakRss(stack.run.popen.pid)
        results: list[tuple[list[tuple[str, float]], int]] = []
        try:
            for number, files in enumerate(studies):
                job_id = run_study(stack, files, number)
                time.sleep(0.5)  # the last poll of the peak
                tl = timeline(stack.database, job_id)
                results.append((study_rows(tl, stage_seconds(stack.run.log(), job_id)), rss.peak_kb))
                rss.reset()
            received = Counter(p.name.split(".")[0] for p in stack.pacs_inbox.iterdir())
        except BaseException:
            print(stack.run.log()[-6000:], file=sys.stderr)
            raise
        finally:
            rss.stop()
            stack.stop()
        print(f"{args.slices} × {args.size}² CT through `pacsai run` (embedded, ct-organs-tiny, CPU) to storescp")
        print("| stage | cold (s) | warm (s) |\n|---|---|---|")
        for (name, cold), (_, warm) in zip(results[0][0], results[1][0], strict=True):
            print(f"| {name} | {cold:.2f} | {warm:.2f} |")
        cold_mb, warm_mb = (kb / 1024 for _, kb in results)
        print(f"| worker pool peak RSS (MB, VmHWM) | {cold_mb:.0f} | {warm_mb:.0f} |")
        print(f"\nfiles received by the PACS, by kind: {dict(sorted(received.items()))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
