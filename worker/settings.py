"""Settings: one typed object built once from PACSAI_* variables and passed down."""

from __future__ import annotations

import re
import secrets
import urllib.parse
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar

from worker.errors import ConfigError
from worker.peers import Caller, PeerTls, parse_callers
from worker.peers import Peer as Peer  # re-exported: Peer lived here first
from worker.peers import check_ae_title as check_ae_title
from worker.profiles import Profile, Profiles, load_profiles

T = TypeVar("T")
PACKAGE_ROOT = Path(__file__).resolve().parent.parent


def _bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"'{text}' is not a boolean (true/false)")


def _positive(kind: Callable[[str], T]) -> Callable[[str], T]:
    def parse(text: str) -> T:
        value = kind(text)
        if not value > 0:  # type: ignore[operator]
            raise ValueError(f"{text} must be > 0")
        return value

    return parse


def _peers(text: str) -> tuple[Peer, ...]:
    return tuple(Peer.parse(item) for item in text.split(",") if item.strip())


def _titles(text: str) -> tuple[str, ...]:
    return tuple(check_ae_title(item.strip()) for item in text.split(",") if item.strip())


def _syslog(text: str) -> str:
    """'udp://host:port', 'tcp://host:port', 'tls://host:port' or 'host:port' (UDP); empty: no syslog."""
    text = text.strip()
    if not text:
        return ""
    scheme, _, rest = text.rpartition("://")
    match = re.fullmatch(r"([^:\s/]+|\[[0-9a-fA-F:]+\]):(\d{1,5})", rest)
    if scheme not in ("", "udp", "tcp", "tls") or not match or not 0 < int(match.group(2)) < 65536:
        raise ValueError(f"'{text}' is not [udp|tcp|tls://]host:port")
    return f"{scheme or 'udp'}://{rest}"


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything a node or worker process needs; tests pass a plain dict to from_env."""

    data_dir: Path
    ae_title: str = "PACSAI"
    bind_host: str = "0.0.0.0"
    port: int = 11112
    broker_url: str = field(default="", repr=False)   # empty: on-disk queue under data_dir/queue (embedded mode)
    peers: tuple[Peer, ...] = ()              # PACS we may send results to
    allowed_callers: tuple[str, ...] = ()     # empty: the AE titles of `peers`
    allow_any_caller: bool = False
    destination: str = ""                     # AE title results go to; empty: the calling AE if it is a peer
    quiet_period_s: float = 10.0
    release_grace_s: float = 2.0
    routes_file: Path = PACKAGE_ROOT / "dicom_node" / "routes.yaml"
    models_dir: Path = PACKAGE_ROOT / "models"
    device: str = "auto"
    log_level: str = "INFO"
    log_key: bytes = field(default=b"", repr=False)
    send_max_attempts: int = 60
    send_backoff_s: float = 5.0
    send_backoff_max_s: float = 600.0
    send_alert_after: int = 5                # failed delivery attempts before an ALERT log line and metric
    dimse_timeout_s: float = 60.0            # a C-STORE (or C-ECHO) the peer leaves unanswered this long is aborted
    max_connections_per_address: int = 12    # TCP connections one source address may hold (raw sockets count)
    max_associations: int = 16               # concurrent associations; one more gets A-ASSOCIATE-RJ (2, 3, 2)
    metrics_host: str = "127.0.0.1"
    metrics_port: int = 0                    # 0: no metrics endpoint
    task_time_limit_s: float = 3600.0
    spool_reserve_mb: int = 1024             # refuse instances (0xA700) when free disk would drop under this
    max_instance_mb: int = 2048              # C15: a larger instance is refused (0xC001); received by streaming to disk
    worker_concurrency: int = 1
    worker_models: tuple[str, ...] = ()      # models this worker serves (one queue each); empty: all installed
    deidentify_for: tuple[str, ...] = ()     # models whose input is a de-identified copy (A10, docs/security.md)
    worker_memory_mb: int = 0                # refuse series estimated to need more; 0: 80 % of MemAvailable
    database_url: str = field(default="", repr=False)   # empty: SQLite file in data_dir; else postgresql://…
    retry_delay_s: float = 10.0              # a failed job is tried again after this, doubled each time
    visibility_timeout_s: float = 0.0        # Redis redelivers an unacknowledged job after this; 0: 2 x limit + 600
    requeue_after_s: float = 120.0           # a queued job the broker no longer holds is enqueued again after this
    retention_h: float = 24.0                # spooled inputs and results are deleted this long after their jobs end
    # security (docs/security.md)
    ae_titles: tuple[str, ...] = ()          # further AE titles we answer to as called AE
    caller_rules: tuple[Caller, ...] = ()    # PACSAI_ALLOWED_CALLERS with sources; empty: each peer from its host
    tls_port: int = 2762                     # DICOM over TLS (PS3.15 B.1 "dicom-tls"), when tls_cert is set
    tls_cert: Path | None = None             # our certificate (chain) and key, PEM
    tls_key: Path | None = None
    tls_ca: Path | None = None               # CAs we trust; set: callers must present a certificate (mutual TLS)
    tls_only: bool = False                   # no plain DICOM port
    tls_client_cert: Path | None = None      # our client certificate for `+tls` peers that require one
    tls_client_key: Path | None = None
    audit_file: Path | None = None           # None: data_dir/audit.log
    audit_syslog: str = ""                   # also send audit messages to "udp|tcp|tls://host:port" (RFC 5424)
    profiles: Profiles = field(default_factory=Profiles)   # PACSAI_PROFILES_FILE: what each peer gets

    @property
    def spool_dir(self) -> Path:
        return self.data_dir / "spool"

    @property
    def outbox_dir(self) -> Path:
        return self.data_dir / "outbox"

    @property
    def database_path(self) -> Path:
        return self.data_dir / "pacsai.db"

    @property
    def retention_s(self) -> float:
        return self.retention_h * 3600.0

    @property
    def database(self) -> str | Path:
        """What State opens: the PostgreSQL URL when configured, else the SQLite file."""
        return self.database_url or self.database_path

    @property
    def queue_dir(self) -> Path:
        return self.data_dir / "queue"

    @property
    def callers(self) -> tuple[str, ...]:
        return self.allowed_callers or tuple(peer.ae_title for peer in self.peers)

    @property
    def caller_policy(self) -> tuple[Caller, ...]:
        """Who may call us from where: PACSAI_ALLOWED_CALLERS, else every peer from its own host."""
        return self.caller_rules or tuple(Caller.of_peer(peer) for peer in self.peers)

    @property
    def our_ae_titles(self) -> tuple[str, ...]:
        return (self.ae_title, *(title for title in self.ae_titles if title != self.ae_title))

    @property
    def audit_path(self) -> Path:
        return self.audit_file or self.data_dir / "audit.log"

    def profile_for(self, ae_title: str) -> Profile:
        """The destination profile of a peer (worker/profiles.py); peers without one get the default."""
        return self.profiles.for_peer(ae_title)

    def peer(self, ae_title: str) -> Peer | None:
        return next((peer for peer in self.peers if peer.ae_title == ae_title), None)

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Build settings from PACSAI_* variables; a wrong value raises ConfigError naming the variable."""
        env = _with_secret_files(env)

        def get(name: str, parse: Callable[[str], T], default: T) -> T:
            variable = f"PACSAI_{name}"
            if variable not in env:
                return default
            try:
                return parse(env[variable])
            except ValueError as exc:
                raise ConfigError(f"{variable} is invalid: {exc}") from None

        data_dir = get("DATA_DIR", lambda text: Path(text).expanduser().resolve(), Path("pacsai-data").resolve())
        task_time_limit_s = get("TASK_TIME_LIMIT_S", _positive(float), _DEFAULT["task_time_limit_s"])
        return cls(
            data_dir=data_dir,
            ae_title=get("AE_TITLE", check_ae_title, _DEFAULT["ae_title"]),
            bind_host=get("BIND_HOST", str, _DEFAULT["bind_host"]),
            port=get("PORT", _port, _DEFAULT["port"]),
            broker_url=get("BROKER_URL", str.strip, ""),
            peers=get("PEERS", _peers, ()),
            allowed_callers=tuple(caller.ae_title for caller in get("ALLOWED_CALLERS", parse_callers, _NO_CALLERS)),
            allow_any_caller=get("ALLOW_ANY_CALLER", _bool, False),
            destination=get("DESTINATION", lambda text: check_ae_title(text.strip()) if text.strip() else "", ""),
            quiet_period_s=get("QUIET_PERIOD_S", _positive(float), _DEFAULT["quiet_period_s"]),
            release_grace_s=get("RELEASE_GRACE_S", _positive(float), _DEFAULT["release_grace_s"]),
            routes_file=get("ROUTES_FILE", _existing_file, _DEFAULT["routes_file"]),
            models_dir=get("MODELS_DIR", _existing_dir, _DEFAULT["models_dir"]),
            device=get("DEVICE", _device, _DEFAULT["device"]),
            log_level=get("LOG_LEVEL", _log_level, _DEFAULT["log_level"]),
            log_key=get("LOG_KEY", str.encode, b""),
            send_max_attempts=get("SEND_MAX_ATTEMPTS", _positive(int), _DEFAULT["send_max_attempts"]),
            send_backoff_s=get("SEND_BACKOFF_S", _positive(float), _DEFAULT["send_backoff_s"]),
            send_backoff_max_s=get("SEND_BACKOFF_MAX_S", _positive(float), _DEFAULT["send_backoff_max_s"]),
            send_alert_after=get("SEND_ALERT_AFTER", _positive(int), _DEFAULT["send_alert_after"]),
            dimse_timeout_s=get("DIMSE_TIMEOUT_S", _positive(float), _DEFAULT["dimse_timeout_s"]),
            max_connections_per_address=get("MAX_CONNECTIONS_PER_ADDRESS", _positive(int),
                                            _DEFAULT["max_connections_per_address"]),
            max_associations=get("MAX_ASSOCIATIONS", _positive(int), _DEFAULT["max_associations"]),
            metrics_host=get("METRICS_HOST", str.strip, _DEFAULT["metrics_host"]),
            metrics_port=get("METRICS_PORT", _port, _DEFAULT["metrics_port"]),
            task_time_limit_s=task_time_limit_s,
            spool_reserve_mb=get("SPOOL_RESERVE_MB", _non_negative_int, _DEFAULT["spool_reserve_mb"]),
            max_instance_mb=get("MAX_INSTANCE_MB", _positive(int), _DEFAULT["max_instance_mb"]),
            worker_concurrency=get("WORKER_CONCURRENCY", _positive(int), _DEFAULT["worker_concurrency"]),
            worker_models=get("WORKER_MODELS", _names, ()),
            deidentify_for=get("DEIDENTIFY_FOR", _names, ()),
            worker_memory_mb=get("WORKER_MEMORY_MB", _non_negative_int, 0) or _memory_available_mb(),
            database_url=get("DATABASE_URL", _database_url, ""),
            retry_delay_s=get("RETRY_DELAY_S", _positive(float), _DEFAULT["retry_delay_s"]),
            visibility_timeout_s=get("VISIBILITY_TIMEOUT_S", _positive(float), 2 * task_time_limit_s + 600.0),
            requeue_after_s=get("REQUEUE_AFTER_S", _positive(float), _DEFAULT["requeue_after_s"]),
            retention_h=get("RETENTION_H", _positive(float), _DEFAULT["retention_h"]),
            ae_titles=get("AE_TITLES", _titles, ()),
            caller_rules=get("ALLOWED_CALLERS", parse_callers, _NO_CALLERS),
            tls_port=get("TLS_PORT", _port, _DEFAULT["tls_port"]),
            tls_cert=get("TLS_CERT", _existing_file, None),
            tls_key=get("TLS_KEY", _existing_file, None),
            tls_ca=get("TLS_CA", _existing_file, None),
            tls_only=get("TLS_ONLY", _bool, False),
            tls_client_cert=get("TLS_CLIENT_CERT", _existing_file, None),
            tls_client_key=get("TLS_CLIENT_KEY", _existing_file, None),
            audit_file=get("AUDIT_FILE", lambda text: Path(text).expanduser().resolve(), None),
            audit_syslog=get("AUDIT_SYSLOG", _syslog, ""),
            profiles=get("PROFILES_FILE", load_profiles, Profiles()),
        )._checked()

    def _checked(self) -> Settings:
        """Checks across variables; TLS peers get the client side of our TLS settings."""
        pairs = (("TLS_CERT", self.tls_cert, "TLS_KEY", self.tls_key),
                 ("TLS_CLIENT_CERT", self.tls_client_cert, "TLS_CLIENT_KEY", self.tls_client_key))
        for name, value, other, other_value in pairs:
            if (value is None) != (other_value is None):
                missing, given = (other, name) if value is not None else (name, other)
                raise ConfigError(f"PACSAI_{missing} is not set (PACSAI_{given} is; both or neither)")
        if self.tls_only and self.tls_cert is None:
            raise ConfigError("PACSAI_TLS_ONLY=true needs PACSAI_TLS_CERT and PACSAI_TLS_KEY")
        if self.tls_cert is not None and self.tls_port == self.port and not self.tls_only:
            raise ConfigError(f"PACSAI_TLS_PORT {self.tls_port} is PACSAI_PORT too; give TLS its own port")
        if self.broker_url and self.send_backoff_max_s >= self.visibility_timeout_s:
            # a countdown the worker holds past the visibility timeout makes Redis deliver the message again
            raise ConfigError(f"PACSAI_SEND_BACKOFF_MAX_S ({self.send_backoff_max_s:g}) must be below "
                              f"PACSAI_VISIBILITY_TIMEOUT_S ({self.visibility_timeout_s:g})")
        strangers = sorted({title for title, _ in self.profiles.peers} - {peer.ae_title for peer in self.peers})
        if strangers:
            raise ConfigError(f"PACSAI_PROFILES_FILE has profiles for {strangers}, which PACSAI_PEERS does not name")
        client = PeerTls(ca=self.tls_ca, cert=self.tls_client_cert, key=self.tls_client_key)
        return replace(self, peers=tuple(replace(p, tls=client) if p.tls else p for p in self.peers))

    def with_log_key(self) -> Settings:
        """Return settings with a log key: the configured one, else one kept in data_dir/log.key (made once)."""
        if self.log_key:
            return self
        key_file = self.data_dir / "log.key"
        self.data_dir.mkdir(parents=True, exist_ok=True)
        if not key_file.exists():
            tmp = key_file.with_suffix(".tmp")
            tmp.write_text(secrets.token_hex(32), encoding="ascii")
            tmp.chmod(0o600)
            tmp.replace(key_file)
        return replace(self, log_key=key_file.read_text(encoding="ascii").strip().encode())


