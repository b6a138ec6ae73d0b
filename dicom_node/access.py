"""Association policy: which calling AE title may reach which of our AE titles, and from which address.

pynetdicom checks AE titles but not addresses, so the node decides on EVT_REQUESTED (before negotiation) and answers
A-ASSOCIATE-RJ itself; pynetdicom's own AE-title check stays on behind it as a second line. Only associations that
passed this check count toward PACSAI_MAX_ASSOCIATIONS (pynetdicom would count every raw socket, see `guard`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import socket
import ssl
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from pynetdicom import evt

from dicom_node.guard import socket_open
from dicom_node.metrics import ASSOCIATIONS
from dicom_node.shared_limits import SharedLimits
from pacsai import audit
from pacsai.audit import AuditTrail
from pacsai.peers import Caller
from pacsai.settings import Settings

log = logging.getLogger(__name__)
REJECTED_PERMANENT, REJECTED_TRANSIENT, SERVICE_USER, SERVICE_PROVIDER_PRESENTATION = 0x01, 0x02, 0x01, 0x03
NO_REASON, CALLING_AE_NOT_RECOGNISED, CALLED_AE_NOT_RECOGNISED = 0x01, 0x03, 0x07
LOCAL_LIMIT_EXCEEDED = 0x02  # with SERVICE_PROVIDER_PRESENTATION (PS3.8 9.3.4)


@dataclass(frozen=True, slots=True)
class AssociationRefusal:
    """A-ASSOCIATE-RJ result, source and reason (PS3.8 9.3.4), and why in our words (for logs and audit)."""

    result: int
    source: int
    reason: int
    why: str


def resolve_host(host: str) -> frozenset[str]:
    """Every address a host name resolves to (empty when it does not resolve)."""
    try:
        return frozenset(str(info[4][0]) for info in socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP))
    except OSError:
        return frozenset()


def _normal(address: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return None
    mapped = ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else None
    return mapped or ip


class AccessPolicy:
    """Called AE title must be ours; calling AE title must be allowed, from one of its sources."""

    def __init__(
        self,
        settings: Settings,
        *,
        resolve: Callable[[str], frozenset[str]] = resolve_host,
        resolve_ttl_s: float = 60.0,
    ) -> None:
        self._ours = frozenset(settings.node.our_ae_titles)
        self._any_caller = settings.security.allow_any_caller
        self._callers: dict[str, Caller] = {caller.ae_title: caller for caller in settings.caller_policy}
        self._resolve, self._ttl_s = resolve, resolve_ttl_s
        self._resolved: dict[str, tuple[float, frozenset[str]]] = {}
        self._lock = threading.Lock()

    def check(self, calling_ae: str, called_ae: str, address: str) -> AssociationRefusal | None:
        """None to go on with negotiation, else the refusal to send."""
        if called_ae.strip() not in self._ours:
            return AssociationRefusal(
                REJECTED_PERMANENT, SERVICE_USER, CALLED_AE_NOT_RECOGNISED, "called AE title is not ours"
            )
        if self._any_caller:
            return None
        caller = self._callers.get(calling_ae.strip())
        if caller is None:
            return AssociationRefusal(
                REJECTED_PERMANENT, SERVICE_USER, CALLING_AE_NOT_RECOGNISED, "calling AE title is not allowed"
            )
        if caller.from_anywhere or self._from_source(caller, address):
            return None
        return AssociationRefusal(
            REJECTED_PERMANENT,
            SERVICE_USER,
            CALLING_AE_NOT_RECOGNISED,
            "calling AE title is not allowed from this address",
        )

    def _from_source(self, caller: Caller, address: str) -> bool:
        ip = _normal(address)
        if ip is None:
            return False
        if any(ip in network for network in caller.networks):
            return True
        return any(ip == _normal(resolved) for host in caller.hosts for resolved in self._addresses_of(host))

    def _addresses_of(self, host: str) -> frozenset[str]:
        now = time.monotonic()
        with self._lock:
            cached = self._resolved.get(host)
        if cached is not None and now - cached[0] < self._ttl_s:
            return cached[1]
        addresses = self._resolve(host)
        if not addresses:
            log.warning("allowed caller host %s does not resolve; its associations are refused", host)
        with self._lock:
            self._resolved[host] = (now, addresses)
        return addresses


def requested_titles(event: evt.Event) -> tuple[str, str]:
    """(calling, called) AE titles of the A-ASSOCIATE-RQ being handled."""
    primitive = event.assoc.requestor.primitive
    if primitive is None:
        return str(event.assoc.requestor.ae_title or "").strip(), ""
    return str(primitive.calling_ae_title or "").strip(), str(primitive.called_ae_title or "").strip()


def refuse(event: evt.Event, refusal: AssociationRefusal) -> None:
    """Answer A-ASSOCIATE-RJ from an EVT_REQUESTED handler; pynetdicom then skips negotiation and closes."""
    assoc = event.assoc
    try:
        assoc.acse.send_reject(refusal.result, refusal.source, refusal.reason)
    finally:
        assoc.is_rejected = True  # even if the reject could not be sent: never fall through to negotiation
        with contextlib.suppress(Exception):
            assoc.kill()


def _is_tls(assoc: Any) -> bool:
    return isinstance(getattr(assoc.dul.socket, "socket", None), ssl.SSLSocket)


class Gatekeeper:
    """The association-level handlers: decide on EVT_REQUESTED; count, log and audit every accept and refusal."""

    def __init__(
        self, settings: Settings, policy: AccessPolicy, trail: AuditTrail, shared: SharedLimits | None = None
    ) -> None:
        self._settings, self._policy, self._trail = settings, policy, trail
        self._admitted: dict[int, Any] = {}  # id(assoc) → associations that passed the check, until they close
        self._lock = threading.Lock()
        self._shared = shared  # the other receiver processes' associations, when there are several

    def requested(self, event: evt.Event) -> None:
        calling, called, address = "", "", "?"
        try:
            calling, called = requested_titles(event)
            address = str(event.assoc.requestor.address)
            refusal = self._policy.check(calling, called, address) or self._admit(event.assoc)
        except Exception as exc:  # fail closed: a broken check refuses rather than letting the association through
            log.error("access check failed (%s); refusing", type(exc).__name__)
            refusal = AssociationRefusal(REJECTED_PERMANENT, SERVICE_USER, NO_REASON, "access check failed")
        if refusal is not None:
            try:  # audit first: refuse() returns only once the peer has closed the connection
                self._refused(calling, address, called, refusal.why)
            finally:
                refuse(event, refusal)

    def _admit(self, assoc: Any) -> AssociationRefusal | None:
        """N8: count the association against PACSAI_MAX_ASSOCIATIONS, or refuse it transient (2, 3, 2)."""
        limit = self._settings.node.max_associations
        with self._lock, self._published():
            self._admitted = {key: other for key, other in self._admitted.items() if socket_open(other)}
            elsewhere = self._shared.associations_elsewhere() if self._shared is not None else 0
            if len(self._admitted) + elsewhere >= limit:
                return AssociationRefusal(
                    REJECTED_TRANSIENT,
                    SERVICE_PROVIDER_PRESENTATION,
                    LOCAL_LIMIT_EXCEEDED,
                    f"local limit exceeded ({limit} associations open)",
                )
            self._admitted[id(assoc)] = assoc
        return None

    def closed(self, event: evt.Event) -> None:
        """The connection closed: its association no longer counts."""
        with self._lock, self._published():
            self._admitted.pop(id(event.assoc), None)

    @contextlib.contextmanager
    def _published(self) -> Iterator[None]:
        """As the guard's: with several receiver processes, decide under their shared lock, then publish how many
        associations this process holds (call with the lock held)."""
        if self._shared is None:
            yield
            return
        with self._shared.locked():
            try:
                yield
            finally:
                self._shared.publish_associations(len(self._admitted))

    def accepted(self, event: evt.Event) -> None:
        calling, called = requested_titles(event)
        address, tls = str(event.assoc.requestor.address), _is_tls(event.assoc)
        ASSOCIATIONS.labels(result="accepted").inc()
        log.info("association from %s (%s) to %s accepted%s", calling, address, called, " over TLS" if tls else "")
        self._trail.record(audit.association_accepted(self._settings, calling, address, called, tls=tls))

    def rejected(self, event: evt.Event) -> None:
        """pynetdicom's own refusals (association limit, its AE-title check behind ours)."""
        calling, called = requested_titles(event)
        reply = event.assoc.acceptor.primitive
        result = (reply.result, reply.result_source, reply.diagnostic) if reply is not None else ("?", "?", "?")
        why = "rejected by the association layer (result {}, source {}, reason {})".format(*result)
        self._refused(calling, str(event.assoc.requestor.address), called, why)

    def tls_refused(self, address: str, why: str) -> None:
        self._refused("", address, "", f"TLS handshake failed ({why})")

    def _refused(self, calling: str, address: str, called: str, why: str) -> None:
        ASSOCIATIONS.labels(result="rejected").inc()
        log.warning("association from %s (%s) to %s refused: %s", calling or "?", address, called or "?", why)
        self._trail.record(audit.access_refused(self._settings, calling, address, called, why))
