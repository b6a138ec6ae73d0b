"""Who runs a job: a lease held by one worker process and renewed while it runs.

Celery on Redis may hand a job that is still running to a second worker (the visibility timeout passed, or the
connection to the broker dropped and the unacknowledged message came back). The database row says who holds the job;
the holder renews it every few seconds, so a second delivery can tell a live run from one whose process died.
"""

from __future__ import annotations

import logging
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager

from pacsai.state import State

log = logging.getLogger(__name__)
RENEW_EVERY_S = 5.0
LEASE_S = 6 * RENEW_EVERY_S  # a holder that has not renewed for this long has lost the job


def owner() -> str:
    """This process, as other processes see it: host:pid."""
    return f"{socket.gethostname()}:{os.getpid()}"


def alive(holder: str) -> bool:
    """Whether the holding process may still be running: only a process on this host can be checked directly."""
    host, _, pid = holder.rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return True  # elsewhere: only the lease's age tells
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextmanager
def renewed(state: State, job_id: str, holder: str) -> Iterator[None]:
    """Renew the lease in a background thread for as long as the block runs."""
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(RENEW_EVERY_S):
            try:
                state.renew_lease(job_id, holder)
            except Exception as exc:  # the database may be briefly unreachable; the next renewal tries again
                log.warning("could not renew the job's lease (%s)", type(exc).__name__)

    thread = threading.Thread(target=renew, name="lease", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
