"""Scale-out benchmark: N synthetic CT studies through `pacsai run` with 1 worker process, then with 2.

Each setting gets a fresh data dir and a warm stack (small warm-up studies until every pool process has run one);
the studies are sent one association each, back to back, and the throughput is studies per minute from the first
job created (series complete) to the last one delivered, from the node's database. Prints both and the ratio.

`--ingest-first`: all studies in one association instead; their series complete together when it is released
(each holds the instance count it declares), so the workers run while the node is idle: the workers' own scaling,
not the box's (on 2 cores the node's ingest and storescu otherwise take a large share of the CPU).

    .venv/bin/python bench/scale.py [--studies 20] [--slices 60] [--processes 1 2] [--ingest-first]
"""

from __future__ import annotations

import argparse
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.e2e import Stack, bench_models, ended_jobs, pool_pids, send, start_stack  # noqa: E402
from bench.make_ct import write_ct  # noqa: E402
from tests.services import wait_until  # noqa: E402


def job_times(database: Path, *, after: float) -> tuple[float, float, list[float]]:
    """First job created, last job delivered (wall clock) and each job's running → encoded seconds, of the jobs
    created after `after` (not the warm-up's)."""
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as db:
        jobs = "job_id IN (SELECT job_id FROM job_events WHERE from_state='' AND at > ?)"
        (first,) = db.execute(f"SELECT MIN(at) FROM job_events WHERE from_state='' AND {jobs}", (after,)).fetchone()
        (last,) = db.execute(
            f"SELECT MAX(at) FROM job_events WHERE to_state='delivered' AND {jobs}", (after,)
        ).fetchone()
        spans = db.execute(
            "SELECT MAX(CASE WHEN to_state='encoded' THEN at END) - MAX(CASE WHEN to_state='running' THEN at END)"
            f" FROM job_events WHERE {jobs} GROUP BY job_id",
            (after,),
        ).fetchall()
    return float(first), float(last), [float(s) for (s,) in spans if s is not None]


def torch_loaded(pid: int) -> bool:
    try:
        return "libtorch" in Path(f"/proc/{pid}/maps").read_text()
    except OSError:
        return False


def warm_up(stack: Stack, folder: Path, processes: int) -> None:
    """Small studies, two at a time, until every pool process has run one (imported torch, loaded the model)."""
    for round_number in range(4 * processes):
        if all(torch_loaded(pid) for pid in pool_pids(stack.run.popen.pid)):
            return
        before = ended_jobs(stack.database).get("delivered", 0)
        batch = [
            write_ct(folder / f"{round_number}-{n}", slices=20, size=128, study=900 + 2 * round_number + n)
            for n in range(2)
        ]
        senders = [threading.Thread(target=send, args=(stack, files)) for files in batch]
        for sender in senders:
            sender.start()
        for sender in senders:
            sender.join()
        target = before + 2

        def delivered(target: int = target) -> bool:
            return ended_jobs(stack.database).get("delivered", 0) >= target

        wait_until(delivered, 300, "warm-up studies")
    raise RuntimeError("some worker pool process never took a warm-up study")


def run_setting(
    workdir: Path, studies: Sequence[Sequence[Path]], processes: int, *, ingest_first: bool = False
) -> tuple[float, float, float]:
    """Studies per minute (first complete → last delivered), wall seconds from first send, mean job seconds."""
    stack: Stack = start_stack(workdir, concurrency=processes, models_dir=bench_models(workdir))
    try:
        warm_up(stack, workdir / "warm-up", processes)
        done = ended_jobs(stack.database).get("delivered", 0)
        started = time.time()
        batches = [[path for study in studies for path in study]] if ingest_first else studies
        for files in batches:
            send(stack, files)

        def all_delivered() -> bool:
            if stack.run.popen.poll() is not None:
                raise RuntimeError(f"pacsai run exited: {stack.run.log()[-3000:]}")
            jobs = ended_jobs(stack.database)
            if jobs.get("failed") or jobs.get("dead"):
                raise RuntimeError(f"jobs failed: {jobs}")
            return jobs.get("delivered", 0) == done + len(studies)

        wait_until(all_delivered, 600 + 120 * len(studies), f"{len(studies)} studies delivered", 0.5)
        first, last, spans = job_times(stack.database, after=started)
    except BaseException:
        print(stack.run.log()[-6000:], file=sys.stderr)
        raise
    finally:
        stack.stop()
    return 60 * len(studies) / (last - first), last - started, statistics.mean(spans)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--studies", type=int, default=20)
    parser.add_argument("--slices", type=int, default=60, help="slices per CT study")
    parser.add_argument("--size", type=int, default=512, help="rows = columns")
    parser.add_argument("--processes", type=int, nargs="+", default=[1, 2], help="PACSAI_WORKER_CONCURRENCY values")
    parser.add_argument("--workdir", type=Path, help="keep data and logs here (default: a temporary folder)")
    parser.add_argument("--ingest-first", action="store_true", help="all studies in one association (see above)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pacsai-scale-") as tmp:
        workdir = args.workdir or Path(tmp)
        studies = [
            write_ct(workdir / "studies" / str(n), slices=args.slices, size=args.size, study=100 + n)
            for n in range(args.studies)
        ]
        rows = []
        for processes in args.processes:
            rate, wall_s, job_s = run_setting(
                workdir / f"p{processes}", studies, processes, ingest_first=args.ingest_first
            )
            rows.append((processes, rate, wall_s, job_s))
            print(f"{processes} process(es): {rate:.1f} studies/min", file=sys.stderr, flush=True)
    how = "in one association, then processed" if args.ingest_first else "one association each, back to back"
    print(f"{args.studies} CT studies × {args.slices} × {args.size}² through `pacsai run` (embedded, CPU), {how}")
    print(
        "| worker processes | studies/min (first complete → last delivered) | first send → last delivered (s) |"
        " mean job running → encoded (s) | throughput vs 1 process |"
    )
    print("|---|---|---|---|---|")
    for processes, rate, wall_s, job_s in rows:
        print(f"| {processes} | {rate:.1f} | {wall_s:.0f} | {job_s:.1f} | {rate / rows[0][1]:.2f}× |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
