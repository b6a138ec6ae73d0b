"""E7: a C-ECHO to every configured peer at start (and now and then), failing loudly and naming what failed.

A wrong PACSAI_PEERS entry (AE title, host or port) would otherwise show only when the first result cannot be
delivered, hours later. The node still starts when a peer fails its check: a PACS that is briefly down must not
make us refuse the studies it sends. Each failure is an ERROR line naming the peer's AE title, host:port and what
failed (connection refused, timed out, A-ASSOCIATE-RJ with its reason, no C-ECHO response), and the metric
`pacsai_peer_reachable{peer="AE"}` is 0 until a later check succeeds.

DICOMweb peers (PACSAI_DICOMWEB_PEERS) are checked over HTTP with their configured credentials: a QIDO-RS
`GET {url}/studies?limit=1` (2xx reachable, 401 credentials refused, 403/404 named), recorded the same way.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import httpx
from pynetdicom import AE, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from dicom_node.send import association_failure
from dicom_node.tcp import set_nodelay
from dicom_node.tls import tls_args
from pacsai.peers import WebPeer
from pacsai.settings import Peer, Settings

log = logging.getLogger(__name__)
RECHECK_EVERY_S = 300.0


@dataclass(frozen=True, slots=True)
class PeerCheck:
    peer: Peer | WebPeer
    reachable: bool
    detail: str  # what answered, or what failed; our own words and DICOM codes or HTTP statuses, never peer data

    @property
    def address(self) -> str:
        if isinstance(self.peer, WebPeer):
            return self.peer.url
        return f"{self.peer.host}:{self.peer.port}" + ("+tls" if self.peer.tls else "")

    @property
    def kind(self) -> str:
        return "DICOMweb" if isinstance(self.peer, WebPeer) else "C-ECHO"


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
    ae = _requesting(calling_ae, timeout_s, Verification)
    try:
        tls = tls_args(peer.host, peer.tls)
    except (OSError, ValueError) as exc:
        return PeerCheck(peer, False, f"TLS cannot be set up ({type(exc).__name__})")
    assoc = _associate(ae, peer, tls)
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


def _requesting(calling_ae: str, timeout_s: float, *sop_classes: str) -> AE:
    """An AE proposing these SOP classes, with the DIMSE timeout and a connection timeout of at most 15 s."""
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    ae.connection_timeout = min(timeout_s, 15.0)
    for sop_class in sop_classes:
        ae.add_requested_context(sop_class)
    return ae


def _associate(ae: AE, peer: Peer, tls: tuple[ssl.SSLContext, str] | None) -> Association:
    return ae.associate(
        peer.host, peer.port, ae_title=peer.ae_title, tls_args=tls, evt_handlers=[(evt.EVT_CONN_OPEN, set_nodelay)]
    )


def takes_sop_class(peer: Peer, sop_class: str, *, calling_ae: str, timeout_s: float) -> bool | None:
    """Whether the peer accepts a presentation context for this SOP class (an association proposing it, released
    at once, nothing sent); None when that cannot be told (peer down, association refused, TLS not set up)."""
    # Verification too: a peer that accepts none of the contexts may reject the association
    ae = _requesting(calling_ae, timeout_s, sop_class, Verification)
    try:
        assoc = _associate(ae, peer, tls_args(peer.host, peer.tls))
    except (OSError, ValueError, RuntimeError):
        return None
    if not assoc.is_established:
        return None
    try:
        return any(context.abstract_syntax == sop_class for context in assoc.accepted_contexts)
    finally:
        assoc.release()


def check_web_peer(peer: WebPeer, *, timeout_s: float) -> PeerCheck:
    """A QIDO-RS query for one study with the peer's credentials: does the DICOMweb service answer, and take us?"""
    try:
        with peer.client(timeout_s) as client:
            status = client.get(f"{peer.url}/studies", params={"limit": "1"}).status_code
    except httpx.ConnectError as exc:
        if isinstance(exc.__cause__, ssl.SSLError) or "CERTIFICATE" in str(exc).upper():
            return PeerCheck(peer, False, "TLS handshake failed (certificate not trusted or wrong host)")
        return PeerCheck(peer, False, "cannot connect (refused, or the host name does not resolve)")
    except httpx.TimeoutException:
        return PeerCheck(peer, False, f"no HTTP answer within {timeout_s:g} s")
    except (httpx.HTTPError, OSError, ValueError) as exc:
        return PeerCheck(peer, False, f"HTTP request failed ({type(exc).__name__})")
    if 200 <= status < 300:
        return PeerCheck(peer, True, f"QIDO-RS answered HTTP {status}")
    words = {401: "credentials refused", 403: "access forbidden", 404: "no DICOMweb service at that URL"}
    return PeerCheck(peer, False, f"{words.get(status, 'QIDO-RS refused')} (HTTP {status})")


def check_peers(settings: Settings) -> list[PeerCheck]:
    """Every configured peer (DIMSE by C-ECHO, then DICOMweb by HTTP), one after the other with the DIMSE timeout."""
    timeout_s = settings.delivery.dimse_timeout_s
    dimse = [check_peer(p, calling_ae=settings.node.ae_title, timeout_s=timeout_s) for p in settings.delivery.peers]
    return dimse + [check_web_peer(peer, timeout_s=timeout_s) for peer in settings.delivery.web_peers]


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
            log.error(
                "peer %s at %s failed its %s check: %s; results for it will wait and be retried",
                check.peer.ae_title,
                check.address,
                check.kind,
                check.detail,
            )


def watch_peers(
    settings: Settings, record: Callable[[PeerCheck], None], stop: threading.Event, every_s: float = RECHECK_EVERY_S
) -> threading.Thread:
    """Check every peer now and every `every_s` in a background thread; `record(check)` each result."""

    def run() -> None:
        last: dict[str, bool] | None = None
        while True:
            try:
                checks = check_peers(settings)
                report(checks, only_changes_from=last)
                for check in checks:
                    record(check)
                last = {check.peer.ae_title: check.reachable for check in checks}
            except Exception as exc:  # a check must never take the node down; the next round tries again
                log.warning("peer check failed (%s)", type(exc).__name__)
            if stop.wait(every_s):
                return

    thread = threading.Thread(target=run, name="peer-check", daemon=True)
    thread.start()
    return thread
