"""E7: a C-ECHO to every configured peer at start (and now and then), failing loudly and naming what failed.

A wrong PACSAI_PEERS entry (AE title, host or port) would otherwise show only when the first result cannot be
delivered, hours later. The node still starts when a peer fails its check: a PACS that is briefly down must not
make us refuse the studies it sends. Each failure is an ERROR line naming the peer's AE title, host:port and what
failed (connection refused, timed out, A-ASSOCIATE-RJ with its reason, no C-ECHO response), and the metric
`pacsai_peer_reachable{peer="AE"}` is 0 until a later check succeeds.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node.receive import set_nodelay
from dicom_node.send import association_failure
from dicom_node.tls import tls_args
from worker.settings import Peer, Settings

log = logging.getLogger(__name__)
RECHECK_EVERY_S = 300.0


@dataclass(frozen=True, slots=True)
class PeerCheck:
    peer: Peer
    reachable: bool
    detail: str            # what answered, or what failed; our own words and DICOM codes, never peer data

    @property
    def address(self) -> str:
        return f"{self.peer.host}:{self.peer.port}" + ("+tls" if self.peer.tls else "")


def check_peer(peer: Peer, *, calling_ae: str, timeout_s: float) -> PeerCheck:
    """TCP connect (to tell refused from unreachable), then an association with a C-ECHO on it."""
    try:
        with socket.create_connection((peer.host, peer.port), timeout=min(timeout_s, 15.0)):
            pass
    except ConnectionRefusedError:
        return PeerCheck(peer, False, "connection refused (nothing listens on that port)")
    except socket.gaierror:
        return PeerCheck(peer, False, "host name does not resolve")
    except TimeoutError:
        return PeerCheck(peer, False, f"no TCP connection within {min(timeout_s, 15.0):g} s")
    except OSError as exc:
        return PeerCheck(peer, False, f"cannot connect ({type(exc).__name__})")
    return _echo(peer, calling_ae=calling_ae, timeout_s=timeout_s)


def _echo(peer: Peer, *, calling_ae: str, timeout_s: float) -> PeerCheck:
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = min(timeout_s, 15.0)
    ae.add_requested_context(Verification)
    try:
        tls = tls_args(peer.host, peer.tls)
    except (OSError, ValueError) as exc:
        return PeerCheck(peer, False, f"TLS cannot be set up ({type(exc).__name__})")
    assoc = ae.associate(peer.host, peer.port, ae_title=peer.ae_title, tls_args=tls,
                         evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)])
    if not assoc.is_established:
        answer = assoc.acceptor.primitive
        if assoc.is_aborted and answer is not None and answer.result == 0:
            return PeerCheck(peer, True, "association accepted, but not for Verification (C-ECHO not offered)")
        return PeerCheck(peer, False, str(association_failure(assoc, peer, tls=bool(tls))))
    try:
        reply = assoc.send_c_echo()
    finally:
        if assoc.is_established:
            assoc.release()
    if "Status" not in reply:
        return PeerCheck(peer, False, f"no C-ECHO response within {timeout_s:g} s")
    code = int(reply.Status)
    return PeerCheck(peer, code == 0x0000, f"C-ECHO answered 0x{code:04X}")


def check_peers(settings: Settings) -> list[PeerCheck]:
    """Every configured peer, checked one after the other with the DIMSE timeout."""
    return [check_peer(peer, calling_ae=settings.ae_title, timeout_s=settings.dimse_timeout_s)
            for peer in settings.peers]


def report(checks: Sequence[PeerCheck], *, only_changes_from: dict[str, bool] | None = None) -> None:
    """Log each check: ERROR for a failure, INFO for success; with `only_changes_from`, only peers whose state
    changed since the last report (a peer that stays down is not logged every few minutes)."""
    for check in checks:
        before = None if only_changes_from is None else only_changes_from.get(check.peer.ae_title)
        if before is not None and before == check.reachable:
            continue
        if check.reachable:
            log.info("peer %s at %s reachable: %s", check.peer.ae_title, check.address, check.detail)
        else:
            log.error("peer %s at %s failed its C-ECHO check: %s; results for it will wait and be retried",
                      check.peer.ae_title, check.address, check.detail)


def watch_peers(settings: Settings, record: Callable[[str, bool], None], stop: threading.Event,
                every_s: float = RECHECK_EVERY_S) -> threading.Thread:
    """Check every peer now and every `every_s` in a background thread; `record(ae_title, reachable)` each result."""
    def run() -> None:
        last: dict[str, bool] | None = None
        while True:
            try:
                checks = check_peers(settings)
                report(checks, only_changes_from=last)
                for check in checks:
                    record(check.peer.ae_title, check.reachable)
                last = {check.peer.ae_title: check.reachable for check in checks}
            except Exception as exc:  # a check must never take the node down; the next round tries again
                log.warning("peer check failed (%s)", type(exc).__name__)
            if stop.wait(every_s):
                return

    thread = threading.Thread(target=run, name="peer-check", daemon=True)
    thread.start()
    return thread
