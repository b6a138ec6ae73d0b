"""Issue 9 item 8: two jobs on one series get de-identified copies that a remote worker cannot link."""

from __future__ import annotations

from pathlib import Path

from pydicom import dcmread

from dicom_node import deidentify
from pacsai.jobs import SeriesJob, job_id_for
from pacsai.settings import Settings
from pacsai.storage import DEID_DIR, Spool


def test_two_jobs_on_one_series_share_nothing_a_remote_worker_sees(tmp_path: Path, ct_series: Path) -> None:
    """Folders, file names, manifests and queue messages of the two copies carry per-job ids only: neither the
    node's series or study key nor anything common to both; the UIDs inside differ too."""
    settings = Settings.from_env({"PACSAI_DATA_DIR": str(tmp_path / "data")})
    spool = Spool(settings.storage.spool_dir, b"k", reserve_bytes=0)
    stored = []
    for path in sorted(ct_series.iterdir())[:3]:
        ds = dcmread(path, stop_before_pixels=True)
        stored.append(spool.put(ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.SOPInstanceUID, path.read_bytes()))
    study_key, series_key = stored[0].study_key, stored[0].series_key
    seen: list[tuple[set[str], set[str]]] = []  # per job: (names in paths and the message, UIDs in the copy)
    for model in ("ct-organs-tiny", "ct-other"):
        job_id = job_id_for(series_key, model, [s.sop_key for s in stored])
        manifest = deidentify.write_copy(
            settings, spool, study_key, series_key, job_id, model, [s.path for s in stored]
        )
        job = SeriesJob(job_id, study_key, series_key, model, manifest, "PACS")
        copies = spool.read_manifest(manifest)
        remote = [p.relative_to(spool.root / DEID_DIR) for p in [*copies, spool.resolve(manifest)]]
        names = {part for path in remote for part in path.parts} | set(job.to_message().values())
        assert not any(key in name for name in names for key in (series_key, study_key)), names
        assert job.to_message()["series_key"] == job.to_message()["study_key"] == job_id
        uids = {str(dcmread(p).get(k)) for p in copies for k in ("StudyInstanceUID", "SeriesInstanceUID")}
        seen.append(({n for n in names if len(n) > 12}, uids))  # ids, not short names like 00000.dcm or "PACS"
    (names_a, uids_a), (names_b, uids_b) = seen
    assert names_a.isdisjoint(names_b) and uids_a.isdisjoint(uids_b)
    assert sorted(p.name for p in (spool.root / DEID_DIR).iterdir()) == sorted(
        job_id_for(series_key, m, [s.sop_key for s in stored]) for m in ("ct-organs-tiny", "ct-other")
    )
