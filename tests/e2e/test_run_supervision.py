"""Issue 9 item 3: in `pacsai run` node and worker live and die together; a restart finds no orphan."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.services import wait_until
from tests.stack import Stack

pytestmark = [pytest.mark.e2e]
NO_PACS = "PACS@127.0.0.1:9"


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True).stdout
    return [int(line) for line in out.split()]


def _tree(pid: int) -> list[int]:
    """`pid`'s descendants, depth first."""
    return [one for child in _children(pid) for one in (child, *_tree(child))]


def _running(pid: int) -> bool:
    """Exists and is not a zombie (a reparented child that init has not reaped yet counts as gone)."""
    try:
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return False
    return "\nState:\tZ" not in status


def _argv(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def _celery_pool(worker_pid: int) -> list[int]:
    """The worker's Celery pool processes (forked: same command line), not the spawned model check."""
    return [pid for pid in _children(worker_pid) if _argv(pid) == _argv(worker_pid)]


def _worker_with_pool(run_pid: int) -> list[int]:
    """The run's process tree once its worker has started its Celery pool (worker + pool processes)."""
    tree = _tree(run_pid)
    return tree if any(_celery_pool(child) for child in _children(run_pid)) else []


def test_killing_the_node_takes_the_worker_with_it(stack: Callable[..., Stack]) -> None:
    """kill -9 of the `pacsai run` process: its worker and the worker's pool are gone within seconds; a restart
    finds no orphan and runs one worker."""
    pacsai = stack(peers=NO_PACS)
    run = pacsai.start("run")
    tree = wait_until(lambda: _worker_with_pool(run.popen.pid), 60, "the worker and its pool", 0.2)
    run.kill()
    wait_until(lambda: not any(_running(pid) for pid in tree), 5, "the worker tree to exit", 0.1)
    again = pacsai.start("run")
    wait_until(lambda: _worker_with_pool(again.popen.pid), 60, "the new worker", 0.2)
    assert len(_children(again.popen.pid)) == 1  # one worker
    assert "still running: stopping it" not in again.log()
    assert (pacsai.data / "run.lock").stat().st_mode & 0o777 == 0o600


def test_a_second_run_on_the_same_data_dir_is_refused(stack: Callable[..., Stack]) -> None:
    pacsai = stack(peers=NO_PACS)
    first = pacsai.start("run")
    second = pacsai.start("run")  # the port is already open (the first run's): returns at once
    assert second.popen.wait(timeout=20) == 1
    assert f"another pacsai run (pid {first.popen.pid})" in second.log()
    assert first.popen.poll() is None


def test_a_restart_stops_the_worker_a_dead_run_left(stack: Callable[..., Stack], tmp_path: Path) -> None:
    """An orphan listed in run.lock (a run killed before this release, or without the parent-death signal) is
    stopped by the next run, pool and all."""
    pacsai = stack(peers=NO_PACS)
    orphan = pacsai.start("worker")
    pool = wait_until(lambda: _celery_pool(orphan.popen.pid), 60, "the orphan's pool", 0.2)
    pacsai.data.mkdir(parents=True, exist_ok=True)
    (pacsai.data / "run.lock").write_text(f"run 999999999\nworker {orphan.popen.pid}\n")
    pacsai.start("run")
    assert orphan.popen.wait(timeout=10) in (-signal.SIGKILL, -signal.SIGQUIT, 0, 1)
    wait_until(lambda: not any(_running(pid) for pid in pool), 5, "the orphan's pool to exit", 0.1)
    assert "still running: stopping it" in pacsai.processes[-1].log()
