"""S1/S2: a spool on a small tmpfs fills up mid-study; refusals are 0xA700, nothing partial is kept, nothing lost."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE

from dicom_node.spool import write_atomic
from tests.conftest import IN_CI
from tests.services import free_port, pacsai_env, start_pacsai, supervised
from worker.state import State

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
def test_spool_fills_mid_study(reserve_mb: int, case: str, small_spool: Path, tmp_path: Path,
                               ct_series: Path) -> None:
    port = free_port()
    env = pacsai_env(small_spool, port=port, peers="MODALITY@127.0.0.1:104",
                     PACSAI_SPOOL_RESERVE_MB=str(reserve_mb))
    files = sorted(ct_series.iterdir())
    with supervised() as processes:
        processes.append(start_pacsai("node", tmp_path, env))
        ae = AE(ae_title="MODALITY")
        ae.dimse_timeout = 120
        ae.add_requested_context("1.2.840.10008.5.1.4.1.1.2", dcmread(files[0]).file_meta.TransferSyntaxUID)
        ae.add_requested_context("1.2.840.10008.1.1")
        assoc = ae.associate("127.0.0.1", port, ae_title="PACSAI")
        statuses = [int(assoc.send_c_store(dcmread(path)).Status) for path in files]
        assert int(assoc.send_c_echo().Status) == 0x0000            # the node still serves
        assoc.release()
        accepted = statuses.count(0x0000)
        assert 0 < accepted < len(files), case
        assert set(statuses) == {0x0000, 0xA700}
        assert statuses == sorted(statuses)                          # once full, every later one is refused
        on_disk = list((small_spool / "spool").rglob("*.dcm"))
        assert len(on_disk) == accepted
        assert not list((small_spool / "spool").rglob(".*.tmp"))     # no partial file left
        assert State(small_spool / "pacsai.db").counts()["instances"]["received"] == accepted
        assert "spool" in processes[0].log() and "0xA700" not in processes[0].log().split("refused")[0]
