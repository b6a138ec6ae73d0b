"""One piece of a job's CPU work in a forked child, while this process does another (issue 11 goal 2).

After the forward pass a job is single-threaded Python (pydicom, highdicom) and the host's other cores are idle: the
SR is built and serialised in a child forked from the worker process (it inherits the volume, labels and model spec
without copying them), while the worker builds the SEG. The child sends back the bytes and exits; it never returns
into the worker's code, never touches torch, and dies with the worker (parent-death signal).

Anything but the complete bytes (the child failed, was killed, or is not done within the deadline after the parent
asked) is None: the caller then does the work itself, so the result never depends on the child. Only on Linux with
more than one usable core; elsewhere no child is started and `result` is None.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import signal
import struct
import sys
import time
from collections.abc import Callable

from billiard.util import set_pdeathsig

log = logging.getLogger(__name__)
_LENGTH = struct.Struct("<Q")  # the bytes are preceded by their length, so a child cut short is recognised
WAIT_S = 30.0  # how long `result` waits for a child still working once asked


def available() -> bool:
    """Whether work can go to a child here: fork on Linux, and a second core for it to run on."""
    return sys.platform.startswith("linux") and len(os.sched_getaffinity(0)) > 1


class Child:
    """A forked child computing bytes; `result()` collects them once (None: do the work yourself)."""

    def __init__(self, work: Callable[[], bytes], what: str) -> None:
        self.what = what
        self._pid = 0
        self._read = -1
        if not available():
            return
        read, write = os.pipe()
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the child: never returns from here
            _child(work, write, read, parent, what)
        os.close(write)
        self._pid, self._read = pid, read

    def result(self, wait_s: float = WAIT_S) -> bytes | None:
        """The child's bytes, or None (no child, it failed, or it did not finish within `wait_s`: it is killed)."""
        if not self._pid:
            return None
        data = None
        try:
            data = _read_all(self._read, time.monotonic() + wait_s)
        finally:
            os.close(self._read)
            status = self._reap(killed=data is None)  # a child past the deadline is stopped
        if data is None or status != 0 or len(data) < _LENGTH.size:
            log.warning("%s in a child process did not complete (status %s); done here instead", self.what, status)
            return None
        (length,) = _LENGTH.unpack_from(data)
        if length != len(data) - _LENGTH.size:
            log.warning("%s from a child process is incomplete; done here instead", self.what)
            return None
        return data[_LENGTH.size :]

    def cancel(self) -> None:
        """The caller no longer wants the bytes (it failed itself): stop the child and reap it."""
        if self._pid:
            os.close(self._read)
            self._reap(killed=True)

    def _reap(self, *, killed: bool) -> int:
        """The child's exit code (it has closed its end: it is exiting), or negative: the signal that stopped it."""
        pid, self._pid = self._pid, 0
        if killed:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
        return os.waitstatus_to_exitcode(status)


def _read_all(fd: int, deadline: float) -> bytes | None:
    """Everything until the child closes its end, or None when the deadline passes first."""
    parts: list[bytes] = []
    while True:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            return None
        chunk = os.read(fd, 1 << 20)
        if not chunk:
            return b"".join(parts)
        parts.append(chunk)


def _own_memory() -> str:
    """The child's private memory: its own allocations and the pages the parent has copied away from it since the
    fork, i.e. the memory the child adds to the worker's (the rest it shares with the parent)."""
    private_kb = _proc_kb("/proc/self/smaps_rollup", "Private_Clean", "Private_Dirty")
    return "private memory unknown" if private_kb is None else f"{private_kb >> 10} MB private"


def _rss_of(pid: int) -> str:
    """The worker's resident memory, as the child finishes."""
    resident_kb = _proc_kb(f"/proc/{pid}/status", "VmRSS")
    return "the worker's memory unknown" if resident_kb is None else f"the worker then {resident_kb >> 10} MB resident"


def _proc_kb(path: str, *names: str) -> int | None:
    """The sum of the named "Name:   123 kB" fields of a /proc file, or None when it cannot be read."""
    try:
        with open(path, encoding="ascii") as lines:
            fields = dict(line.split(":", 1) for line in lines if ":" in line)
        return sum(int(fields[name].split()[0]) for name in names)
    except (OSError, KeyError, ValueError, IndexError):
        return None


def _child(work: Callable[[], bytes], write: int, read: int, parent: int, what: str) -> None:
    """Run `work`, send its bytes, exit; exit 1 on any failure (the parent then does the work)."""
    code = 1
    try:
        os.close(read)
        set_pdeathsig(signal.SIGKILL)
        if os.getppid() != parent:  # the worker died between the fork and the signal
            os._exit(1)
        for number in (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1):  # not the worker's (shutdown, soft time limit)
            signal.signal(number, signal.SIG_DFL)
        started = time.monotonic()
        data = work()
        spent = time.monotonic() - started
        log.info("%s made in a child process in %.2f s (%s; %s)", what, spent, _own_memory(), _rss_of(parent))
        view = memoryview(_LENGTH.pack(len(data)) + data)
        while view:
            view = view[os.write(write, view) :]
        code = 0
    except BaseException as exc:  # noqa: BLE001 - whatever happened, the parent does the work itself
        log.error("%s in a child process failed (%s)", what, type(exc).__name__)  # the message may quote values
    finally:
        os._exit(code)
