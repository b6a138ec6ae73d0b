"""Settings: one typed object built once from PACSAI_* variables and passed down, in sections modules take whole.

Settings
├── node: NodeSettings            the DICOM SCP: AE titles, ports, limits, completeness timers, routing, metrics
├── security: SecuritySettings    who may call, DICOM TLS, the audit trail's syslog
├── storage: StorageSettings      data dir (spool, outbox, queue, database), disk reserve, retention
├── queue: QueueSettings          the broker, time limits, retries from the database
├── delivery: DeliverySettings    peers, where results go, send retries, destination profiles
└── worker: WorkerSettings        models, device, concurrency, memory budget, de-identified models

Over 300 lines on purpose: every PACSAI_* variable is read in this one file, section by section.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

from pacsai import settings_parse as parse
from pacsai.errors import ConfigError
from pacsai.peers import (
    Caller,
    PeerTls,
    WebAuth,
    WebPeer,
    parse_callers,
    parse_web_credentials,
    parse_web_peers,
    with_credentials,
)
from pacsai.peers import Peer as Peer  # re-exported: Peer lived here first
from pacsai.peers import check_ae_title as check_ae_title
from pacsai.profiles import Profile, Profiles, load_profiles

T = TypeVar("T")
PACKAGE_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_ROUTES_FILE = Path(__file__).resolve().parent / "routes.yaml"  # the shipped rules; PACSAI_ROUTES_FILE: a site's
_NO_CALLERS: tuple[Caller, ...] = ()


@dataclass(frozen=True, slots=True)
class NodeSettings:
    ae_title: str = "PACSAI"
    ae_titles: tuple[str, ...] = ()  # further AE titles we answer to as called AE
    bind_host: str = "0.0.0.0"
    port: int = 11112
    max_connections_per_address: int = 12  # TCP connections one source address may hold (raw sockets count)
    max_associations: int = 16  # concurrent associations; one more gets A-ASSOCIATE-RJ (2, 3, 2)
    max_pending_connections: int = 32  # connections not yet negotiated; when full, the oldest is closed for a new one
    max_instance_mb: int = 2048  # C15: a larger instance is refused (0xC001); received by streaming to disk
    quiet_period_s: float = 10.0
    release_grace_s: float = 2.0
    complete_on_declared_count: bool = True  # released with as many instances as it declares: complete at once
    prompt_wake: bool = True  # pynetdicom's polling threads wake on work, not only every 1 ms (dicom_node/wake.py)
    receivers: int = 1  # processes serving the DICOM port(s) together (SO_REUSEPORT; dicom_node/receivers.py)
    routes_file: Path = DEFAULT_ROUTES_FILE
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0  # 0: no metrics endpoint
    web_host: str = "127.0.0.1"  # operator console (dicom_node/console); `pacsai web` and, with web_port, the node
    web_port: int = 0  # 0: the node serves no console (`pacsai web` then listens on 8080)

    @property
    def our_ae_titles(self) -> tuple[str, ...]:
        return (self.ae_title, *(title for title in self.ae_titles if title != self.ae_title))


@dataclass(frozen=True, slots=True)
class SecuritySettings:
    """docs/security.md."""

    allowed_callers: tuple[str, ...] = ()  # empty: the AE titles of the peers
    allow_any_caller: bool = False
    caller_rules: tuple[Caller, ...] = ()  # PACSAI_ALLOWED_CALLERS with sources; empty: each peer from its host
    tls_port: int = 2762  # DICOM over TLS (PS3.15 B.1 "dicom-tls"), when tls_cert is set
    tls_cert: Path | None = None  # our certificate (chain) and key, PEM
    tls_key: Path | None = None
    tls_ca: Path | None = None  # CAs we trust; set: callers must present a certificate (mutual TLS)
    tls_only: bool = False  # no plain DICOM port
    tls_client_cert: Path | None = None  # our client certificate for `+tls` peers that require one
    tls_client_key: Path | None = None
    audit_file: Path | None = None  # None: data_dir/audit.log
    audit_syslog: str = ""  # also send audit messages to "udp|tcp|tls://host:port" (RFC 5424)


@dataclass(frozen=True, slots=True)
class StorageSettings:
    data_dir: Path = Path("pacsai-data")
    spool_reserve_mb: int = 1024  # refuse instances (0xA700) when free disk would drop under this
    retention_h: float = 24.0  # spooled inputs and results are deleted this long after their jobs end
    database_url: str = field(default="", repr=False)  # empty: SQLite file in data_dir; else postgresql://…

    @property
    def spool_reserve_bytes(self) -> int:
        """PACSAI_SPOOL_RESERVE_MB in bytes: the free disk kept for incoming instances."""
        return self.spool_reserve_mb << 20

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def outbox_dir(self) -> Path:
        return self.data_dir / "outbox"

    @property
    def queue_dir(self) -> Path:
        return self.data_dir / "queue"

    @property
    def database_path(self) -> Path:
        return self.data_dir / "pacsai.db"

    @property
    def database(self) -> str | Path:
        """What State opens: the PostgreSQL URL when configured, else the SQLite file."""
        return self.database_url or self.database_path

    @property
    def retention_s(self) -> float:
        return self.retention_h * 3600.0


@dataclass(frozen=True, slots=True)
class QueueSettings:
    broker_url: str = field(default="", repr=False)  # empty: on-disk queue under data_dir/queue (embedded mode)
    task_time_limit_s: float = 3600.0
    visibility_timeout_s: float = 0.0  # Redis redelivers an unacknowledged job after this; 0: 2 x limit + 600
    retry_delay_s: float = 10.0  # a failed job is tried again after this, doubled each time
    requeue_after_s: float = 120.0  # a queued job the broker no longer holds is enqueued again after this
    dispatch_window: int = 2  # jobs of one model waiting in the broker at most (0: all); the rest wait by priority
    off_peak: tuple[int, int] | None = None  # minutes after local midnight (start, end) for background jobs


@dataclass(frozen=True, slots=True)
class DeliverySettings:
    peers: tuple[Peer, ...] = ()  # PACS we may send results to
    destination: str = ""  # AE title results go to; empty: the calling AE if it is a peer
    send_max_attempts: int = 60
    send_backoff_s: float = 5.0
    send_backoff_max_s: float = 600.0
    send_alert_after: int = 5  # failed delivery attempts before an ALERT log line and metric
    dimse_timeout_s: float = 60.0  # a C-STORE (or C-ECHO) the peer leaves unanswered this long is aborted
    verify_timeout_s: float = 300.0  # profile verify: a storage commitment unanswered this long is asked again
    verify_retry_s: float = 60.0  # profile verify: instances not committed/found are sent and checked again after this
    verify_max_attempts: int = 3  # profile verify: requests per job before an ALERT and the job stays delivered
    profiles: Profiles = field(default_factory=Profiles)  # PACSAI_PROFILES_FILE: what each peer gets
    web_peers: tuple[WebPeer, ...] = ()  # DICOMweb servers results may go to by STOW-RS (PACSAI_DICOMWEB_PEERS)

    def peer(self, ae_title: str) -> Peer | None:
        return next((peer for peer in self.peers if peer.ae_title == ae_title), None)

    def web_peer(self, name: str) -> WebPeer | None:
        return next((peer for peer in self.web_peers if peer.ae_title == name), None)

    def profile_for(self, ae_title: str) -> Profile:
        """The destination profile of a peer (pacsai/profiles.py); peers without one get the default."""
        return self.profiles.for_peer(ae_title)


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    models_dir: Path = PACKAGE_ROOT / "models"  # the models shipped in the repository; PACSAI_MODELS_DIR: a site's
    device: str = "auto"
    concurrency: int = 1
    models: tuple[str, ...] = ()  # models this worker serves (one queue each); empty: all installed
    deidentify_for: tuple[str, ...] = ()  # models whose input is a de-identified copy (A10, docs/security.md)
    memory_mb: int = 0  # refuse series estimated to need more; 0: 80 % of MemAvailable


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a node or worker process needs; tests pass a plain dict to from_env."""

    node: NodeSettings = field(default_factory=NodeSettings)
    security: SecuritySettings = field(default_factory=SecuritySettings)
    storage: StorageSettings = field(default_factory=StorageSettings)
    queue: QueueSettings = field(default_factory=QueueSettings)
    delivery: DeliverySettings = field(default_factory=DeliverySettings)
    worker: WorkerSettings = field(default_factory=WorkerSettings)
    log_level: str = "INFO"
    log_key: bytes = field(default=b"", repr=False)  # keys the hashes that name studies in logs and the spool

    @property
    def callers(self) -> tuple[str, ...]:
        return self.security.allowed_callers or tuple(peer.ae_title for peer in self.delivery.peers)

    @property
    def caller_policy(self) -> tuple[Caller, ...]:
        """Who may call us from where: PACSAI_ALLOWED_CALLERS, else every peer from its own host."""
        return self.security.caller_rules or tuple(Caller.of_peer(peer) for peer in self.delivery.peers)

    @property
    def audit_path(self) -> Path:
        return self.security.audit_file or self.storage.data_dir / "audit.log"

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Build settings from PACSAI_* variables; a wrong value raises ConfigError naming the variable."""
        get = _Get(parse.with_secret_files(env))
        queue = _queue(get)
        return cls(
            node=_node(get),
            security=_security(get),
            storage=_storage(get),
            queue=queue,
            delivery=_delivery(get),
            worker=_worker(get),
            log_level=get("LOG_LEVEL", parse.log_level, "INFO"),
            log_key=get("LOG_KEY", str.encode, b""),
        )._checked()

    def _checked(self) -> Settings:
        """Checks across variables; TLS peers get the client side of our TLS settings."""
        security, node, delivery = self.security, self.node, self.delivery
        pairs = (
            ("TLS_CERT", security.tls_cert, "TLS_KEY", security.tls_key),
            ("TLS_CLIENT_CERT", security.tls_client_cert, "TLS_CLIENT_KEY", security.tls_client_key),
        )
        for name, value, other, other_value in pairs:
            if (value is None) != (other_value is None):
                missing, given = (other, name) if value is not None else (name, other)
                raise ConfigError(f"PACSAI_{missing} is not set (PACSAI_{given} is; both or neither)")
        if security.tls_only and security.tls_cert is None:
            raise ConfigError("PACSAI_TLS_ONLY=true needs PACSAI_TLS_CERT and PACSAI_TLS_KEY")
        if security.tls_cert is not None and security.tls_port == node.port and not security.tls_only:
            raise ConfigError(f"PACSAI_TLS_PORT {security.tls_port} is PACSAI_PORT too; give TLS its own port")
        if self.queue.broker_url and delivery.send_backoff_max_s >= self.queue.visibility_timeout_s:
            # a countdown the worker holds past the visibility timeout makes Redis deliver the message again
            raise ConfigError(
                f"PACSAI_SEND_BACKOFF_MAX_S ({delivery.send_backoff_max_s:g}) must be below "
                f"PACSAI_VISIBILITY_TIMEOUT_S ({self.queue.visibility_timeout_s:g})"
            )
        known = {peer.ae_title for peer in delivery.peers}
        if both := sorted(known & {peer.ae_title for peer in delivery.web_peers}):
            raise ConfigError(f"{both} named in both PACSAI_PEERS and PACSAI_DICOMWEB_PEERS")
        known |= {peer.ae_title for peer in delivery.web_peers}
        strangers = sorted({title for title, _ in delivery.profiles.peers} - known)
        if strangers:
            raise ConfigError(f"PACSAI_PROFILES_FILE has profiles for {strangers}, which PACSAI_PEERS does not name")
        client = PeerTls(ca=security.tls_ca, cert=security.tls_client_cert, key=security.tls_client_key)
        peers = tuple(replace(p, tls=client) if p.tls else p for p in delivery.peers)
        return replace(self, delivery=replace(delivery, peers=peers))

    def with_log_key(self) -> Settings:
        """Return settings with a log key: the configured one, else one kept in data_dir/log.key (made once)."""
        if self.log_key:
            return self
        data_dir = self.storage.data_dir
        key_file = data_dir / "log.key"
        data_dir.mkdir(parents=True, exist_ok=True)
        if not key_file.exists():
            tmp = key_file.with_suffix(".tmp")
            tmp.write_text(secrets.token_hex(32), encoding="ascii")
            tmp.chmod(0o600)
            tmp.replace(key_file)
        return replace(self, log_key=key_file.read_text(encoding="ascii").strip().encode())


class _Get:
    """Reads one PACSAI_<name> variable through a parser, or returns the default when it is not set."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self._env = env

    def __call__(self, name: str, parser: Callable[[str], T], default: T) -> T:
        variable = f"PACSAI_{name}"
        if variable not in self._env:
            return default
        try:
            return parser(self._env[variable])
        except ValueError as exc:
            raise ConfigError(f"{variable} is invalid: {exc}") from None


