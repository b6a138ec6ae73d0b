"""PACS → pacsai → PACS with real processes: Orthanc auto-routing, Redis or the on-disk queue, node and worker."""

from __future__ import annotations

import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from dicom_node.read_audit import read_entries
from models.cxr_pneumonia.train import DEFAULT_DATA, load_split
from pacsai.jobs import JobState
from pacsai.state import State
from tests.checks import check_seg_and_sr, dciodvfy_errors, find_leaks, make_canary_series
from tests.conftest import need
from tests.integration.test_viewers import pediatric_cr
from tests.model_domains import content_items, finding_free
from tests.services import (
    Orthanc,
    Process,
    files_arrived,
    free_port,
    redis_dump,
    send_folder,
    start_orthanc,
    start_storescp,
    status_counts,
    wait_until,
)
from tests.stack import Stack

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def routed_by_orthanc(
    tmp_path: Path, stack: Callable[..., Stack], broker_url: str = ""
) -> tuple[Orthanc, Stack, Process]:
    """An Orthanc that auto-routes what it receives to a pacsai node and worker, which send their results back to it.
    Returns Orthanc, the stack and its node."""
    port = free_port()
    orthanc = start_orthanc(tmp_path / "orthanc", modalities={"pacsai": ("PACSAI", "127.0.0.1", port)})
    pacsai = stack(peers=f"ORTHANC@127.0.0.1:{orthanc.dicom_port}", broker_url=broker_url, port=port)
    pacsai.adopt(orthanc.process)
    node = pacsai.start("node")
    pacsai.start("worker")
    return orthanc, pacsai, node


@pytest.mark.parametrize("queue", ["redis", "disk"])
def test_orthanc_study_comes_back_as_seg_and_sr(
    queue: str, tmp_path: Path, ct_series: Path, request: pytest.FixtureRequest, stack: Callable[..., Stack]
) -> None:
    """Upload the CT to Orthanc; its Lua auto-routing sends it to pacsai; SEG + SR appear in the same study."""
    need("Orthanc"), need("dciodvfy")
    broker = request.getfixturevalue("redis_url") if queue == "redis" else ""
    orthanc, _, node = routed_by_orthanc(tmp_path, stack, broker)
    study = {orthanc.upload(path)["ParentStudy"] for path in sorted(ct_series.iterdir())}
    assert len(study) == 1
    study_id = study.pop()
    series = orthanc.wait_for_modalities(study_id, {"SEG", "SR"}, timeout_s=300)
    by_modality: dict[str, Any] = {}
    for item in series:
        by_modality.setdefault(item["MainDicomTags"]["Modality"], []).append(item)
    assert sorted(by_modality) == ["CT", "SEG", "SR"]
    assert len(by_modality["SEG"]) == len(by_modality["SR"]) == 1
    files = {}
    for modality in ("SEG", "SR"):
        (instance,) = by_modality[modality][0]["Instances"]
        files[modality] = tmp_path / f"{modality}.dcm"
        files[modality].write_bytes(orthanc.request("GET", f"/instances/{instance}/file"))
    volumes = check_seg_and_sr(files["SEG"], files["SR"], ct_series)
    assert len(volumes) >= 2, "liver and spleen are in this series"
    time.sleep(5)  # > StableAge: the results' own series are stable now and must not be routed back
    assert len(orthanc.series_of_study(study_id)) == 3
    assert node.log().count("series complete") == 1


@pytest.mark.catalogue("A7")
def test_storescu_to_node_to_storescp(
    tmp_path: Path, ct_series: Path, redis_url: str, database: str, stack: Callable[..., Stack]
) -> None:
    """dcmtk storescu sends straight to the node; results arrive at a dcmtk storescp acting as the PACS.

    The series carries canary patient values and UIDs: none may appear in logs, Redis or spool file names.
    Runs with the SQLite and with the PostgreSQL system of record.
    """
    need("storescu"), need("storescp"), need("dciodvfy")
    canaries = make_canary_series(ct_series, tmp_path / "canary-series")
    source = tmp_path / "canary-series"
    storescp, pacs_port, received = start_storescp(tmp_path / "pacs", ae_title="STORESCU")
    extra = {"PACSAI_DATABASE_URL": database} if database.startswith("postgresql://") else {}
    pacsai = stack(
        peers=f"STORESCU@127.0.0.1:{pacs_port}",
        broker_url=redis_url,
        PACSAI_METRICS_PORT=str(metrics_port := free_port()),
        **extra,
    )
    pacsai.adopt(storescp)
    port = pacsai.port
    pacsai.start("node")
    pacsai.start("worker")
    send_folder(port, source)
    files = files_arrived(received, 2)  # SEG and SR
    by_modality = {dcmread(p, stop_before_pixels=True).Modality: p for p in files}
    assert sorted(by_modality) == ["SEG", "SR"]
    check_seg_and_sr(by_modality["SEG"], by_modality["SR"], source)
    assert dcmread(by_modality["SEG"]).PatientName == dcmread(next(source.iterdir())).PatientName
    texts = {proc.name: proc.log() for proc in pacsai.processes if proc.name.startswith("pacsai")}
    texts["redis"] = redis_dump(redis_url)
    with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
        texts["metrics"] = response.read().decode()
    assert 'pacsai_instances_received_total{outcome="success"} 20.0' in texts["metrics"]
    assert 'pacsai_jobs{state="delivered"} 1.0' in texts["metrics"]
    assert find_leaks(canaries, texts, tmp_path / "data") == []


