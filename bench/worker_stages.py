"""In-process profile of one job's worker stages: the generated CT through worker.pipeline.process_series.

No node, broker or PACS: the model is loaded first (as a warm worker has it), then the series runs once (plus
`--warm-up` runs before it) and the script prints the pipeline's "stage" times, the process' peak RSS (ru_maxrss,
model included), and with `--profile` the functions taking the most cumulative time (cProfile).

    .venv/bin/python bench/worker_stages.py [--slices 300] [--size 512] [--profile 30] [--overlays]
"""

from __future__ import annotations

import argparse
import cProfile
import dataclasses
import logging
import pstats
import resource
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from bench.e2e import bench_models  # noqa: E402
from bench.make_ct import write_ct  # noqa: E402
from models.registry import LoadedModel, load_model, load_spec  # noqa: E402
from worker import collect, pipeline  # noqa: E402
from worker.stage_clock import timing  # noqa: E402


def peak_rss_mb() -> float:
    """This process' peak resident set size so far (Linux reports kB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


class StageLog(logging.Handler):
    """The "stage <name>: ... in X s" times the worker logs (infer.py splits the model stage), summed by name."""

    def __init__(self, stages: dict[str, float]) -> None:
        super().__init__()
        self.stages = stages

    def emit(self, record: logging.LogRecord) -> None:
        message = str(record.msg)
        if message.startswith("stage ") and isinstance(record.args, tuple) and record.args:
            name = "model: " + message.split(":")[0].removeprefix("stage ")
            if record.name == "worker.infer":
                self.stages[name] = self.stages.get(name, 0.0) + float(str(record.args[-1]))


def run_once(paths: Sequence[Path], model: LoadedModel, *, overlays: bool) -> tuple[float, dict[str, float]]:
    logged: dict[str, float] = {}
    handler = StageLog(logged)
    logging.getLogger("worker.infer").addHandler(handler)
    try:
        with collect.after_the_job():  # as the worker runs a job (worker/tasks.py)
            with timing() as stages:
                started = time.monotonic()
                results = pipeline.process_series(paths, model, overlays=overlays)
                elapsed = time.monotonic() - started
            stages.update(logged)
            for ds in results:  # what the job then writes to the outbox
                pipeline._to_bytes(ds)
            stages["encode+write"] = time.monotonic() - started - elapsed + stages.get("encode", 0.0)
            del results
            written = time.monotonic()
        stages["collect after the job"] = time.monotonic() - written
    finally:
        logging.getLogger("worker.infer").removeHandler(handler)
    return elapsed, stages


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--slices", type=int, default=300)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--model", default="ct-organs-tiny")
    parser.add_argument("--warm-up", type=int, default=0, help="runs before the measured one")
    parser.add_argument("--overlays", action="store_true", help="also the SEG's SC overlays (the SC fallback)")
    parser.add_argument("--profile", type=int, default=0, metavar="N", help="print the N costliest functions")
    parser.add_argument(
        "--ood", action="store_true", help="with the OOD check (threshold 1e6 as in bench/e2e.py: runs, never refuses)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    with tempfile.TemporaryDirectory(prefix="pacsai-stages-") as tmp:
        paths = write_ct(Path(tmp), slices=args.slices, size=args.size)
        print(f"after writing the CT: peak RSS {peak_rss_mb():.0f} MB")
        spec = load_spec(args.model, bench_models(Path(tmp))) if args.ood else load_spec(args.model)
        model = load_model(spec if args.ood else dataclasses.replace(spec, ood=None), "cpu")
        collect.freeze_loaded()  # as pipeline.warm_model does
        print(f"after loading the model: peak RSS {peak_rss_mb():.0f} MB")
        for _ in range(args.warm_up):
            run_once(paths, model, overlays=args.overlays)
        profiler = cProfile.Profile() if args.profile else None
        if profiler:
            profiler.enable()
        elapsed, stages = run_once(paths, model, overlays=args.overlays)
        if profiler:
            profiler.disable()
    print(f"process_series: {elapsed:.2f} s; " + ", ".join(f"{k} {v:.2f} s" for k, v in stages.items()))
    written = stages["encode+write"] - stages.get("encode", 0.0)  # serialising the results, as the job does
    outside = elapsed + written + stages["collect after the job"] - stages.get("model: forward", 0.0)
    print(
        f"outside the forward pass (serialisation and the collection after the job included): {outside:.2f} s; "
        f"peak RSS {peak_rss_mb():.0f} MB"
    )
    if profiler:
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(args.profile)
    return 0


if __name__ == "__main__":
    sys.exit(main())