def _node(get: _Get) -> NodeSettings:
    d = NodeSettings()
    return NodeSettings(
        ae_title=get("AE_TITLE", check_ae_title, d.ae_title),
        ae_titles=get("AE_TITLES", parse.titles, ()),
        bind_host=get("BIND_HOST", str, d.bind_host),
        port=get("PORT", parse.port, d.port),
        max_connections_per_address=get(
            "MAX_CONNECTIONS_PER_ADDRESS", parse.positive(int), d.max_connections_per_address
        ),
        max_associations=get("MAX_ASSOCIATIONS", parse.positive(int), d.max_associations),
        max_pending_connections=get("MAX_PENDING_CONNECTIONS", parse.positive(int), d.max_pending_connections),
        max_instance_mb=get("MAX_INSTANCE_MB", parse.positive(int), d.max_instance_mb),
        quiet_period_s=get("QUIET_PERIOD_S", parse.positive(float), d.quiet_period_s),
        release_grace_s=get("RELEASE_GRACE_S", parse.positive(float), d.release_grace_s),
        complete_on_declared_count=get("COMPLETE_ON_DECLARED_COUNT", parse.boolean, d.complete_on_declared_count),
        prompt_wake=get("PROMPT_WAKE", parse.boolean, d.prompt_wake),
        receivers=get("RECEIVERS", parse.positive(int), d.receivers),
        routes_file=get("ROUTES_FILE", parse.existing_file, d.routes_file),
        metrics_host=get("METRICS_HOST", str.strip, d.metrics_host),
        metrics_port=get("METRICS_PORT", parse.port, d.metrics_port),
        web_host=get("WEB_HOST", str.strip, d.web_host),
        web_port=get("WEB_PORT", parse.port, d.web_port),
    )