@pytest.mark.catalogue("E1")
def test_results_wait_for_a_pacs_that_is_down(tmp_path: Path, ct_series: Path, stack: Callable[..., Stack]) -> None:
    """The PACS is down when results are ready: delivery retries with back-off and succeeds once it is up.

    Runs `pacsai run` (node + worker on one box) in embedded mode: no broker URL, the on-disk queue.
    """
    need("storescu"), need("storescp")
    pacs_port = free_port()
    pacsai = stack(peers=f"STORESCU@127.0.0.1:{pacs_port}")  # on-disk queue
    port, env = pacsai.port, pacsai.env
    run = pacsai.start("run")
    send_folder(port, ct_series)
    wait_until(lambda: "retrying in" in run.log(), 300, "a failed delivery attempt", 1.0)
    storescp, _, received = start_storescp(tmp_path / "pacs", ae_title="STORESCU", port=pacs_port)
    pacsai.adopt(storescp)

    counts = wait_until(lambda: (c := status_counts(env))["jobs"] == {"delivered": 1} and c, 120, "delivered", 1.0)
    assert counts["deliveries"] == {"success": 2}
    assert sorted(dcmread(p).Modality for p in received.iterdir() if p.is_file()) == ["SEG", "SR"]
    transfers = [
        e
        for e in read_entries(tmp_path / "data" / "audit.log")
        if e.event == "DICOM Instances Transferred" and e.participants[0].startswith("PACSAI")
    ]
    failed = [e for e in transfers if e.description.startswith("results not delivered (will retry)")]
    assert failed and all(e.outcome == "minor failure" and "STORESCU" in e.description for e in failed)
    assert transfers[-1].description == "results: 2 of 2 file(s) accepted" and transfers[-1].outcome == "success"


def test_chest_xray_comes_back_as_sr_and_heatmap(tmp_path: Path, stack: Callable[..., Stack]) -> None:
    """A child's chest radiograph auto-routed by Orthanc returns as a classification SR and a heat-map SC (the
    PneumoniaMNIST test image made a 3-year-old's CR: the corpus has no chest radiograph inside the model's domain)."""
    need("Orthanc"), need("dciodvfy")
    orthanc, _, _ = routed_by_orthanc(tmp_path, stack)
    child = pediatric_cr(load_split(DEFAULT_DATA, "test").images[0], tmp_path / "child-cr.dcm")
    study_id = orthanc.upload(child)["ParentStudy"]

    def three_series() -> list[dict[str, object]]:
        series = orthanc.series_of_study(study_id)
        return series if len(series) >= 3 else []

    series = wait_until(three_series, 300, "SR and heat-map in Orthanc", 1.0)
    files = {}
    for item in series:
        (instance,) = item["Instances"]
        path = tmp_path / f"{instance}.dcm"
        path.write_bytes(orthanc.request("GET", f"/instances/{instance}/file"))
        files[str(dcmread(path, stop_before_pixels=True).SOPClassUID)] = path
    sr, sc = files["1.2.840.10008.5.1.4.1.1.88.34"], files["1.2.840.10008.5.1.4.1.1.7"]
    for path in (sr, sc):
        assert dciodvfy_errors(path) == []
    heatmap = dcmread(sc)
    assert heatmap.BurnedInAnnotation == "YES" and heatmap.SamplesPerPixel == 3
    assert "not for diagnosis" in heatmap.SeriesDescription
    report = dcmread(sr)
    assert "Pneumonia" in str(report.ContentSequence)


def test_an_adult_chest_comes_back_as_a_not_evaluated_sr(
    tmp_path: Path, shared: Path, stack: Callable[..., Stack]
) -> None:
    """Issue 12: RG1 (an adult chest PA) is outside cxr-pneumonia's domain: no probability and no heat-map, an SR
    saying why, and the job delivered with the reason recorded (pacsai status shows it)."""
    need("Orthanc"), need("dciodvfy")
    orthanc, pacsai, _ = routed_by_orthanc(tmp_path, stack)
    study_id = orthanc.upload(shared / "dicom" / "pydicom-data" / "RG1_UNCR.dcm")["ParentStudy"]

    def two_series() -> list[dict[str, Any]]:
        series = orthanc.series_of_study(study_id)
        return series if len(series) >= 2 else []

    series = wait_until(two_series, 300, "the 'not evaluated' SR in Orthanc", 1.0)
    pacsai.wait_jobs({"delivered": 1}, timeout_s=60)
    reports = [item for item in series if item["MainDicomTags"].get("Modality") == "SR"]
    (instance,) = reports[0]["Instances"]
    path = tmp_path / "sr.dcm"
    path.write_bytes(orthanc.request("GET", f"/instances/{instance}/file"))
    assert dciodvfy_errors(path) == []
    report = dcmread(path)
    texts = " ".join(str(item.TextValue) for item in content_items(report) if "TextValue" in item)
    assert "did not evaluate this series: patient age 64 years is outside 1–5 years" in texts
    assert finding_free(report)  # no probability, no present/absent
    time.sleep(3)  # nothing else follows: no heat-map
    assert len(orthanc.series_of_study(study_id)) == 2
    state = State(pacsai.data / "pacsai.db")
    try:
        (job,) = state.jobs_in(JobState.DELIVERED)
        assert job.reason.startswith("not evaluated: patient age 64 years")
    finally:
        state.close()
