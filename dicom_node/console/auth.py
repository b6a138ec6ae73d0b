"""Console users and sessions: argon2id password hashes, signed session cookies, CSRF tokens, login lockout."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from pathlib import Path

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from itsdangerous import BadSignature, URLSafeTimedSerializer

from pacsai.console_db import ConsoleTables, User

HASHER = PasswordHasher()  # argon2id with the library's current (RFC 9106 low-memory) parameters
SESSION_COOKIE = "pacsai_session"
SESSION_MAX_AGE_S = 8 * 3600
MIN_PASSWORD_LENGTH = 10
# a password the check can spend the same time on when the user does not exist (no user enumeration by timing)
_DUMMY_HASH = HASHER.hash("not a password of anyone")


def hash_password(password: str) -> str:
    if len(password) < MIN_PASSWORD_LENGTH:
        raise ValueError(f"a password needs at least {MIN_PASSWORD_LENGTH} characters")
    return HASHER.hash(password)


def check_password(tables: ConsoleTables, username: str, password: str) -> User | None:
    """The user when the password is theirs; the hash is upgraded when the hasher's parameters changed."""
    user = tables.user(username)
    try:
        HASHER.verify(user.password_hash if user else _DUMMY_HASH, password)
    except (VerificationError, InvalidHashError):
        return None
    if user is not None and HASHER.check_needs_rehash(user.password_hash):
        tables.set_password_hash(username, HASHER.hash(password))
    return user


def session_key(data_dir: Path) -> bytes:
    """The key signing session cookies, kept in data_dir/console.key (made once, readable by its owner only)."""
    path = data_dir / "console.key"
    if not path.exists():
        data_dir.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp")
        temporary.write_text(secrets.token_hex(32), encoding="ascii")
        temporary.chmod(0o600)
        temporary.replace(path)
    return path.read_text(encoding="ascii").strip().encode()


@dataclass(frozen=True, slots=True)
class Session:
    username: str
    token: str  # random per login; the CSRF token is derived from it

    def csrf(self, key: bytes) -> str:
        return hmac.new(key, b"csrf:" + self.token.encode(), hashlib.sha256).hexdigest()


class Sessions:
    """Signed, timed cookies carrying the user name and a random token (no server-side store to lose)."""

    def __init__(self, key: bytes) -> None:
        self.key = key
        self._serializer = URLSafeTimedSerializer(key, salt="pacsai-console-session")

    def issue(self, username: str) -> tuple[str, Session]:
        session = Session(username, secrets.token_urlsafe(24))
        return self._serializer.dumps([session.username, session.token]), session

    def read(self, cookie: str | None) -> Session | None:
        if not cookie:
            return None
        try:
            username, token = self._serializer.loads(cookie, max_age=SESSION_MAX_AGE_S)
        except (BadSignature, ValueError, TypeError):
            return None
        return Session(str(username), str(token))

    def csrf_ok(self, session: Session, token: str) -> bool:
        return hmac.compare_digest(session.csrf(self.key), token)


class LoginLimiter:
    """After `max_failures` failed logins within `window_s` for one user name or one client address, further
    attempts from it are refused for `lockout_s` (checked before the password, so a locked account cannot be probed)."""

    def __init__(self, max_failures: int = 5, window_s: float = 300.0, lockout_s: float = 300.0) -> None:
        self._max, self._window_s, self._lockout_s = max_failures, window_s, lockout_s
        self._failures: dict[str, deque[float]] = defaultdict(deque)
        self._locked_until: dict[str, float] = {}
        self._lock = threading.Lock()

    def locked(self, username: str, address: str, now: float | None = None) -> bool:
        now = time.time() if now is None else now
        with self._lock:
            return any(self._locked_until.get(key, 0.0) > now for key in self._keys(username, address))

    def failed(self, username: str, address: str, now: float | None = None) -> None:
        now = time.time() if now is None else now
        with self._lock:
            for key in self._keys(username, address):
                failures = self._failures[key]
                failures.append(now)
                while failures and failures[0] < now - self._window_s:
                    failures.popleft()
                if len(failures) >= self._max:
                    self._locked_until[key] = now + self._lockout_s
                    failures.clear()

    def succeeded(self, username: str, address: str) -> None:
        with self._lock:
            for key in self._keys(username, address):
                self._failures.pop(key, None)

    @staticmethod
    def _keys(username: str, address: str) -> tuple[str, str]:
        return f"user:{username.lower()}", f"addr:{address}"
