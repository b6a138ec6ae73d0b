"""Tables of the operator console and of what the processes report about themselves: users, workers, peer_status.

They sit beside the system of record (pacsai.state) on its connection; the node writes peer_status after each
C-ECHO round, every worker process its heartbeat row, and `pacsai users` the console's local users.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from pacsai.db import Database

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS users (username TEXT PRIMARY KEY, password_hash TEXT NOT NULL, role TEXT NOT NULL,"
    " phi INTEGER NOT NULL DEFAULT 0, created_at DOUBLE PRECISION NOT NULL)",
    "CREATE TABLE IF NOT EXISTS workers (worker TEXT PRIMARY KEY, host TEXT NOT NULL, pid INTEGER NOT NULL,"
    " models TEXT NOT NULL, device TEXT NOT NULL, gpu_memory_bytes BIGINT NOT NULL DEFAULT 0,"
    " started_at DOUBLE PRECISION NOT NULL, last_seen DOUBLE PRECISION NOT NULL)",
    "CREATE TABLE IF NOT EXISTS peer_status (ae_title TEXT PRIMARY KEY, address TEXT NOT NULL,"
    " reachable INTEGER NOT NULL, detail TEXT NOT NULL, checked_at DOUBLE PRECISION NOT NULL)",
)
ROLES = ("sender", "viewer", "operator", "admin")  # sender: may only send studies by STOW-RS, sees no page
ONLINE_WITHIN_S = 30.0  # a worker whose heartbeat (every ~10 s) is older than this is counted offline


@dataclass(frozen=True, slots=True)
class User:
    username: str
    password_hash: str  # argon2id, never the password
    role: str  # one of ROLES
    phi: bool  # may see patient identifiers (admins always may)

    @property
    def sees_phi(self) -> bool:
        return self.phi or self.role == "admin"

    def at_least(self, role: str) -> bool:
        return ROLES.index(self.role) >= ROLES.index(role)

    @property
    def may_send(self) -> bool:
        """May send studies by STOW-RS: a sender, an operator or an admin (a viewer only looks)."""
        return self.role == "sender" or self.at_least("operator")


@dataclass(frozen=True, slots=True)
class WorkerBeat:
    worker: str  # host:pid
    host: str
    pid: int
    models: tuple[str, ...]  # kept warm (loaded) by this process
    device: str
    gpu_memory_bytes: int
    started_at: float
    last_seen: float


@dataclass(frozen=True, slots=True)
class PeerStatus:
    ae_title: str
    address: str
    reachable: bool
    detail: str
    checked_at: float


def _beat(r: tuple[object, ...]) -> WorkerBeat:
    models = tuple(filter(None, str(r[3]).split(",")))
    return WorkerBeat(
        str(r[0]), str(r[1]), int(str(r[2])), models, str(r[4]), int(str(r[5])), float(str(r[6])), float(str(r[7]))
    )


class ConsoleTables:
    """Operations on the console's tables, over an open database (pacsai.state.State or any pacsai.db.Database)."""

    def __init__(self, db: Database) -> None:
        self._db = db
        with db._tx() as conn:
            for statement in _SCHEMA:
                conn.execute(statement)

    # users
    def add_user(self, username: str, password_hash: str, role: str, *, phi: bool) -> None:
        if role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}")
        with self._db._tx() as conn:
            conn.execute(
                "INSERT INTO users (username, password_hash, role, phi, created_at) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT(username) DO UPDATE SET password_hash=excluded.password_hash, role=excluded.role,"
                " phi=excluded.phi",
                (username, password_hash, role, int(phi), time.time()),
            )

    def remove_user(self, username: str) -> bool:
        with self._db._tx() as conn:
            return bool(conn.execute("DELETE FROM users WHERE username=?", (username,)).rowcount)

    def user(self, username: str) -> User | None:
        rows = self._db._query("SELECT username, password_hash, role, phi FROM users WHERE username=?", (username,))
        return next((User(str(r[0]), str(r[1]), str(r[2]), bool(r[3])) for r in rows), None)

    def users(self) -> list[User]:
        rows = self._db._query("SELECT username, password_hash, role, phi FROM users ORDER BY username")
        return [User(str(r[0]), str(r[1]), str(r[2]), bool(r[3])) for r in rows]

    def set_password_hash(self, username: str, password_hash: str) -> None:
        with self._db._tx() as conn:
            conn.execute("UPDATE users SET password_hash=? WHERE username=?", (password_hash, username))

    # workers
    def beat(self, beat: WorkerBeat) -> None:
        """Insert or refresh one worker process's heartbeat row."""
        with self._db._tx() as conn:
            conn.execute(
                "INSERT INTO workers (worker, host, pid, models, device, gpu_memory_bytes, started_at, last_seen)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT(worker) DO UPDATE SET models=excluded.models,"
                " device=excluded.device, gpu_memory_bytes=excluded.gpu_memory_bytes, last_seen=excluded.last_seen",
                (beat.worker, beat.host, beat.pid, ",".join(beat.models), beat.device)
                + (beat.gpu_memory_bytes, beat.started_at, beat.last_seen),
            )

    def workers(self, *, seen_after: float = 0.0) -> list[WorkerBeat]:
        rows = self._db._query(
            "SELECT worker, host, pid, models, device, gpu_memory_bytes, started_at, last_seen FROM workers"
            " WHERE last_seen > ? ORDER BY worker",
            (seen_after,),
        )
        return [_beat(r) for r in rows]

    def workers_online(self, now: float) -> list[WorkerBeat]:
        return self.workers(seen_after=now - ONLINE_WITHIN_S)

    # peers
    def record_peer(self, status: PeerStatus) -> None:
        with self._db._tx() as conn:
            conn.execute(
                "INSERT INTO peer_status (ae_title, address, reachable, detail, checked_at) VALUES (?, ?, ?, ?, ?)"
                " ON CONFLICT(ae_title) DO UPDATE SET address=excluded.address, reachable=excluded.reachable,"
                " detail=excluded.detail, checked_at=excluded.checked_at",
                (status.ae_title, status.address, int(status.reachable), status.detail, status.checked_at),
            )

    def peers(self) -> list[PeerStatus]:
        rows = self._db._query("SELECT ae_title, address, reachable, detail, checked_at FROM peer_status ORDER BY 1")
        return [PeerStatus(str(r[0]), str(r[1]), bool(r[2]), str(r[3]), float(r[4])) for r in rows]