_DEFAULT: dict[str, Any] = {name: f.default for name, f in Settings.__dataclass_fields__.items()}
_NO_CALLERS: tuple[Caller, ...] = ()
_SECRETS = ("BROKER_URL", "BROKER_PASSWORD", "DATABASE_URL", "LOG_KEY")


def _with_secret_files(env: Mapping[str, str]) -> dict[str, str]:
    """PACSAI_<SECRET>_FILE names a file holding the value (Docker/Kubernetes secrets); a password joins the URL."""
    merged = dict(env)
    for name in _SECRETS:
        variable, file_variable = f"PACSAI_{name}", f"PACSAI_{name}_FILE"
        if file_variable not in env:
            continue
        if variable in env:
            raise ConfigError(f"set {variable} or {file_variable}, not both")
        try:
            merged[variable] = Path(env[file_variable]).read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{file_variable} cannot be read ({type(exc).__name__})") from None
    password = merged.pop("PACSAI_BROKER_PASSWORD", None)
    if password is not None:
        if not merged.get("PACSAI_BROKER_URL", "").strip():
            raise ConfigError("PACSAI_BROKER_PASSWORD is set but PACSAI_BROKER_URL is not")
        parts = urllib.parse.urlsplit(merged["PACSAI_BROKER_URL"].strip())
        user = urllib.parse.quote(parts.username or "", safe="")
        host = parts.netloc.rpartition("@")[2]
        netloc = f"{user}:{urllib.parse.quote(password, safe='')}@{host}"
        merged["PACSAI_BROKER_URL"] = urllib.parse.urlunsplit(parts._replace(netloc=netloc))
    return merged



