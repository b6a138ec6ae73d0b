"""Ingest benchmark: dcmtk storescp, Debian Orthanc and the pacsai node side by side, fed by dcmtk storescu.

Sends a synthetic CT series (default 300 × 512²) and many small instances (default 2000 × 38 KB) to each receiver
with 1 and with 4 parallel associations (the files split in 4), `--repeats` times, every receiver restarted on empty
storage before each measurement, and prints a markdown table: instances per second (median of the repeats), the
ratios of pacsai to the others, and the receivers' CPU time per instance (utime + stime of the receiver's process
tree from /proc, between the first association's start and the last one's end).

    .venv/bin/python bench/ingest.py [--repeats 3] [--quick] [--with-polling] [--receivers N ...] [--baseline DIR]

`--baseline DIR` adds the node of another checkout as a fifth column, measured in the same run (this host's speed
moves between runs, so a before/after is only fair side by side): `git worktree add /tmp/before <commit>`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.make_ct import write_ct, write_small  # noqa: E402
from pacsai.state import State  # noqa: E402
from tests.services import (  # noqa: E402
    Process,
    free_port,
    pacsai_env,
    require_binary,
    start_orthanc,
    start_pacsai,
    start_storescp,
)

CALLING_AE = "BENCHSCU"
RECEIVERS = ("storescp", "Orthanc", "pacsai")
POLLING = "pacsai polling"  # --with-polling: the node with PACSAI_PROMPT_WAKE=false (pynetdicom's 1 ms polling)
SEVERAL = "pacsai ×{}"  # --receivers N: the node with PACSAI_RECEIVERS=N (N processes share the port)
BASELINE = "pacsai before"  # --baseline DIR: the node of another checkout (a git worktree of an earlier commit)
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


@dataclass
class Receiver:
    """One running receiver: where to send, which process to account CPU to, how to count what it stored."""

    name: str
    process: Process
    ae_title: str
    port: int
    stored: Callable[[], int]

    def stop(self) -> None:
        self.process.stop()


@dataclass(frozen=True, slots=True)
class Sample:
    rate: float  # instances per second, first association's start to last one's end
    cpu_ms: float  # receiver CPU per instance


def tree_cpu_s(root: int) -> float:
    """utime + stime of a process and all its descendants (live ones, plus reaped children's cutime/cstime)."""
    children: dict[int, list[int]] = {}
    times: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as handle:
                fields = handle.read().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        pid = int(entry)
        children.setdefault(int(fields[1]), []).append(pid)  # fields[1] is ppid (field 4 of stat)
        times[pid] = sum(int(value) for value in fields[11:15])  # utime stime cutime cstime
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += times.get(pid, 0)
        todo.extend(children.get(pid, []))
    return total / CLOCK_TICKS


def start_receiver(name: str, workdir: Path, baseline: Path | None = None) -> Receiver:
    """Start one receiver on free loopback ports, storing under `workdir` (empty); `baseline`: BASELINE's code."""
    if name == "storescp":
        process, port, received = start_storescp(workdir, ae_title="STORESCP")
        return Receiver(name, process, "STORESCP", port, lambda: sum(1 for _ in received.iterdir()))
    if name == "Orthanc":
        orthanc = start_orthanc(workdir, modalities={}, lua=None)

        def orthanc_count() -> int:
            with urllib.request.urlopen(f"{orthanc.base}/statistics", timeout=30) as response:
                import json

                return int(json.loads(response.read())["CountInstances"])

        return Receiver(name, orthanc.process, orthanc.ae_title, orthanc.dicom_port, orthanc_count)
    port = free_port()
    env = pacsai_env(
        workdir / "data",
        port=port,
        peers="",
        PACSAI_ALLOWED_CALLERS=CALLING_AE,
        PACSAI_RELEASE_GRACE_S="2",  # the product's defaults, not the tests' short ones
        PACSAI_QUIET_PERIOD_S="10",
        PACSAI_LOG_LEVEL="WARNING",
        PACSAI_PROMPT_WAKE="false" if name == POLLING else "true",
        PACSAI_RECEIVERS=name.removeprefix(SEVERAL.format("")) if name.startswith(SEVERAL.format("")) else "1",
    )
    process = start_pacsai("node", workdir, env, repo=baseline if name == BASELINE and baseline else REPO)

    def pacsai_count() -> int:
        state = State(workdir / "data" / "pacsai.db")
        try:
            return state.counts()["instances"]["received"]
        finally:
            state.close()

    return Receiver(name, process, "PACSAI", port, pacsai_count)


def send(receiver: Receiver, batches: Sequence[Sequence[Path]]) -> Sample:
    """storescu with one association per batch, all at once; returns the rate and the receiver's CPU per instance."""
    storescu = require_binary("storescu")
    count = sum(len(batch) for batch in batches)
    cpu_before = tree_cpu_s(receiver.process.popen.pid)
    started = time.monotonic()
    senders = [
        subprocess.Popen(
            # -ta: storescp serves one association at a time, the others wait for their A-ASSOCIATE-AC meanwhile
            [storescu, "-ta", "600", "-aet", CALLING_AE, "-aec", receiver.ae_title, "127.0.0.1", str(receiver.port)]
            + list(map(str, b)),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            env={**os.environ, "TCP_NODELAY": "1"},  # as the receivers: without it storescu waits on delayed ACKs
        )
        for b in batches
    ]
    errors = [sender.communicate(timeout=1800)[1] for sender in senders]
    elapsed = time.monotonic() - started
    cpu_s = tree_cpu_s(receiver.process.popen.pid) - cpu_before
    failed = [
        err.decode(errors="replace")[-500:] for sender, err in zip(senders, errors, strict=True) if sender.returncode
    ]
    if failed:
        raise RuntimeError(f"storescu to {receiver.name} failed: {failed[0]}")
    stored = receiver.stored()
    if stored != count:
        raise RuntimeError(f"{receiver.name} stored {stored} of {count} instances")
    return Sample(rate=count / elapsed, cpu_ms=1000 * cpu_s / count)


def split(paths: Sequence[Path], parts: int) -> list[list[Path]]:
    """Contiguous chunks of (nearly) equal size: each association sends one part of the series."""
    size = -(-len(paths) // parts)
    return [list(paths[i : i + size]) for i in range(0, len(paths), size)]


def measure(
    files: Sequence[Path],
    associations: int,
    repeats: int,
    workdir: Path,
    names: Sequence[str] = RECEIVERS,
    baseline: Path | None = None,
) -> dict[str, list[Sample]]:
    """Every receiver started fresh for each repeat (empty storage), the order rotated between repeats."""
    samples: dict[str, list[Sample]] = {name: [] for name in names}
    for repeat in range(repeats):
        run_dir = workdir / f"run-{associations}-{repeat}"
        receivers: list[Receiver] = []
        try:
            for name in names:  # inside the try: a receiver that fails to start stops those already running
                receivers.append(start_receiver(name, run_dir / name, baseline))
            time.sleep(1.0)  # let start-up work (peer checks, recovery scans) settle
            turn = repeat % len(receivers)
            for receiver in receivers[turn:] + receivers[:turn]:
                samples[receiver.name].append(send(receiver, split(files, associations)))
        finally:
            for receiver in receivers:
                receiver.stop()
            shutil.rmtree(run_dir, ignore_errors=True)
    return samples


def row(dataset: str, associations: int, samples: dict[str, list[Sample]]) -> str:
    rate = {name: statistics.median(s.rate for s in found) for name, found in samples.items()}
    cpu = {name: statistics.median(s.cpu_ms for s in found) for name, found in samples.items()}
    cells = [
        dataset,
        str(associations),
        *(f"{rate[name]:.0f}" for name in samples),
        f"{rate['pacsai'] / rate['storescp']:.2f}×",
        f"{rate['pacsai'] / rate['Orthanc']:.2f}×",
        *(f"{cpu[name]:.2f}" for name in samples),
    ]
    return "| " + " | ".join(cells) + " |"


def header(names: Sequence[str]) -> str:
    columns = [
        "dataset",
        "associations",
        *(f"{name} inst/s" for name in names),
        "pacsai / storescp",
        "pacsai / Orthanc",
        *(f"CPU ms/inst {name}" for name in names),
    ]
    return "| " + " | ".join(columns) + " |\n" + "|---" * len(columns) + "|"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ct-slices", type=int, default=300, help="0: no CT rows")
    parser.add_argument("--ct-size", type=int, default=512, help="rows = columns of the CT")
    parser.add_argument("--small-count", type=int, default=2000, help="0: no small-instance rows")
    parser.add_argument("--associations", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--quick", action="store_true", help="smoke run: 40 CT slices, 200 small instances, 1 repeat")
    parser.add_argument("--workdir", type=Path, help="keep data here (default: a temporary folder, removed)")
    parser.add_argument(
        "--with-polling", action="store_true", help=f"also '{POLLING}': the node with PACSAI_PROMPT_WAKE=false"
    )
    parser.add_argument(
        "--baseline",
        type=Path,
        metavar="DIR",
        help=f"also '{BASELINE}': the node from the checkout in DIR (e.g. git worktree add DIR <earlier commit>)",
    )
    parser.add_argument(
        "--receivers",
        type=int,
        nargs="*",
        default=[],
        metavar="N",
        help=f"also '{SEVERAL.format('N')}': the node with PACSAI_RECEIVERS=N (several values: one column each)",
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = 1
        args.ct_slices, args.small_count = min(args.ct_slices, 40), min(args.small_count, 200)
    with tempfile.TemporaryDirectory(prefix="pacsai-ingest-") as tmp:
        workdir = args.workdir or Path(tmp)
        datasets = []
        if args.ct_slices > 0:
            ct = write_ct(workdir / "ct", slices=args.ct_slices, size=args.ct_size)
            datasets.append((f"{len(ct)} × {args.ct_size}² CT ({sum(p.stat().st_size for p in ct) / 1e6:.0f} MB)", ct))
        if args.small_count > 0:
            small = write_small(workdir / "small", count=args.small_count)
            datasets.append((f"{len(small)} small instances ({small[0].stat().st_size / 1e3:.0f} KB)", small))
        names = (
            *RECEIVERS,
            *(SEVERAL.format(n) for n in args.receivers),
            *([POLLING] if args.with_polling else []),
            *([BASELINE] if args.baseline else []),
        )
        lines = []
        for label, files in datasets:
            for associations in args.associations:
                samples = measure(files, associations, args.repeats, workdir, names, args.baseline)
                lines.append(row(label, associations, samples))
                print(lines[-1], file=sys.stderr, flush=True)
        print(
            f"storescu → receiver over loopback, median of {args.repeats}; CPU = receiver process tree, ms per instance"
        )
        print(header(names))
        print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
