"""`pacsai run` supervision: node and worker live and die together, and one run owns a data directory.

- The worker is started with a parent-death signal (Linux prctl PR_SET_PDEATHSIG = SIGKILL): when the node process
  dies, even by kill -9, the kernel kills the worker; Celery's prefork pool processes have the same signal towards the
  worker (celery.concurrency.prefork), so the whole tree goes. The work they held is resumed by the next node's
  reconciler at once (dicom_node.reconcile.resume_orphaned).
- The run holds an exclusive lock on data_dir/run.lock for its lifetime (the kernel drops it when the process dies) and
  writes its worker's pid there. A second run on a live one is refused; a run after a dead one stops a worker still
  listed there (an orphan of a release without the signal, or of a signal that could not be set).
- A worker that exits by itself stops the node too, so the service manager restarts both.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from billiard.util import set_pdeathsig

from pacsai.errors import ConfigError

log = logging.getLogger(__name__)
LOCK_NAME = "run.lock"
ORPHAN_GRACE_S = 5.0  # an orphan worker gets SIGQUIT (Celery's cold shutdown), then SIGKILL after this long


class RunLock:
    """data_dir/run.lock, held (flock) by this process; it lists the run's pid and its worker's."""

    def __init__(self, fd: int, path: Path) -> None:
        self._fd, self.path = fd, path

    def record(self, worker_pid: int) -> None:
        text = f"run {os.getpid()}\nworker {worker_pid}\n".encode()
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, text, 0)
        os.fsync(self._fd)

    def release(self) -> None:
        with contextlib.suppress(OSError):
            os.ftruncate(self._fd, 0)
        os.close(self._fd)  # closing drops the lock


def claim_data_dir(data_dir: Path) -> RunLock:
    """Lock the data directory for this run; refuse when a live run holds it; stop the worker a dead run left."""
    data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
    path = data_dir / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = _listed(os.pread(fd, 256, 0)).get("run", 0)
        os.close(fd)
        raise ConfigError(f"another pacsai run (pid {holder}) is using PACSAI_DATA_DIR {data_dir}") from None
    orphan = _listed(os.pread(fd, 256, 0)).get("worker", 0)
    if orphan and _is_worker(orphan):
        log.warning("a worker (pid %d) of a run that ended uncleanly is still running: stopping it", orphan)
        stop_process(orphan, ORPHAN_GRACE_S)
    return RunLock(fd, path)


def _listed(text: bytes) -> dict[str, int]:
    pids: dict[str, int] = {}
    for line in text.decode(errors="replace").splitlines():
        name, _, pid = line.partition(" ")
        if pid.strip().isdigit():
            pids[name] = int(pid)
    return pids


def _is_worker(pid: int) -> bool:
    """Whether `pid` is a pacsai worker process (a pid reused by something else is left alone)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return False
    return b"worker" in argv and any(arg in (b"worker.cli", b"pacsai") or arg.endswith(b"/pacsai") for arg in argv)


def stop_process(pid: int, grace_s: float) -> None:
    """SIGQUIT, then SIGKILL when it is still there after `grace_s`."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGQUIT)
        deadline = time.monotonic() + grace_s
        while time.monotonic() < deadline:
            if not _exists(pid):
                return
            time.sleep(0.1)
        os.kill(pid, signal.SIGKILL)


def _exists(pid: int) -> bool:
    with contextlib.suppress(ChildProcessError):
        if os.waitpid(pid, os.WNOHANG) != (0, 0):  # our own child: reap it
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def dying_with_this_process() -> Callable[[], None]:
    """The `preexec_fn` that makes a child die with this process (start the child from the main thread: the signal
    follows the thread that forked it). The caller runs Popen itself, so every command we start is in cli.py (C9)."""
    parent = os.getpid()

    def die_with_parent() -> None:  # in the child, between fork and exec
        if sys.platform.startswith("linux"):
            set_pdeathsig(signal.SIGKILL)
        if os.getppid() != parent:  # the parent died before the signal was set
            os._exit(1)

    return die_with_parent


def watch_worker(worker: subprocess.Popen[bytes], stopping: threading.Event) -> threading.Event:
    """When the worker exits by itself, stop this process (SIGTERM to ourselves); the returned event is then set."""
    lost = threading.Event()

    def wait() -> None:
        code = worker.wait()
        if not stopping.is_set():
            lost.set()
            log.error("ALERT: the worker exited (status %d); stopping the node so both are restarted", code)
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=wait, name="pacsai-worker-watch", daemon=True).start()
    return lost
