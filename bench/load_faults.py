"""Page faults and CPU time of warm series loads (worker.load_volume.load_series), measured in-process.

Writes the synthetic CT (bench/make_ct.py) with each file's hash recorded as the spool does, loads it `--loads`
times in one process (the first load is cold and left out of the medians) and prints, per load: minor page faults,
huge pages faulted in (thp, from /proc/vmstat: the whole machine's), user and system CPU time and wall time. With
`--baseline FILE`, a load_volume.py from another commit loads the same files alternately with ours (order swapped
every round, results checked equal): the machine is shared, so compare faults and CPU times of the same run.

    git show HEAD~1:worker/load_volume.py > /tmp/load_volume_before.py
    .venv/bin/python bench/load_faults.py --loads 10 --baseline /tmp/load_volume_before.py [--slices 300] [--no-check]
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import hashlib
import importlib.util
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.make_ct import write_ct  # noqa: E402
from pacsai.storage import HASH_ATTRIBUTE  # noqa: E402
from worker import load_volume  # noqa: E402
from worker.volume import Volume  # noqa: E402

COLUMNS = ("faults", "thp", "user_s", "sys_s", "wall_s")


def record_hashes(paths: Sequence[Path]) -> None:
    """The sha256 the spool keeps on each file (S7), so that a checked load hashes as the worker's does."""
    for path in paths:
        with contextlib.suppress(OSError):  # no extended attributes here: the load then checks nothing
            os.setxattr(path, HASH_ATTRIBUTE, hashlib.sha256(path.read_bytes()).hexdigest().encode("ascii"))


def thp_faults() -> int:
    """Huge pages faulted in so far, machine-wide (0 where /proc/vmstat has no such counter)."""
    with contextlib.suppress(OSError):
        for line in Path("/proc/vmstat").read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == "thp_fault_alloc":
                return int(value)
    return 0


def measure(load: Callable[[], Volume]) -> tuple[Volume, tuple[float, ...]]:
    """One load's (faults, thp, user, sys, wall); the volume is returned to be compared, then dropped."""
    before, thp, started = resource.getrusage(resource.RUSAGE_SELF), thp_faults(), time.perf_counter()
    volume = load()
    wall, after = time.perf_counter() - started, resource.getrusage(resource.RUSAGE_SELF)
    return volume, (
        after.ru_minflt - before.ru_minflt,
        thp_faults() - thp,
        after.ru_utime - before.ru_utime,
        after.ru_stime - before.ru_stime,
        wall,
    )


def module_from(path: Path) -> ModuleType:
    spec = importlib.util.spec_from_file_location("baseline_load_volume", path)
    if spec is None or spec.loader is None:
        raise SystemExit(f"cannot import {path}")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def same(a: Volume, b: Volume) -> bool:
    return (
        a.array.dtype == b.array.dtype
        and a.array.shape == b.array.shape
        and bool((a.array == b.array).all())
        and bool((a.affine == b.affine).all())
        and a.frame_numbers == b.frame_numbers
        and all(x == y for x, y in zip(a.datasets, b.datasets, strict=True))
    )


def run(
    paths: Sequence[Path], modules: dict[str, ModuleType], *, loads: int, check: bool
) -> dict[str, list[tuple[float, ...]]]:
    """Alternate the modules' loads `loads` times each; print every load's numbers as they come."""
    rows: dict[str, list[tuple[float, ...]]] = {name: [] for name in modules}
    print(f"{'load':>4} {'version':10}" + "".join(f"{c:>10}" for c in COLUMNS))
    for index in range(loads):
        order = list(modules.items()) if index % 2 == 0 else list(modules.items())[::-1]
        volumes = []
        for name, module in order:
            volume, numbers = measure(partial(module.load_series, paths, check_files=check))
            volumes.append(volume)
            rows[name].append(numbers)
            print(
                f"{index:>4} {name:10}"
                + "".join(f"{n:>10.0f}" if k < 2 else f"{n:>10.2f}" for k, n in enumerate(numbers))
            )
        if not all(same(volumes[0], other) for other in volumes[1:]):
            raise SystemExit("the versions loaded different volumes")
        del volumes
        gc.collect()
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--loads", type=int, default=8, help="loads of each version (the first is cold)")
    parser.add_argument("--baseline", type=Path, help="another load_volume.py to alternate with ours")
    parser.add_argument("--no-check", action="store_true", help="check_files=False (no hashing as files are read)")
    args = parser.parse_args(argv)
    modules: dict[str, ModuleType] = {"current": load_volume}
    if args.baseline:
        modules = {"baseline": module_from(args.baseline), "current": load_volume}
    with tempfile.TemporaryDirectory(prefix="pacsai-faults-") as tmp:
        paths = write_ct(Path(tmp), slices=args.slices, size=args.size)
        record_hashes(paths)
        rows = run(paths, modules, loads=args.loads, check=not args.no_check)
    print(f"\nmedians of loads 1-{args.loads - 1} (load 0 is cold):")
    for name, numbers in rows.items():
        warm = numbers[1:] or numbers
        medians = [statistics.median(n[k] for n in warm) for k in range(len(COLUMNS))]
        print(f"     {name:10}" + "".join(f"{m:>10.0f}" if k < 2 else f"{m:>10.2f}" for k, m in enumerate(medians)))
    print(f"peak RSS of this process: {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
