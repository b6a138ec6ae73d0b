"""dicom_node.wake: the polling sleeps of an accepted association's two pynetdicom threads end when work comes."""

from __future__ import annotations

import threading
import time
from typing import Any

import pynetdicom.association
import pynetdicom.dul
from pynetdicom import AE
from pynetdicom.association import Association

from dicom_node import wake

LONG_S = 30.0  # a wait this long that returns at once was ended by the work put on a queue


def acceptor() -> Any:
    return Association(AE(ae_title="PACSAI"), "acceptor")


def returns_early(wait: Any) -> bool:
    started = time.monotonic()
    wait(LONG_S)
    return time.monotonic() - started < LONG_S / 2


def test_a_dimse_message_or_a_release_ends_the_association_threads_wait() -> None:
    assoc = acceptor()
    wake.prompt(assoc)
    assoc.dimse.msg_queue.put((1, "a C-STORE request"))
    assert returns_early(assoc._pacsai_wait)
    assert assoc.dimse.msg_queue.get_nowait() == (1, "a C-STORE request")  # the queue still holds what was put
    assoc.dul.to_user_queue.put("an A-RELEASE request")
    assert returns_early(assoc._pacsai_wait)


def test_a_primitive_to_send_ends_the_dul_threads_wait_until_the_connection_closes() -> None:
    assoc = acceptor()
    wake.prompt(assoc)
    threading.Timer(0.2, assoc.dul.to_provider_queue.put, args=("a C-STORE response",)).start()
    assert returns_early(assoc.dul._pacsai_wait)  # woken from another thread, as the association thread does
    wake.release(assoc)  # EVT_CONN_CLOSE
    assert assoc.dul._pacsai_wait is None  # plain sleeps from now on
    assoc.dul.to_provider_queue.put("late")  # ringing a closed bell touches no descriptor
    assert assoc._pacsai_bell.fd == -1


def test_only_polling_sleeps_of_prompted_threads_are_shortened() -> None:
    wake.install()
    wake.install()  # idempotent
    clock = getattr(pynetdicom.association, "time")  # noqa: B009 - not exported: mypy would refuse the attribute
    assert clock is not time and isinstance(getattr(pynetdicom.dul, "time"), type(clock))  # noqa: B009
    assert clock.monotonic() > 0  # the rest of the time module is there
    calls: list[float] = []
    me = threading.current_thread()
    me._pacsai_wait = calls.append  # type: ignore[attr-defined]
    try:
        clock.sleep(0.001)  # pynetdicom's polling sleep: the thread's wait
        clock.sleep(0.01)  # kill()'s retry delay: a real sleep
        assert calls == [0.001]
    finally:
        delattr(me, "_pacsai_wait")
    clock.sleep(0.001)  # an unprompted thread sleeps
    assert calls == [0.001]
