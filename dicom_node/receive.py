"""SCP: C-ECHO and C-STORE for every storage SOP class; each instance is durable before we answer success.

Who may associate is decided in `access` (called/calling AE title, source address), TLS in `tls`; every accepted or
refused association and, per study and association, the instances received are written to the audit trail.
"""

from __future__ import annotations

import logging
import socket
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from dicom_node import audit, incoming, status
from dicom_node.access import AccessPolicy, Gatekeeper, requested_titles
from dicom_node.audit import AuditTrail
from dicom_node.guard import GuardedServer
from dicom_node.metrics import INSTANCES
from dicom_node.spool import InvalidUid, Spool, SpoolFull, check_uid
from dicom_node.tls import ReloadingContext, TlsServer
from dicom_node.validate import TOO_LARGE, Refusal, check_command, check_instance
from worker.errors import ConfigError
from worker.logs import key_of
from worker.settings import Settings
from worker.state import State

log = logging.getLogger(__name__)
_HEADER_KEYWORDS = ("Modality", "SOPClassUID", "BodyPartExamined", "SeriesDescription")
_LEFT_ON_DISK_BYTES = 64 * 1024   # C15: values larger than this (pixel data) are not read into memory by the node
CLOSE_SETTLE_S = 0.5              # after a connection closes, wait this long for pynetdicom to report a release


def set_nodelay(event: evt.Event) -> None:
    """Turn Nagle off: DIMSE is request/response with small PDUs, Nagle costs ~40 ms per instance."""
    sock = getattr(event.assoc.dul.socket, "socket", None)
    if sock is not None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


