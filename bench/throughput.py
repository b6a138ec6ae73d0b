"""Load test: parallel storescu senders × studies (real series, re-UIDed per study) through node + worker into Orthanc.

Prints a table: studies sent, instances acknowledged, instances in the database and in the spool, jobs by state,
SEG/SR in the PACS, duplicates; and the throughput. Run: .venv/bin/python bench/throughput.py [--senders 4 --studies 25]
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))


from pacsai.state import State  # noqa: E402
from tests.checks import reuid_series  # noqa: E402
from tests.services import (  # noqa: E402
    SHARED,
    free_port,
    pacsai_env,
    start_orthanc,
    start_pacsai,
    start_redis,
    supervised,
    wait_until,
)

SERIES = [
    SHARED / "dicom" / "totalsegmentator-ct-abdomen",  # routed to ct-organs-tiny
    SHARED / "dicom" / "dcm_qa_12bit",
]  # 3 MR images: no model, recorded and cleaned


def make_study(index: int, target: Path) -> int:
    """Copy the series with new Study/Series/SOP UIDs for study `index`; return the instance count."""
    root = f"1.2.826.0.1.3680043.10.1051.9.{index}"
    return sum(
        reuid_series(series, target / str(number), f"{root}.{number}", study_uid=f"{root}.0")
        for number, series in enumerate(SERIES)
    )


def send(port: int, folder: Path) -> int:
    """Send one study with storescu; return how many instances were acknowledged with success."""
    run = subprocess.run(
        [
            "storescu",
            "-v",
            "-xv",
            "-aet",
            "ORTHANC",
            "-aec",
            "PACSAI",
            "+sd",
            "+r",
            "127.0.0.1",
            str(port),
            str(folder),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    return (run.stdout + run.stderr).count("Received Store Response (Success)")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--studies", type=int, default=25, help="studies per sender")
    parser.add_argument("--workers", type=int, default=1, help="pacsai worker processes")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="pacsai-load-"))
    total = args.senders * args.studies
    print(f"preparing {total} studies in {work} …", flush=True)
    folders = []
    expected_instances = 0
    for index in range(total):
        folder = work / "studies" / f"{index:04d}"
        folder.mkdir(parents=True)
        expected_instances += make_study(index, folder)
        folders.append(folder)
    redis, broker = start_redis(work / "redis")
    port = free_port()
    orthanc = start_orthanc(work / "orthanc", modalities={}, lua=None)
    env = pacsai_env(
        work / "data",
        port=port,
        peers=f"ORTHANC@127.0.0.1:{orthanc.dicom_port}",
        broker_url=broker,
        PACSAI_QUIET_PERIOD_S="10",
        PACSAI_RELEASE_GRACE_S="2",
    )
    with supervised(redis, orthanc.process) as processes:
        processes.append(start_pacsai("node", work, env))
        processes += [start_pacsai("worker", work / f"w{i}", env) for i in range(args.workers)]
        started = time.monotonic()
        with ThreadPoolExecutor(args.senders) as pool:
            acknowledged = sum(pool.map(lambda folder: send(port, folder), folders))
        sent_s = time.monotonic() - started
        state = State(work / "data" / "pacsai.db")

        def settled() -> bool:
            jobs = state.counts()["jobs"]
            return sum(jobs.values()) == total and set(jobs) <= {"delivered", "failed", "dead"}

        wait_until(settled, 3600, "all jobs to finish", 2.0)
        done_s = time.monotonic() - started
        counts = state.counts()
        spooled = len(list((work / "data" / "spool").rglob("*.dcm")))
        in_pacs = {m: 0 for m in ("SEG", "SR")}
        sop_uids = []
        for study in orthanc.request("GET", "/studies"):
            for series in orthanc.series_of_study(study):
                modality = series["MainDicomTags"].get("Modality")
                if modality in in_pacs:
                    in_pacs[modality] += len(series["Instances"])
                    sop_uids += series["Instances"]
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} cores, python {platform.python_version()}")
    rows = [
        ("studies sent", total),
        ("instances sent", expected_instances),
        ("instances acknowledged", acknowledged),
        ("instances in database", counts["instances"]["received"]),
        ("instances in spool (CT kept, MR cleaned)", spooled),
        (
            "series complete / no model",
            f"{counts['series'].get('complete', 0)} / {counts['series'].get('no_model', 0)}",
        ),
        ("jobs by state", ", ".join(f"{k}={v}" for k, v in sorted(counts["jobs"].items()))),
        ("SEG in PACS", in_pacs["SEG"]),
        ("SR in PACS", in_pacs["SR"]),
        ("duplicate instances in PACS", len(sop_uids) - len(set(sop_uids))),
        ("send time (s)", f"{sent_s:.1f}"),
        ("instances/s received", f"{acknowledged / sent_s:.1f}"),
        ("time until all results delivered (s)", f"{done_s:.1f}"),
    ]
    width = max(len(name) for name, _ in rows)
    print(f"| {'measure':<{width}} | value |\n|{'-' * (width + 2)}|-------|")
    for name, value in rows:
        print(f"| {name:<{width}} | {value} |")
    ok = (
        acknowledged == expected_instances == counts["instances"]["received"]
        and in_pacs["SEG"] == in_pacs["SR"] == counts["jobs"].get("delivered", 0) == total
    )
    print("\nno loss, no duplicates" if ok else "\nMISMATCH: see the table")
    shutil.rmtree(work, ignore_errors=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
