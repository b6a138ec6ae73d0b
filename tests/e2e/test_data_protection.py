"""Issue 9 item 6: the data directory is private (folders 0700, files 0600: database, -wal/-shm, spool, outbox,
queue) and a purged series' description is gone from the database file and its WAL."""

from __future__ import annotations

import stat
from collections.abc import Callable
from pathlib import Path

import pytest

from pacsai.state import State
from tests.checks import reuid_series
from tests.conftest import need
from tests.services import wait_until
from tests.stack import Stack, StoreScpPacs

pytestmark = [pytest.mark.e2e]
CANARY = b"CANARY desc Jq4"  # a Series Description a site filled with patient data


def _modes(data: Path) -> dict[str, list[str]]:
    """Paths under the data dir whose mode is not 0700 (folders) or 0600 (files), by kind."""
    wrong: dict[str, list[str]] = {}
    for path in [data, *data.rglob("*")]:
        mode, folder = stat.S_IMODE(path.lstat().st_mode), path.is_dir()
        if mode != (0o700 if folder else 0o600):
            wrong.setdefault("folders" if folder else "files", []).append(f"{path.relative_to(data)} {mode:o}")
    return wrong


def test_modes_and_a_purged_description(
    ct_series: Path, pacs: StoreScpPacs, stack: Callable[..., Stack], tmp_path: Path
) -> None:
    need("storescu")
    reuid_series(ct_series, tmp_path / "canary", "1.2.826.0.1.3680043.10.1051.778", SeriesDescription=CANARY.decode())
    pacsai = stack(peers=pacs.peer, PACSAI_RETENTION_H="0.0003")  # ~1 s after the job ends
    run = pacsai.start("run")  # node + worker, on-disk queue
    pacsai.send(sorted((tmp_path / "canary").iterdir()), "STORESCU")
    wait_until(lambda: pacsai.jobs() == {"delivered": 1}, 90, "the job to be delivered", 0.5)
    data = pacsai.data
    for needed in ("pacsai.db", "pacsai.db-wal", "pacsai.db-shm", "spool", "outbox", "queue", "audit.log"):
        assert (data / needed).exists(), needed
    assert _modes(data) == {}
    # watched in the log, not through a connection of ours: a reader would keep the purge's checkpoint busy
    wait_until(lambda: "retention: deleted the files of 1" in run.log(), 30, "the series to be purged", 0.5)

    def stored() -> bytes:
        return b"".join(p.read_bytes() for p in data.glob("pacsai.db*"))

    # the purge copies the WAL into the database and truncates it just after it has logged the deletion
    wait_until(lambda: CANARY not in stored(), 10, "the description to leave the database files", 0.1)
    assert "database busy" not in run.log()
    assert run.popen.poll() is None  # still running: the WAL is the live one, not one removed at close
    db = State(data / "pacsai.db")
    assert db.counts()["series"] == {"purged": 1}
    db.close()
    assert not list((data / "spool").rglob("*.dcm")) and not list((data / "outbox").rglob("*.dcm"))
    assert _modes(data) == {}
