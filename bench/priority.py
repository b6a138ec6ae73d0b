"""Priority benchmark: time to result of one STAT study sent behind 20 routine ones, with and without priorities.

Both runs use the same stack (Redis, `pacsai node`, one `pacsai worker` process, dcmtk storescp as the PACS) and
the same studies (re-UIDed copies of the 20-slice CT of ../shared/dicom). "without": every job is routine and all
go to the broker at once (PACSAI_DISPATCH_WINDOW=0), so the STAT study waits its turn; "with": a rule makes a study
sent with C-STORE priority HIGH a STAT job, which the node dispatches at once to the queue workers take first.
Time to result = the STAT study's last C-STORE answered → its results stored at the PACS (job delivered).

    .venv/bin/python bench/priority.py [--routine 20]
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pacsai.jobs import JobState, Priority  # noqa: E402
from pacsai.state import State  # noqa: E402
from tests.checks import reuid_series  # noqa: E402
from tests.e2e.test_priorities_e2e import HIGH, ROUTES, send_with_priority  # noqa: E402
from tests.services import SHARED, free_port, pacsai_env, start_pacsai, start_redis, start_storescp, wait_until  # noqa: E402

CT = SHARED / "dicom" / "totalsegmentator-ct-abdomen"
ALL_ROUTINE = "rules:\n  - {name: ct, model: ct-organs-tiny, match: {modality: [CT], min_instances: 10}}\n"


def run(work: Path, studies: list[list[Path]], *, priorities: bool) -> dict[str, float]:
    """One measurement; returns the STAT study's time to result and the routine ones' median, in seconds."""
    routes = work / "routes.yaml"
    work.mkdir(parents=True, exist_ok=True)
    routes.write_text(ROUTES if priorities else ALL_ROUTINE)
    redis, url = start_redis(work / "redis")
    storescp, pacs_port, _ = start_storescp(work / "pacs", ae_title="STORESCU")
    env = pacsai_env(
        work / "data",
        port=free_port(),
        peers=f"STORESCU@127.0.0.1:{pacs_port}",
        broker_url=url,
        PACSAI_ROUTES_FILE=str(routes),
        **({} if priorities else {"PACSAI_DISPATCH_WINDOW": "0"}),
    )
    processes = [redis, storescp, start_pacsai("node", work, env), start_pacsai("worker", work, env)]
    try:
        port = int(env["PACSAI_PORT"])
        sent: dict[str, float] = {}
        for index, files in enumerate(studies[:-1]):
            argv = ["storescu", "-xv", "-aet", "STORESCU", "-aec", "PACSAI", "127.0.0.1", str(port), *map(str, files)]
            sending = subprocess.run(argv, timeout=120, capture_output=True, text=True)
            if sending.returncode:
                raise RuntimeError(f"storescu failed: {sending.stderr[-2000:]}\n{processes[2].log()[-3000:]}")
            sent[f"routine-{index}"] = time.time()
        send_with_priority(port, studies[-1], HIGH)
        sent["stat"] = time.time()
        state = State(work / "data" / "pacsai.db")
        total = len(studies)
        wait_until(lambda: state.counts()["jobs"].get("delivered") == total, 1800, "every job delivered", 1.0)
        return _times(state, sent, priorities=priorities)
    finally:
        for process in reversed(processes):
            process.stop()


def _times(state: State, sent: dict[str, float], *, priorities: bool) -> dict[str, float]:
    """Jobs in the order their series completed (the STAT study was sent last, so it is last)."""
    rows = sorted(state.jobs_in(JobState.DELIVERED), key=lambda row: state.job_events(row.job_id)[0].at)
    delivered = [next(e.at for e in state.job_events(row.job_id) if e.to_state == "delivered") for row in rows]
    assert (rows[-1].priority is Priority.STAT) == priorities
    routine = sorted(at - sent[f"routine-{index}"] for index, at in enumerate(delivered[:-1]))
    return {"stat_s": delivered[-1] - sent["stat"], "routine_median_s": routine[len(routine) // 2]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--routine", type=int, default=20, help="routine studies sent before the STAT one")
    parser.add_argument("--keep", type=Path, help="work in this folder and keep it (logs, databases) for inspection")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="pacsai-priority-") as scratch:
        tmp = str(args.keep or scratch)
        studies = []
        for index in range(args.routine + 1):
            folder = Path(tmp) / "studies" / str(index)
            reuid_series(CT, folder, f"1.2.826.0.1.3680043.10.1051.9.{index}")
            studies.append(sorted(folder.iterdir()))
        results = {kind: run(Path(tmp) / kind, studies, priorities=kind == "with") for kind in ("without", "with")}
    print(f"\n{args.routine} routine CT studies, then 1 STAT; one worker process; {platform.node()}, {time.ctime()}\n")
    print("| priorities | STAT study: last ACK → delivered (s) | routine studies: median (s) |")
    print("|---|---|---|")
    for kind, numbers in results.items():
        print(f"| {kind} | {numbers['stat_s']:.1f} | {numbers['routine_median_s']:.1f} |")
    speedup = results["without"]["stat_s"] / max(results["with"]["stat_s"], 1e-9)
    print(f"\nSTAT time to result with priorities: {speedup:.1f}x faster")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
