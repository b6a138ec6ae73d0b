"""N8, N9: idle and reconnecting sockets from two addresses never lock a PACS out of a real `pacsai node` process.

Issue 9, item 2: raw TCP connections used to count toward PACSAI_MAX_ASSOCIATIONS before any association request, so
two addresses each under the per-address cap held every slot and the PACS's C-ECHO was rejected "local limit
exceeded". Now only associations that passed the access check count; connections that have not negotiated have a
budget of their own (the oldest makes room for a new one) and a short deadline.
"""

from __future__ import annotations

import contextlib
import selectors
import socket
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.conftest import need
from tests.stack import Stack

pytestmark = [pytest.mark.integration]
ATTACK_S = 15.0
IDLE_PER_ADDRESS = 12


class IdleSockets:
    """From one source address: keep `count` idle connections open, reconnect each one the node closes, and open and
    close another connection every few milliseconds; until stopped."""

    def __init__(self, source: str, port: int, count: int) -> None:
        self.source, self.port, self.count = source, port, count
        self.connects = 0  # connections the node accepted and then held for at least a moment
        self.stop = threading.Event()
        self.threads = [
            threading.Thread(target=self._hold, daemon=True),
            threading.Thread(target=self._churn, daemon=True),
        ]

    def __enter__(self) -> IdleSockets:
        for thread in self.threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.set()
        for thread in self.threads:
            thread.join(timeout=10)

    def _connect(self) -> socket.socket | None:
        sock = socket.socket()
        try:
            sock.bind((self.source, 0))
            sock.settimeout(2)
            sock.connect(("127.0.0.1", self.port))
        except OSError:
            sock.close()
            return None
        sock.setblocking(False)
        return sock

    def _hold(self) -> None:
        with selectors.DefaultSelector() as selector:
            while not self.stop.is_set():
                while len(selector.get_map()) < self.count and not self.stop.is_set():
                    sock = self._connect()
                    if sock is not None:
                        selector.register(sock, selectors.EVENT_READ)
                        self.connects += 1
                for key, _ in selector.select(timeout=0.05):  # the node closed it (EOF or RST): reconnect
                    selector.unregister(key.fileobj)
                    key.fileobj.close()  # type: ignore[union-attr]
                time.sleep(0.02)
            for key in list(selector.get_map().values()):
                key.fileobj.close()  # type: ignore[union-attr]

    def _churn(self) -> None:
        while not self.stop.wait(0.02):
            sock = self._connect()
            if sock is not None:
                sock.close()


def pacs_request(port: int, ct: Path, *, store: bool) -> str:
    """One association from 127.0.0.1 as the PACS, with dcmtk: C-ECHO (echoscu) or C-STORE (storescu); 'ok' or what
    went wrong (dcmtk's last line)."""
    program, files, success = ("storescu", [str(ct)], "Store") if store else ("echoscu", [], "Echo")
    argv = [program, "-v", "-to", "10", "-ta", "10", "-td", "10", "-aet", "PACS", "-aec", "PACSAI"]
    done = subprocess.run([*argv, "127.0.0.1", str(port), *files], capture_output=True, text=True, timeout=40)
    if done.returncode == 0 and f"Received {success} Response (Success)" in done.stdout + done.stderr:
        return "ok"
    lines = (done.stdout + done.stderr).strip().splitlines()
    return f"{program} exit {done.returncode}: {lines[-1] if lines else ''}"


@pytest.mark.catalogue("N8", "N9")
@pytest.mark.parametrize(("receivers", "pending"), [("1", "16"), ("2", "8")])
def test_idle_and_reconnecting_sockets_from_two_addresses_never_lock_the_pacs_out(
    stack: Callable[..., Stack], shared: Path, receivers: str, pending: str
) -> None:
    """2 addresses x 12 idle sockets, reconnecting when closed and churning, for 15 s; the PACS (dcmtk) echoes and
    stores every 0.25 s from a third address: every request succeeds. The pending budget (16; with 2 receiver
    processes 8 each) is under the 24 idle sockets, so the oldest are closed to make room, and the associations limit
    (16, across the processes) counts only the PACS's."""
    need("echoscu"), need("storescu")
    ct = shared / "dicom" / "dcm_qa_ct" / "GE_head_tilt" / "01.dcm"
    node = stack(
        peers="PACS@127.0.0.1:104",
        PACSAI_MAX_PENDING_CONNECTIONS=pending,
        PACSAI_MAX_ASSOCIATIONS="16",
        PACSAI_RECEIVERS=receivers,
    )
    node.start("node")
    outcomes: list[tuple[str, float]] = []
    with contextlib.ExitStack() as attack:
        attackers = [
            attack.enter_context(IdleSockets(source, node.port, IDLE_PER_ADDRESS))
            for source in ("127.0.0.2", "127.0.0.3")
        ]
        time.sleep(1.0)  # the idle sockets are in place before the PACS starts
        deadline = time.monotonic() + ATTACK_S
        while time.monotonic() < deadline:
            started = time.monotonic()
            outcome = pacs_request(node.port, ct, store=len(outcomes) % 2 == 1)
            outcomes.append((outcome, time.monotonic() - started))
            time.sleep(0.25)
    assert all(attacker.connects >= IDLE_PER_ADDRESS for attacker in attackers)
    failed = [outcome for outcome, _ in outcomes if outcome != "ok"]
    assert not failed, f"{len(failed)} of {len(outcomes)} PACS requests failed: {sorted(set(failed))}"
    slowest = max(seconds for _, seconds in outcomes)
    assert len(outcomes) >= 20, f"only {len(outcomes)} PACS requests in {ATTACK_S:.0f} s (slowest {slowest:.1f} s)"
    assert "connections not yet negotiated" in node.logs()  # the idle sockets did fill the pending budget