def _security(get: _Get) -> SecuritySettings:
    callers = get("ALLOWED_CALLERS", parse_callers, _NO_CALLERS)
    return SecuritySettings(
        allowed_callers=tuple(caller.ae_title for caller in callers),
        allow_any_caller=get("ALLOW_ANY_CALLER", parse.boolean, False),
        caller_rules=callers,
        tls_port=get("TLS_PORT", parse.port, SecuritySettings().tls_port),
        tls_cert=get("TLS_CERT", parse.existing_file, None),
        tls_key=get("TLS_KEY", parse.existing_file, None),
        tls_ca=get("TLS_CA", parse.existing_file, None),
        tls_only=get("TLS_ONLY", parse.boolean, False),
        tls_client_cert=get("TLS_CLIENT_CERT", parse.existing_file, None),
        tls_client_key=get("TLS_CLIENT_KEY", parse.existing_file, None),
        audit_file=get("AUDIT_FILE", lambda text: Path(text).expanduser().resolve(), None),
        audit_syslog=get("AUDIT_SYSLOG", parse.syslog, ""),
    )


def _storage(get: _Get) -> StorageSettings:
    d = StorageSettings()
    return StorageSettings(
        data_dir=get("DATA_DIR", lambda text: Path(text).expanduser().resolve(), d.data_dir.resolve()),
        spool_reserve_mb=get("SPOOL_RESERVE_MB", parse.non_negative_int, d.spool_reserve_mb),
        retention_h=get("RETENTION_H", parse.positive(float), d.retention_h),
        database_url=get("DATABASE_URL", parse.database_url, ""),
    )


