"""Per model on this machine: load time, inference time per study, peak RSS, and the same with the model warm.

Each model runs in a fresh process (so RSS and load time are its own), on a real study from ../shared/dicom:
ct-organs-tiny on the 20-slice abdominal CT, cxr-pneumonia on a chest radiograph. Prints a table.
Run: .venv/bin/python bench/model_times.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import platform
import resource
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.services import SHARED  # noqa: E402

STUDIES = {
    "ct-organs-tiny": SHARED / "dicom" / "totalsegmentator-ct-abdomen",
    "cxr-pneumonia": SHARED / "dicom" / "pydicom-data" / "RG1_UNCR.dcm",
}


def measure(name: str, study: str, repeats: int) -> dict[str, float | str]:
    """Runs in a fresh process: cold load + first study, then warm studies with the loaded model."""
    from models.registry import load_model, load_spec, pick_device
    from worker.pipeline import process_series

    path = Path(study)
    paths = sorted(path.iterdir()) if path.is_dir() else [path]
    started = time.perf_counter()
    model = load_model(load_spec(name), pick_device("auto"))
    load_s = time.perf_counter() - started
    started = time.perf_counter()
    process_series(paths, model)
    first_s = time.perf_counter() - started
    warm = []
    for _ in range(repeats):
        started = time.perf_counter()
        process_series(paths, model)
        warm.append(time.perf_counter() - started)
    return {
        "load_s": load_s,
        "first_s": first_s,
        "warm_s": sorted(warm)[len(warm) // 2],
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "device": str(model.device),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    context = multiprocessing.get_context("spawn")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}\n")
    print("| model | device | load (s) | first study, cold (s) | study, warm (s, median) | peak RSS (MB) |")
    print("|---|---|---|---|---|---|")
    for name, study in STUDIES.items():
        with context.Pool(1) as pool:
            row = pool.apply(measure, (name, str(study), args.repeats))
        print(
            f"| {name} | {row['device']} | {row['load_s']:.2f} | {row['first_s']:.2f} | {row['warm_s']:.2f} | "
            f"{row['peak_rss_mb']:.0f} |"
        )
    print("\n(first study includes reading + decoding the DICOM files, inference, and SEG/SR/SC encoding)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
