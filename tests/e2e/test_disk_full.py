"""S1/S2: a spool on a small tmpfs fills up mid-study; refusals are 0xA700, nothing partial is kept, nothing lost.
A data volume that fills after studies were acknowledged makes their jobs wait, and they finish once space is back."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from pydicom import dcmread

from pacsai.jobs import JobState
from pacsai.state import State
from pacsai.storage import write_atomic
from tests.checks import reuid_series
from tests.conftest import IN_CI
from tests.services import (
    free_port,
    pacsai_env,
    require_binary,
    start_pacsai,
    store_statuses,
    supervised,
    wait_until,
)
from tests.stack import Stack, StoreScpPacs

pytestmark = [pytest.mark.e2e]


@pytest.fixture()
def small_spool(tmp_path: Path) -> Iterator[Path]:
    spool = tmp_path / "data" / "spool"
    spool.mkdir(parents=True)
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(spool)], capture_output=True)
    if mounted.returncode != 0:
        if IN_CI:
            pytest.fail("cannot mount a tmpfs for the spool (needs root)")
        pytest.skip("cannot mount a tmpfs for the spool (needs root)")
    try:
        yield tmp_path / "data"
    finally:
        subprocess.run(["umount", "-l", str(spool)], check=False)


@pytest.mark.catalogue("S1")
def test_a_write_that_hits_a_full_disk_leaves_nothing(small_spool: Path) -> None:
    """S1 at the write itself: ENOSPC in the middle of a write raises, and no partial or temp file remains."""
    target = small_spool / "spool" / "study" / "series" / "x.dcm"
    with pytest.raises(OSError, match="No space left"):
        write_atomic(target, b"\0" * (4 * 1024 * 1024))
    assert not [p for p in (small_spool / "spool").rglob("*") if p.is_file()]


@pytest.mark.catalogue("S1", "S2")
@pytest.mark.parametrize(("reserve_mb", "case"), [(1, "S2 reserve crossed"), (0, "S1 no room left")])
def test_spool_fills_mid_study(reserve_mb: int, case: str, small_spool: Path, tmp_path: Path, ct_series: Path) -> None:
    port = free_port()
    env = pacsai_env(small_spool, port=port, peers="MODALITY@127.0.0.1:104", PACSAI_SPOOL_RESERVE_MB=str(reserve_mb))
    files = sorted(ct_series.iterdir())
    with supervised() as processes:
        processes.append(start_pacsai("node", tmp_path, env))
        statuses = store_statuses(port, files, calling="MODALITY")
        assert len(statuses) == len(files)
        echo = subprocess.run(
            [require_binary("echoscu"), "-aet", "MODALITY", "-aec", "PACSAI", "127.0.0.1", str(port)], timeout=30
        )
        assert echo.returncode == 0  # the node still serves
        accepted = statuses.count(0x0000)
        assert 0 < accepted < len(files), case
        assert set(statuses) == {0x0000, 0xA700}
        assert statuses == sorted(statuses)  # once full, every later one is refused
        on_disk = list((small_spool / "spool").rglob("*.dcm"))
        assert len(on_disk) == accepted
        assert not list((small_spool / "spool").rglob(".*.tmp"))  # no partial file left
        assert State(small_spool / "pacsai.db").counts()["instances"]["received"] == accepted
        assert "spool" in processes[0].log() and "0xA700" not in processes[0].log().split("refused")[0]


@pytest.fixture()
def small_volume(tmp_path: Path) -> Iterator[Path]:
    """The whole data directory on a 48 MB tmpfs made for the test."""
    data = tmp_path / "volume"
    data.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=48m,mode=0700", "tmpfs", str(data)], capture_output=True
    )
    if mounted.returncode != 0:
        if IN_CI:
            pytest.fail("cannot mount a tmpfs for the data directory (needs root)")
        pytest.skip("cannot mount a tmpfs for the data directory (needs root)")
    try:
        yield data
    finally:
        subprocess.run(["umount", "-l", str(data)], check=False)


def _waiting_gauge(metrics_port: int) -> dict[str, float]:
    """pacsai_resource_waiting by resource, from the node's /metrics."""
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    found = re.findall(r'^pacsai_resource_waiting\{resource="(\w+)"\} ([0-9.e+]+)$', text, re.MULTILINE)
    return {resource: float(value) for resource, value in found}


@pytest.mark.slow  # ~50 s on 2 busy cores: two inferences, the wait, the node's 10 s maintenance tick, two more
@pytest.mark.catalogue("S2")
def test_a_full_volume_is_a_wait_and_every_series_gets_its_results(
    small_volume: Path, tmp_path: Path, ct_series: Path, pacs: StoreScpPacs, stack: Callable[..., Stack]
) -> None:
    """Issue 9 item 1: two series acknowledged, then the data volume filled below the 8 MB reserve: the jobs wait
    for the disk (gauge, ALERT), no attempt is spent; once space is freed both deliver SEG and SR, nothing twice."""
    metrics_port = free_port()
    pacsai = stack(
        peers=pacs.peer, data=small_volume, PACSAI_SPOOL_RESERVE_MB="8", PACSAI_METRICS_PORT=str(metrics_port)
    )
    series = []
    for index in range(2):
        reuid_series(ct_series, tmp_path / "series" / str(index), f"1.2.826.0.1.3680043.10.1051.9{index}")
        series.append(sorted((tmp_path / "series" / str(index)).iterdir()))
    run = pacsai.start("run")
    for files in series:
        pacsai.send(files, "STORESCU")  # check=True: every instance acknowledged
    filler = small_volume / "filler"  # leave 4 MB: under the reserve, room for the database
    free = shutil.disk_usage(small_volume).free
    with open(filler, "wb") as handle:
        os.posix_fallocate(handle.fileno(), 0, free - (4 << 20))
    wait_until(lambda: pacsai.jobs() == {"waiting": 2}, 60, "both jobs waiting for the disk", 0.3)
    assert _waiting_gauge(metrics_port) == {"disk": 2.0, "memory": 0.0, "broker": 0.0}
    wait_until(lambda: "ALERT" in run.log() and "no space left" in run.log(), 30, "the ALERT", 0.3)
    filler.unlink()
    wait_until(lambda: pacsai.jobs() == {"delivered": 2}, 60, "both jobs delivered", 0.3)
    assert _waiting_gauge(metrics_port)["disk"] == 0.0
    received = [dcmread(p, stop_before_pixels=True) for p in pacs.inbox.iterdir()]
    assert sorted(ds.Modality for ds in received) == ["SEG", "SEG", "SR", "SR"]
    assert len({ds.SOPInstanceUID for ds in received}) == 4
    state = State(small_volume / "pacsai.db")
    assert all(job.attempts == 1 for job in state.jobs_in(JobState.DELIVERED))  # waiting spent no attempt
    state.close()