def _queue(get: _Get) -> QueueSettings:
    d = QueueSettings()
    time_limit_s = get("TASK_TIME_LIMIT_S", parse.positive(float), d.task_time_limit_s)
    return QueueSettings(
        broker_url=get("BROKER_URL", str.strip, ""),
        task_time_limit_s=time_limit_s,
        visibility_timeout_s=get("VISIBILITY_TIMEOUT_S", parse.positive(float), 2 * time_limit_s + 600.0),
        retry_delay_s=get("RETRY_DELAY_S", parse.positive(float), d.retry_delay_s),
        requeue_after_s=get("REQUEUE_AFTER_S", parse.positive(float), d.requeue_after_s),
        dispatch_window=get("DISPATCH_WINDOW", parse.non_negative_int, d.dispatch_window),
        off_peak=get("OFF_PEAK", parse.time_window, None),
    )


def _delivery(get: _Get) -> DeliverySettings:
    d = DeliverySettings()
    return DeliverySettings(
        peers=get("PEERS", parse.peers, ()),
        destination=get("DESTINATION", lambda text: check_ae_title(text.strip()) if text.strip() else "", ""),
        send_max_attempts=get("SEND_MAX_ATTEMPTS", parse.positive(int), d.send_max_attempts),
        send_backoff_s=get("SEND_BACKOFF_S", parse.positive(float), d.send_backoff_s),
        send_backoff_max_s=get("SEND_BACKOFF_MAX_S", parse.positive(float), d.send_backoff_max_s),
        send_alert_after=get("SEND_ALERT_AFTER", parse.positive(int), d.send_alert_after),
        dimse_timeout_s=get("DIMSE_TIMEOUT_S", parse.positive(float), d.dimse_timeout_s),
        verify_timeout_s=get("VERIFY_TIMEOUT_S", parse.positive(float), d.verify_timeout_s),
        verify_retry_s=get("VERIFY_RETRY_S", parse.positive(float), d.verify_retry_s),
        verify_max_attempts=get("VERIFY_MAX_ATTEMPTS", parse.positive(int), d.verify_max_attempts),
        profiles=get("PROFILES_FILE", load_profiles, Profiles()),
        web_peers=_web_peers(get),
    )


def _web_peers(get: _Get) -> tuple[WebPeer, ...]:
    none: tuple[WebPeer, ...] = ()
    peers = get("DICOMWEB_PEERS", parse_web_peers, none)
    credentials = get("DICOMWEB_CREDENTIALS", parse_web_credentials, dict[str, WebAuth]())
    try:
        return with_credentials(peers, credentials, get("DICOMWEB_CA", parse.existing_file, None))
    except ValueError as exc:
        raise ConfigError(f"PACSAI_DICOMWEB_CREDENTIALS is invalid: {exc}") from None


def _worker(get: _Get) -> WorkerSettings:
    d = WorkerSettings()
    return WorkerSettings(
        models_dir=get("MODELS_DIR", parse.existing_dir, d.models_dir),
        device=get("DEVICE", parse.device, d.device),
        concurrency=get("WORKER_CONCURRENCY", parse.positive(int), d.concurrency),
        models=get("WORKER_MODELS", parse.names, ()),
        deidentify_for=get("DEIDENTIFY_FOR", parse.names, ()),
        memory_mb=get("WORKER_MEMORY_MB", parse.non_negative_int, 0) or parse.memory_available_mb(),
    )
