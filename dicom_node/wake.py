"""Prompt wake-ups for the two polling threads pynetdicom runs per association (issue 11: ingest latency).

The association thread sleeps 1 ms between looks at its DIMSE queue; the DUL thread, when its last look found
nothing, sleeps 1 ms (`_run_loop_delay`) before looking at its socket and its outgoing queue again. At one
association every instance waits out several of these sleeps (request in, handler, response out): a profile of
the node receiving a 300-slice CT had its association thread asleep a third of the time.

For the associations this node accepts, those sleeps (only sleeps of at most 1 ms, only in those two threads) end as
soon as there is something to look at: the association thread's when a DIMSE message or an A-RELEASE/A-ABORT
primitive is queued for it, the DUL thread's when a primitive is queued for sending or its socket turns readable.
With work signalled, a prompted thread with nothing to do waits up to IDLE_LOOK_S (50 ms) rather than 1 ms before
it looks again at what nothing signals (a kill flag, the ARTIM and idle timers, whose deadlines are seconds; the end
of the other thread): an idle association wakes 40 times a second instead of 2000, which at several associations
also leaves the GIL to the ones that work. Every other sleep is a plain sleep.
Done by handing the two pynetdicom modules a `time` whose `sleep` looks for a wait installed on the current thread,
and by queues that signal when something is put on them (both set before the association's threads start).
"""

from __future__ import annotations

import contextlib
import os
import queue
import select
import threading
import time
import weakref
from collections.abc import Callable
from typing import Any

import pynetdicom.association
import pynetdicom.dul

_POLL_S = 0.001  # pynetdicom's polling sleeps; longer sleeps (shutdown delays, retries) are never shortened
# how long a prompted thread waits when no work comes: it still looks at what nothing signals (a kill flag, the
# ARTIM and idle timers, whose deadlines are seconds) this often; 20 polls a second instead of 1000
IDLE_LOOK_S = 0.05
_WAIT = "_pacsai_wait"  # the attribute holding a thread's wait(seconds)


class _Clock:
    """The `time` module for pynetdicom.association and pynetdicom.dul: all of it, but a `sleep` that a prompted
    thread ends early."""

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    @staticmethod
    def sleep(seconds: float) -> None:
        wait = getattr(threading.current_thread(), _WAIT, None) if seconds <= _POLL_S else None
        if wait is None:
            time.sleep(seconds)
        else:
            wait(seconds)


class _Signalling(queue.Queue[Any]):
    """A queue that calls `signal` after each put."""

    def __init__(self, signal: Callable[[], None]) -> None:
        super().__init__()
        self._signal = signal

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._signal()


class _Bell:
    """An eventfd the DUL thread can select on beside its socket. Rung and drained under a lock that also guards
    the close, so that neither ever touches a descriptor number the process has since given to another file."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def ring(self) -> None:
        with self._lock, contextlib.suppress(BlockingIOError):
            if self.fd >= 0:
                os.eventfd_write(self.fd, 1)

    def drain(self) -> None:
        with self._lock, contextlib.suppress(BlockingIOError):
            if self.fd >= 0:
                os.eventfd_read(self.fd)

    def close(self) -> None:
        with self._lock:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1


def install() -> None:
    """Process-wide, idempotent: pynetdicom's two modules sleep through `_Clock` (a no-op for unprompted threads)."""
    for module in (pynetdicom.association, pynetdicom.dul):
        if not isinstance(module.time, _Clock):
            module.time = _Clock()  # type: ignore[attr-defined]


def prompt(assoc: Any) -> None:
    """Make the polling sleeps of an accepted association's two threads end on work. Call before its threads start
    (EVT_CONN_OPEN: the queues are still empty); the DUL's descriptor is closed with the connection (`release`)."""
    work = threading.Event()

    def wait_for_work(seconds: float) -> None:
        work.wait(max(seconds, IDLE_LOOK_S))
        work.clear()  # whatever came is looked at right after this sleep; what comes later sets it again

    setattr(assoc, _WAIT, wait_for_work)
    assoc.dimse.msg_queue = _Signalling(work.set)
    assoc.dul.to_user_queue = _Signalling(work.set)

    dul, bell = assoc.dul, _Bell()

    def wait_for_data(seconds: float) -> None:
        sock = getattr(dul.socket, "socket", None)
        try:
            readable, _, _ = select.select(
                [bell.fd] if sock is None else [sock, bell.fd], [], [], max(seconds, IDLE_LOOK_S)
            )
        except (OSError, ValueError):  # the socket or the bell is closed: sleep as pynetdicom would
            time.sleep(seconds)
            return
        if bell.fd in readable:
            bell.drain()

    setattr(dul, _WAIT, wait_for_data)
    dul.to_provider_queue = _Signalling(bell.ring)
    assoc._pacsai_bell = bell
    weakref.finalize(dul, bell.close)  # in case the connection's close event never comes


def release(assoc: Any) -> None:
    """EVT_CONN_CLOSE: the DUL thread's select falls back to a plain sleep from now on."""
    bell = getattr(assoc, "_pacsai_bell", None)
    if isinstance(bell, _Bell):
        dul = assoc.dul
        setattr(dul, _WAIT, None)
        bell.close()
