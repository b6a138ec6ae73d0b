"""SCP: C-ECHO and C-STORE for every storage SOP class; each instance is durable before we answer success.

Who may associate is decided in `access` (called/calling AE title, source address), TLS in `tls`; every accepted or
refused association and, per study and association, the instances received are written to the audit trail.

Just over 300 lines on purpose: the SCP's wiring (events, servers, contexts) reads best in one place.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from pydicom import dcmread
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node import commitment, fast_dimse, fast_recv, stream_to_disk, wake
from dicom_node.access import AccessPolicy, Gatekeeper, requested_titles
from dicom_node.guard import GuardedServer
from dicom_node.metrics import INSTANCES
from dicom_node.receivers import SharedPortServer, SharedPortTlsServer, incoming_dir
from dicom_node.shared_limits import SharedLimits
from dicom_node.store_instance import Sender, store_received
from dicom_node.store_instance import header_of as header_of  # where reconcile and tests import it
from dicom_node.tcp import set_nodelay
from dicom_node.tls import ReloadingContext, TlsServer
from dicom_node.validate import TOO_LARGE, InstanceRefusal, check_command
from dicom_node.verify_results import recorder
from pacsai import audit, dimse
from pacsai.audit import AuditTrail
from pacsai.errors import ConfigError
from pacsai.logs import key_of
from pacsai.settings import Settings
from pacsai.state import State
from pacsai.storage import Spool, check_uid

log = logging.getLogger(__name__)
_STORE_PRIORITY = {0: "MEDIUM", 1: "HIGH", 2: "LOW"}  # (0000,0700) of the C-STORE request (PS3.7 C.4.1.1)
CLOSE_SETTLE_S = 0.5  # after a connection closes, wait this long for pynetdicom to report a release
# the largest P-DATA-TF we accept (pynetdicom's default is 16382): each PDU costs a turn of pynetdicom's state machine,
# so a 512² CT slice arrives in 1 PDU instead of 33; a longer one is still aborted at its header (pdu_headers)
MAX_PDU_BYTES = 1 << 20


class Associations:
    """Which series each open association has sent, so a release can close exactly those; and, for the audit
    trail, what it sent per study: instances stored by SOP class, instances refused."""

    def __init__(self, changed: Callable[[set[str]], None] | None = None) -> None:
        self._lock = threading.Lock()
        self._changed = changed  # told the open series whenever they change (a receiver process tells the node)
        self._series: dict[int, set[str]] = {}
        self._tallies: dict[int, dict[str, tuple[dict[str, int], list[int]]]] = {}
        self._bad_commands: dict[int, dict[int, InstanceRefusal]] = {}  # id(assoc) → message ID → why its command fails

    def add(self, assoc: Any, series_key: str) -> None:
        with self._lock:
            series = self._series.setdefault(id(assoc), set())
            new = series_key not in series
            series.add(series_key)
        if new and self._changed is not None:
            self._changed(self.open_series())

    def tally(self, assoc: Any, study_key: str, sop_class: str, *, stored: bool) -> None:
        with self._lock:
            by_class, refused = self._tallies.setdefault(id(assoc), {}).setdefault(study_key, ({}, [0]))
            if stored:
                by_class[sop_class] = by_class.get(sop_class, 0) + 1
            else:
                refused[0] += 1

    def refuse_command(self, assoc: Any, message_id: int, refusal: InstanceRefusal) -> None:
        with self._lock:
            self._bad_commands.setdefault(id(assoc), {})[message_id] = refusal

    def command_refusal(self, assoc: Any, message_id: int) -> InstanceRefusal | None:
        with self._lock:
            return self._bad_commands.get(id(assoc), {}).pop(message_id, None)

    def pop(self, assoc: Any) -> set[str]:
        with self._lock:
            self._bad_commands.pop(id(assoc), None)
            series = self._series.pop(id(assoc), set())
        if series and self._changed is not None:
            self._changed(self.open_series())
        return series

    def pop_tallies(self, assoc: Any) -> dict[str, tuple[dict[str, int], int]]:
        """study key ('' when the study UID was unreadable) → (stored instances by SOP class, refused count)."""
        with self._lock:
            tallies = self._tallies.pop(id(assoc), {})
        return {study: (by_class, refused[0]) for study, (by_class, refused) in tallies.items()}

    def open_series(self) -> set[str]:
        with self._lock:
            return set().union(*self._series.values()) if self._series else set()


def _study_uid_of(event: evt.Event) -> str:
    try:
        ds = dcmread(event.dataset_path, specific_tags=["StudyInstanceUID"])
        return check_uid("StudyInstanceUID", ds.get("StudyInstanceUID"))
    except Exception:  # unreadable dataset or invalid UID: the refusal is tallied under an unknown study
        return ""


class StoreHandler:
    """C-STORE: validate UIDs, spool durably, record, then answer; tally the outcome per study for the audit."""

    def __init__(self, spool: Spool, state: State, associations: Associations, log_key: bytes = b"") -> None:
        self._spool, self._state, self._associations = spool, state, associations
        self._log_key = log_key

    def __call__(self, event: evt.Event) -> int:
        code, study_uid = self._store(event)
        if study_uid is None:  # refused before its header was read or validated: read just that (not yet moved)
            study_uid = _study_uid_of(event)
        self._associations.tally(
            event.assoc,
            key_of(self._log_key, study_uid) if study_uid else "",
            str(event.context.abstract_syntax),
            stored=code == dimse.SUCCESS,
        )
        return code

    def _store(self, event: evt.Event) -> tuple[int, str | None]:
        """The status, and the study UID once it was read and validated (None before that)."""
        calling = event.assoc.requestor.ae_title
        bad_command = self._associations.command_refusal(event.assoc, int(getattr(event.request, "MessageID", 0)))
        if bad_command is not None:
            log.warning("refused instance from %s: %s (0x%04X)", calling, bad_command.reason, bad_command.status)
            return bad_command.status, None
        problem = stream_to_disk.problem_of(event.request)
        if problem:  # C15: over PACSAI_MAX_INSTANCE_MB (never fits: 0xC001), or the disk filled while receiving
            code = TOO_LARGE if problem == stream_to_disk.TOO_LARGE else dimse.OUT_OF_RESOURCES
            log.warning("refused instance from %s: data set %s (0x%04X)", calling, problem, code)
            return code, None
        priority = _STORE_PRIORITY.get(int(getattr(event.request, "Priority", 0) or 0), "")
        received = store_received(
            self._spool,
            self._state,
            event.dataset_path,  # streamed to disk as it arrived (dicom_node/stream_to_disk.py)
            Sender(calling, requested_titles(event)[1], {"store_priority": priority}),
            transfer_syntax=str(event.context.transfer_syntax),
            sop_instance_uid=str(getattr(event.request, "AffectedSOPInstanceUID", "")),
            digest=stream_to_disk.digest_of(event.request),  # hashed as it was written
        )
        if received.stored:
            self._associations.add(event.assoc, received.series_key)
        return received.status, received.study_uid or None


def build_ae(settings: Settings) -> AE:
    ae = AE(ae_title=settings.node.ae_title)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(str(context.abstract_syntax), ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
    commitment.support_reports(ae)  # storage commitment results from the PACS (proof of delivery)
    # behind the access policy (EVT_REQUESTED), pynetdicom's own AE-title checks stay on as a second line
    ae.require_called_aet = not settings.node.ae_titles  # several AE titles: only the policy can check the called one
    if not settings.security.allow_any_caller:
        if not settings.callers:
            raise ConfigError(
                "no caller may connect: set PACSAI_PEERS or PACSAI_ALLOWED_CALLERS "
                "(or PACSAI_ALLOW_ANY_CALLER=true for a lab)"
            )
        ae.require_calling_aet = list(settings.callers)
    ae.maximum_pdu_size = MAX_PDU_BYTES
    ae.acse_timeout = 10
    ae.dimse_timeout = 60
    ae.network_timeout = 60
    # N8: PACSAI_MAX_ASSOCIATIONS is enforced by access.Gatekeeper on associations that passed the access check;
    # pynetdicom's own limit counts every connection, negotiated or not (idle sockets would lock a PACS out)
    ae.maximum_associations = 1 << 16
    return ae


def serve(
    settings: Settings,
    state: State,
    spool: Spool,
    associations: Associations,
    on_released: Callable[[list[str]], None],
    trail: AuditTrail,
    *,
    shared: SharedLimits | None = None,
    incoming: Path | None = None,
) -> list[ThreadedAssociationServer]:
    """Start the SCP (plain port, TLS port, or both) in background threads; return the servers (.shutdown() stops).

    With several receiver processes (`shared`), the ports are bound with SO_REUSEPORT and the association and
    per-address limits count every process's connections; `incoming` is this process's own directory of partial files.
    """
    gate = Gatekeeper(settings, AccessPolicy(settings), trail, shared)
    events = AssociationEvents(
        settings, associations, on_released, trail, StoreHandler(spool, state, associations, settings.log_key)
    )
    handlers: list[Any] = [
        *events.handlers(),
        (evt.EVT_CONN_CLOSE, gate.closed),
        (evt.EVT_REQUESTED, gate.requested),
        (evt.EVT_REJECTED, gate.rejected),
        (evt.EVT_ACCEPTED, gate.accepted),
        *commitment.handlers(recorder(state, settings)),  # storage commitment reports (proof of delivery)
    ]
    ae = build_ae(settings)
    fast_recv.read_in_large_chunks()
    fast_dimse.install()
    if settings.node.prompt_wake:
        wake.install()
    stream_to_disk.stream_to_files(
        ae,
        stream_to_disk.Policy(incoming or incoming_dir(settings, 0), settings.node.max_instance_mb << 20),
    )
    servers = _start_servers(ae, settings, handlers, gate, shared)
    log.info(
        "listening as %s on %s:%d%s",
        "/".join(settings.node.our_ae_titles),
        settings.node.bind_host,
        settings.security.tls_port if settings.security.tls_only else settings.node.port,
        " (TLS only)" if settings.security.tls_only else "",
    )
    return servers


@dataclass(slots=True)
class AssociationEvents:
    """What the SCP does on each association event: store, audit what an association sent, report releases."""

    settings: Settings
    associations: Associations
    on_released: Callable[[list[str]], None]
    trail: AuditTrail
    store_instance: StoreHandler

    def handlers(self) -> list[Any]:
        prompt = (
            [(evt.EVT_CONN_OPEN, lambda event: wake.prompt(event.assoc)), (evt.EVT_CONN_CLOSE, self.unprompt)]
            if self.settings.node.prompt_wake
            else []
        )
        return [
            (evt.EVT_C_STORE, self.store),
            (evt.EVT_C_ECHO, lambda event: dimse.SUCCESS),
            (evt.EVT_CONN_OPEN, set_nodelay),
            *prompt,
            (evt.EVT_RELEASED, self.released),
            (evt.EVT_ABORTED, self.ended),
            (evt.EVT_CONN_CLOSE, self.closed),  # else the quiet period decides
            (evt.EVT_DIMSE_RECV, self.inspect_command),
        ]

    @staticmethod
    def unprompt(event: evt.Event) -> None:
        wake.release(event.assoc)

    def store(self, event: evt.Event) -> int:
        code = self.store_instance(event)
        INSTANCES.labels(outcome="success" if code == dimse.SUCCESS else f"0x{code:04X}").inc()
        return code

    def ended(self, event: evt.Event) -> list[str]:
        """Released, aborted or dropped: audit what the association sent, per study (once: the tallies are popped)."""
        stream_to_disk.discard_partial(event.assoc)  # N10: a data set cut off mid-transfer leaves no file
        calling, called = requested_titles(event)
        address = str(event.assoc.requestor.address)
        for study_key, (stored, refused) in self.associations.pop_tallies(event.assoc).items():
            self.trail.record(
                audit.instances_received(self.settings, calling, address, called, study_key, stored, refused)
            )
        return sorted(self.associations.pop(event.assoc))

    def released(self, event: evt.Event) -> None:
        self.on_released(self.ended(event))

    def closed(self, event: evt.Event) -> None:
        """The connection closed. After a release pynetdicom may report the close before EVT_RELEASED (the peer drops
        the socket as soon as it has the release reply), so decide a moment later, when the association knows."""

        def settle() -> None:
            series = self.ended(event)  # empty when `released` (or an abort) already took them
            if series and event.assoc.is_released:
                self.on_released(series)

        timer = threading.Timer(CLOSE_SETTLE_S, settle)
        timer.daemon = True
        timer.start()

    def inspect_command(self, event: evt.Event) -> None:
        """N15: a command with an odd-length or malformed UID is answered with a failure by the C-STORE handler.

        Only here, before pynetdicom turns the command into a primitive, are the command's raw bytes still at hand.
        """
        message = event.message
        refusal = check_command(message.encoded_command_set.getvalue())
        if refusal is not None:
            self.associations.refuse_command(event.assoc, int(message.command_set.get("MessageID", 0) or 0), refusal)


def _start_servers(
    ae: AE, settings: Settings, handlers: list[Any], gate: Gatekeeper, shared: SharedLimits | None
) -> list[ThreadedAssociationServer]:
    """The plain server (guarded) unless TLS only, and the TLS server when a certificate is configured."""
    context = ReloadingContext(settings) if settings.security.tls_cert is not None else None  # wrong files: stop here
    servers: list[ThreadedAssociationServer] = []
    if not settings.security.tls_only:
        server_class = SharedPortServer if shared is not None else GuardedServer
        server = ae.make_server(
            (settings.node.bind_host, settings.node.port), evt_handlers=handlers, server_class=server_class
        )
        servers.append(_run(ae, _limited(server, settings, shared)))
    if context is not None:
        tls_class = SharedPortTlsServer if shared is not None else TlsServer
        tls_server = cast(
            TlsServer,
            ae.make_server(
                (settings.node.bind_host, settings.security.tls_port), evt_handlers=handlers, server_class=tls_class
            ),
        )
        tls_server.tls, tls_server.on_refused = context, gate.tls_refused
        servers.append(_run(ae, _limited(tls_server, settings, shared)))
        log.info(
            "DICOM over TLS on %s:%d%s",
            settings.node.bind_host,
            settings.security.tls_port,
            " (mutual: callers need a certificate)" if settings.security.tls_ca else "",
        )
    return servers


def _limited(
    server: ThreadedAssociationServer, settings: Settings, shared: SharedLimits | None
) -> ThreadedAssociationServer:
    """The guard's connection budgets from the settings (set before the server takes its first connection)."""
    if isinstance(server, GuardedServer):
        server.per_address_limit = settings.node.max_connections_per_address
        server.pending_limit = settings.node.max_pending_connections
        server.shared = shared
    return server


def _run(ae: AE, server: ThreadedAssociationServer) -> ThreadedAssociationServer:
    ae._servers.append(server)  # so ae.shutdown() stops it, as start_server() would
    threading.Thread(target=server.serve_forever, name=f"pacsai-scp-{server.server_address[1]}", daemon=True).start()
    return server
