"""Parsers of PACSAI_* values: each turns text into a typed value or raises ValueError saying what is wrong."""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TypeVar

from pacsai.errors import ConfigError
from pacsai.peers import Peer, check_ae_title

T = TypeVar("T")


def boolean(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"'{text}' is not a boolean (true/false)")


def positive(kind: Callable[[str], T]) -> Callable[[str], T]:
    def parse(text: str) -> T:
        value = kind(text)
        if not value > 0:  # type: ignore[operator]
            raise ValueError(f"{text} must be > 0")
        return value

    return parse


def peers(text: str) -> tuple[Peer, ...]:
    return tuple(Peer.parse(item) for item in text.split(",") if item.strip())


def titles(text: str) -> tuple[str, ...]:
    return tuple(check_ae_title(item.strip()) for item in text.split(",") if item.strip())


def syslog(text: str) -> str:
    """'udp://host:port', 'tcp://host:port', 'tls://host:port' or 'host:port' (UDP); empty: no syslog."""
    text = text.strip()
    if not text:
        return ""
    scheme, _, rest = text.rpartition("://")
    match = re.fullmatch(r"([^:\s/]+|\[[0-9a-fA-F:]+\]):(\d{1,5})", rest)
    if scheme not in ("", "udp", "tcp", "tls") or not match or not 0 < int(match.group(2)) < 65536:
        raise ValueError(f"'{text}' is not [udp|tcp|tls://]host:port")
    return f"{scheme or 'udp'}://{rest}"


SECRETS = ("BROKER_URL", "BROKER_PASSWORD", "DATABASE_URL", "LOG_KEY", "DICOMWEB_CREDENTIALS")


def with_secret_files(env: Mapping[str, str]) -> dict[str, str]:
    """PACSAI_<SECRET>_FILE names a file holding the value (Docker/Kubernetes secrets); a password joins the URL."""
    merged = dict(env)
    for name in SECRETS:
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


def non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise ValueError(f"{value} must be >= 0")
    return value


def names(text: str) -> tuple[str, ...]:
    names = tuple(item.strip() for item in text.split(",") if item.strip())
    for name in names:
        if not re.fullmatch(r"[a-z0-9][a-z0-9._-]*", name):
            raise ValueError(f"'{name}' is not a model name")
    return names


def memory_available_mb() -> int:
    """80 % of MemAvailable (Linux), the default memory budget of one worker process; 0 when unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(int(line.split()[1]) * 0.8) >> 10
    except OSError:
        pass
    return 0


def database_url(text: str) -> str:
    url = text.strip()
    if url and not url.startswith(("postgresql://", "postgres://")):
        raise ValueError("expected postgresql://user[:password]@host[:port]/database (or empty for SQLite)")
    return url


def port(text: str) -> int:
    port = int(text)
    if not 0 <= port < 65536:
        raise ValueError(f"{port} is not a TCP port")
    return port


def existing_file(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.is_file():
        raise ValueError(f"{path} is not a file")
    return path


def existing_dir(text: str) -> Path:
    path = Path(text).expanduser()
    if not path.is_dir():
        raise ValueError(f"{path} is not a directory")
    return path


def device(text: str) -> str:
    if text not in ("auto", "cpu") and not re.fullmatch(r"cuda(:\d+)?", text):
        raise ValueError(f"'{text}' is not auto, cpu or cuda[:N]")
    return text


def log_level(text: str) -> str:
    level = text.strip().upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        raise ValueError(f"'{text}' is not DEBUG, INFO, WARNING or ERROR")
    return level


def time_window(text: str) -> tuple[int, int]:
    """'HH:MM-HH:MM' (local time, may wrap midnight) as minutes after midnight."""
    match = re.fullmatch(r"\s*(\d{1,2}):(\d{2})\s*-\s*(\d{1,2}):(\d{2})\s*", text)
    if not match:
        raise ValueError(f"'{text}' is not HH:MM-HH:MM")
    h1, m1, h2, m2 = (int(g) for g in match.groups())
    if h1 > 23 or h2 > 23 or m1 > 59 or m2 > 59 or (h1, m1) == (h2, m2):
        raise ValueError(f"'{text}' is not a window of two different times of day")
    return h1 * 60 + m1, h2 * 60 + m2