def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(f"{value} must be >= 0")
    return value


def _names(text: str) -> tuple[str, ...]:
    names = tuple(item.strip() for item in text.split(",") if item.strip())
    for name in names:
        if not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", name):
            raise ValueError(f"'{name}' is not a model name")
    return names


def _memory_available_mb() -> int:
    """80 % of MemAvailable (Linux), the default memory budget of one worker process; 0 when unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(int(line.split()[1]) * 0.8) >> 10
    except OSError:
        pass
    return 0


def _database_url(text: str) -> str:
    url = text.strip()
    if url and not url.startswith(("postgresql://", "postgres://")):
        raise ValueError("expected postgresql://user[:password]@host[:port]/database (or empty for SQLite)")
    return url


def _port(text: str) -> int:
    port = int(text)
    if not 0 <= port < 65536:
        raise ValueError(f"{port} is not a TCP port")
    return port


def _existing_file(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.is_file():
        raise ValueError(f"{path} is not a file")
    return path


def _existing_dir(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.is_dir():
        raise ValueError(f"{path} is not a directory")
    return path


def _device(text: str) -> str:
    if text not in ("auto", "cpu") and not re.fullmatch(r"cuda(:\d+)?", text):
        raise ValueError(f"'{text}' is not auto, cpu or cuda[:N]")
    return text


def _log_level(text: str) -> str:
    level = text.strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError(f"'{text}' is not DEBUG, INFO, WARNING or ERROR")
    return level