class Associations:
    """Which series each open association has sent, so a release can close exactly those; and, for the audit
    trail, what it sent per study: instances stored by SOP class, instances refused."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._series: dict[int, set[str]] = {}
        self._tallies: dict[int, dict[str, tuple[dict[str, int], list[int]]]] = {}
        self._bad_commands: dict[int, dict[int, Refusal]] = {}    # id(assoc) → message ID → why its command fails

    def add(self, assoc: Any, series_key: str) -> None:
        with self._lock:
            self._series.setdefault(id(assoc), set()).add(series_key)

    def tally(self, assoc: Any, study_key: str, sop_class: str, *, stored: bool) -> None:
        with self._lock:
            by_class, refused = self._tallies.setdefault(id(assoc), {}).setdefault(study_key, ({}, [0]))
            if stored:
                by_class[sop_class] = by_class.get(sop_class, 0) + 1
            else:
                refused[0] += 1

    def refuse_command(self, assoc: Any, message_id: int, refusal: Refusal) -> None:
        with self._lock:
            self._bad_commands.setdefault(id(assoc), {})[message_id] = refusal

    def command_refusal(self, assoc: Any, message_id: int) -> Refusal | None:
        with self._lock:
            return self._bad_commands.get(id(assoc), {}).pop(message_id, None)

    def pop(self, assoc: Any) -> set[str]:
        with self._lock:
            self._bad_commands.pop(id(assoc), None)
            return self._series.pop(id(assoc), set())

    def pop_tallies(self, assoc: Any) -> dict[str, tuple[dict[str, int], int]]:
        """study key ('' when the study UID was unreadable) → (stored instances by SOP class, refused count)."""
        with self._lock:
            tallies = self._tallies.pop(id(assoc), {})
        return {study: (by_class, refused[0]) for study, (by_class, refused) in tallies.items()}

    def open_series(self) -> set[str]:
        with self._lock:
            return set().union(*self._series.values()) if self._series else set()


def header_of(ds: Dataset) -> dict[str, str]:
    """The few routing attributes we keep in the database (no patient data)."""
    return {keyword: str(ds.get(keyword, "") or "") for keyword in _HEADER_KEYWORDS}


def read_received(path: Path, transfer_syntax: str) -> Dataset:
    """The header of a received file; large values stay on disk (a deflated data set is inflated whole by pydicom,
    whose offsets then refer to the inflated stream: read it without leaving anything behind)."""
    deflated = bool(transfer_syntax) and UID(transfer_syntax).is_deflated
    return dcmread(path, defer_size=None if deflated else _LEFT_ON_DISK_BYTES)


def _study_uid_of(event: evt.Event) -> str:
    try:
        ds = dcmread(event.dataset_path, specific_tags=["StudyInstanceUID"])
        return check_uid("StudyInstanceUID", ds.get("StudyInstanceUID"))
    except Exception:   # unreadable dataset or invalid UID: the refusal is tallied under an unknown study
        return ""


class StoreHandler:
    """C-STORE: validate UIDs, spool durably, record, then answer; tally the outcome per study for the audit."""

    def __init__(self, spool: Spool, state: State, associations: Associations, log_key: bytes = b"") -> None:
        self._spool, self._state, self._associations = spool, state, associations
        self._log_key = log_key

    def __call__(self, event: evt.Event) -> int:
        code, study_uid = self._store(event)
        if study_uid is None:     # refused before its header was read or validated: read just that (not yet moved)
            study_uid = _study_uid_of(event)
        self._associations.tally(event.assoc, key_of(self._log_key, study_uid) if study_uid else "",
                                 str(event.context.abstract_syntax), stored=code == status.SUCCESS)
        return code

    def _store(self, event: evt.Event) -> tuple[int, str | None]:
        """The status, and the study UID once it was read and validated (None before that)."""
        calling = event.assoc.requestor.ae_title
        bad_command = self._associations.command_refusal(event.assoc, int(getattr(event.request, "MessageID", 0)))
        if bad_command is not None:
            log.warning("refused instance from %s: %s (0x%04X)", calling, bad_command.reason, bad_command.status)
            return bad_command.status, None
        problem = incoming.problem_of(event.request)
        if problem:   # C15: over PACSAI_MAX_INSTANCE_MB (never fits: 0xC001), or the disk filled while receiving
            code = TOO_LARGE if problem == incoming.TOO_LARGE else status.OUT_OF_RESOURCES
            log.warning("refused instance from %s: data set %s (0x%04X)", calling, problem, code)
            return code, None
        try:
            path = event.dataset_path       # streamed to disk as it arrived (dicom_node/incoming.py)
            ds = read_received(path, str(event.context.transfer_syntax))
            study_uid = check_uid("StudyInstanceUID", ds.get("StudyInstanceUID"))
            series_uid = check_uid("SeriesInstanceUID", ds.get("SeriesInstanceUID"))
            sop_uid = check_uid("SOPInstanceUID", ds.get("SOPInstanceUID"))
            if sop_uid != str(getattr(event.request, "AffectedSOPInstanceUID", "")):
                log.warning("refused instance from %s: SOPInstanceUID differs from the command's", calling)
                return status.DATASET_DOES_NOT_MATCH, study_uid
            header = header_of(ds)
            refusal = check_instance(ds, path.stat().st_size, transfer_syntax=str(event.context.transfer_syntax),
                                     source=path)
        except InvalidUid as exc:
            log.warning("refused instance from %s: %s", calling, exc)
            return status.CANNOT_UNDERSTAND, None
        except RecursionError:  # C5: pydicom parses undefined-length sequences recursively
            log.warning("refused instance from %s: sequences nested too deep to decode", calling)
            return status.CANNOT_UNDERSTAND, None
        except Exception as exc:  # malformed dataset: pydicom errors may quote values, so log the type only
            log.warning("refused instance from %s: unreadable dataset (%s)", calling, type(exc).__name__)
            return status.CANNOT_UNDERSTAND, None
        if refusal is not None:
            log.warning("refused instance from %s: %s (0x%04X)", calling, refusal.reason, refusal.status)
            return refusal.status, study_uid
        try:
            stored = self._spool.put_file(study_uid, series_uid, sop_uid, path)
            self._state.record_instance(sop_key=stored.sop_key, series_key=stored.series_key,
                                        study_key=stored.study_key, path=stored.path, calling_ae=calling,
                                        called_ae=requested_titles(event)[1], header=header)
        except SpoolFull:
            log.warning("refused instance from %s: spool disk under its reserve", calling)
            return status.OUT_OF_RESOURCES, study_uid
        except OSError as exc:
            log.error("refused instance from %s: spool write failed (%s)", calling, type(exc).__name__)
            return status.OUT_OF_RESOURCES, study_uid
        self._associations.add(event.assoc, stored.series_key)
        return status.SUCCESS, study_uid


def build_ae(settings: Settings) -> AE:
    ae = AE(ae_title=settings.ae_title)
    for context in AllStoragePresentationContexts:
        ae.add_supported_context(str(context.abstract_syntax), ALL_TRANSFER_SYNTAXES)
    ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
    # behind the access policy (EVT_REQUESTED), pynetdicom's own AE-title checks stay on as a second line
    ae.require_called_aet = not settings.ae_titles     # several AE titles: only the policy can check the called one
    if not settings.allow_any_caller:
        if not settings.callers:
            raise ConfigError("no caller may connect: set PACSAI_PEERS or PACSAI_ALLOWED_CALLERS "
                              "(or PACSAI_ALLOW_ANY_CALLER=true for a lab)")
        ae.require_calling_aet = list(settings.callers)
    ae.acse_timeout = 10
    ae.dimse_timeout = 60
    ae.network_timeout = 60
    ae.maximum_associations = settings.max_associations    # N8: one more gets A-ASSOCIATE-RJ (2, 3, 2)
    return ae


def serve(settings: Settings, state: State, spool: Spool, associations: Associations,
          on_released: Callable[[list[str]], None], trail: AuditTrail) -> list[ThreadedAssociationServer]:
    """Start the SCP (plain port, TLS port, or both) in background threads; return the servers (.shutdown() stops)."""
    store_instance = StoreHandler(spool, state, associations, settings.log_key)
    gate = Gatekeeper(settings, AccessPolicy(settings), trail)

    def store(event: evt.Event) -> int:
        code = store_instance(event)
        INSTANCES.labels(outcome="success" if code == status.SUCCESS else f"0x{code:04X}").inc()
        return code

    def ended(event: evt.Event) -> list[str]:
        """Released, aborted or dropped: audit what the association sent, per study (once: the tallies are popped)."""
        incoming.discard_partial(event.assoc)    # N10: a data set cut off mid-transfer leaves no file
        calling, called = requested_titles(event)
        for study_key, (stored, refused) in associations.pop_tallies(event.assoc).items():
            trail.record(audit.instances_received(settings, calling, str(event.assoc.requestor.address), called,
                                                  study_key, stored, refused))
        return sorted(associations.pop(event.assoc))

    def released(event: evt.Event) -> None:
        on_released(ended(event))

    def closed(event: evt.Event) -> None:
        """The connection closed. After a release pynetdicom may report the close before EVT_RELEASED (the peer drops
        the socket as soon as it has the release reply), so decide a moment later, when the association knows."""
        def settle() -> None:
            series = ended(event)      # empty when `released` (or an abort) already took them
            if series and event.assoc.is_released:
                on_released(series)

        timer = threading.Timer(CLOSE_SETTLE_S, settle)
        timer.daemon = True
        timer.start()

    def inspect_command(event: evt.Event) -> None:
        """N15: a command with an odd-length or malformed UID is answered with a failure by the C-STORE handler.

        Only here, before pynetdicom turns the command into a primitive, are the command's raw bytes still at hand.
        """
        message = event.message
        refusal = check_command(message.encoded_command_set.getvalue())
        if refusal is not None:
            associations.refuse_command(event.assoc, int(message.command_set.get("MessageID", 0) or 0), refusal)

    handlers: list[Any] = [(evt.EVT_C_STORE, store), (evt.EVT_C_ECHO, lambda event: status.SUCCESS),
                           (evt.EVT_CONN_OPEN, set_nodelay), (evt.EVT_RELEASED, released),
                           (evt.EVT_ABORTED, ended), (evt.EVT_CONN_CLOSE, closed),  # else the quiet period decides
                           (evt.EVT_REQUESTED, gate.requested), (evt.EVT_REJECTED, gate.rejected),
                           (evt.EVT_ACCEPTED, gate.accepted), (evt.EVT_DIMSE_RECV, inspect_command)]
    ae = build_ae(settings)
    incoming.stream_to_files(ae, incoming.Policy(settings.data_dir / "incoming", settings.max_instance_mb << 20))
    context = ReloadingContext(settings) if settings.tls_cert is not None else None   # wrong files: stop here
    servers: list[ThreadedAssociationServer] = []
    if not settings.tls_only:
        servers.append(_run(ae, ae.make_server((settings.bind_host, settings.port), evt_handlers=handlers,
                                               server_class=GuardedServer)))
    if context is not None:
        tls_server = cast(TlsServer, ae.make_server((settings.bind_host, settings.tls_port), evt_handlers=handlers,
                                                    server_class=TlsServer))
        tls_server.tls, tls_server.on_refused = context, gate.tls_refused
        servers.append(_run(ae, tls_server))
        log.info("DICOM over TLS on %s:%d%s", settings.bind_host, settings.tls_port,
                 " (mutual: callers need a certificate)" if settings.tls_ca else "")
    for server in servers:
        if isinstance(server, GuardedServer):
            server.per_address_limit = settings.max_connections_per_address
    log.info("listening as %s on %s:%d%s", "/".join(settings.our_ae_titles), settings.bind_host,
             settings.tls_port if settings.tls_only else settings.port, " (TLS only)" if settings.tls_only else "")
    return servers


def _run(ae: AE, server: ThreadedAssociationServer) -> ThreadedAssociationServer:
    ae._servers.append(server)   # so ae.shutdown() stops it, as start_server() would
    threading.Thread(target=server.serve_forever, name=f"pacsai-scp-{server.server_address[1]}", daemon=True).start()
    return server
