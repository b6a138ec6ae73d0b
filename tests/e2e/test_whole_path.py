"""PACS → pacsai → PACS with real processes: Orthanc auto-routing, Redis or the on-disk queue, node and worker."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
from pydicom import dcmread

from dicom_node.audit_log import read_entries
from tests.checks import check_seg_and_sr, dciodvfy_errors, find_leaks, make_canary_series
from tests.conftest import need
from tests.services import free_port, pacsai_env, start_orthanc, start_pacsai, start_storescp, supervised, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def redis_dump(url: str) -> str:
    """Every key and value in Redis, as text."""
    import redis

    client = redis.Redis.from_url(url)
    parts = []
    readers = {"string": client.get, "hash": client.hgetall, "set": client.smembers,
               "list": lambda key: client.lrange(key, 0, -1), "zset": lambda key: client.zrange(key, 0, -1)}
    for key in client.scan_iter():
        read = readers.get(client.type(key).decode())
        parts.append(f"{key!r} {read(key) if read else b''!r}")
    return "\n".join(parts)


@pytest.mark.parametrize("queue", ["redis", "disk"])
def test_orthanc_study_comes_back_as_seg_and_sr(queue: str, tmp_path: Path, ct_series: Path,
                                                request: pytest.FixtureRequest) -> None:
    """Upload the CT to Orthanc; its Lua auto-routing sends it to pacsai; SEG + SR appear in the same study."""
    need("Orthanc"), need("dciodvfy")
    broker = request.getfixturevalue("redis_url") if queue == "redis" else ""
    port = free_port()
    orthanc = start_orthanc(tmp_path / "orthanc", modalities={"pacsai": ("PACSAI", "127.0.0.1", port)})
    env = pacsai_env(tmp_path / "data", port=port, peers=f"ORTHANC@127.0.0.1:{orthanc.dicom_port}",
                     broker_url=broker)
    with supervised(orthanc.process) as processes:
        processes.append(start_pacsai("node", tmp_path, env))
        processes.append(start_pacsai("worker", tmp_path, env))
        study = {orthanc.upload(path)["ParentStudy"] for path in sorted(ct_series.iterdir())}
        assert len(study) == 1
        study_id = study.pop()
        series = orthanc.wait_for_modalities(study_id, {"SEG", "SR"}, timeout_s=300)
        by_modality = {}
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
        time.sleep(5)   # > StableAge: the results' own series are stable now and must not be routed back
        assert len(orthanc.series_of_study(study_id)) == 3
        assert processes[1].log().count("series complete") == 1


@pytest.mark.catalogue("A7")
def test_storescu_to_node_to_storescp(tmp_path: Path, ct_series: Path, redis_url: str, database: str) -> None:
    """dcmtk storescu sends straight to the node; results arrive at a dcmtk storescp acting as the PACS.

    The series carries canary patient values and UIDs: none may appear in logs, Redis or spool file names.
    Runs with the SQLite and with the PostgreSQL system of record.
    """
    need("storescu"), need("storescp"), need("dciodvfy")
    canaries = make_canary_series(ct_series, tmp_path / "canary-series")
    source = tmp_path / "canary-series"
    storescp, pacs_port, received = start_storescp(tmp_path / "pacs", ae_title="STORESCU")
    port = free_port()
    env = pacsai_env(tmp_path / "data", port=port, peers=f"STORESCU@127.0.0.1:{pacs_port}", broker_url=redis_url)
    if database.startswith("postgresql://"):
        env["PACSAI_DATABASE_URL"] = database
    env["PACSAI_METRICS_PORT"] = str(metrics_port := free_port())
    with supervised(storescp) as processes:
        processes.append(start_pacsai("node", tmp_path, env))
        processes.append(start_pacsai("worker", tmp_path, env))
        subprocess.run(["storescu", "-xv", "-aet", "STORESCU", "-aec", "PACSAI", "+sd", "127.0.0.1", str(port),
                        str(source)], check=True, timeout=120, capture_output=True)

        def arrived() -> list[Path]:
            files = [p for p in received.iterdir() if p.is_file()]
            return files if len(files) >= 2 else []

        files = wait_until(arrived, 300, "SEG and SR at storescp", 1.0)
        by_modality = {dcmread(p, stop_before_pixels=True).Modality: p for p in files}
        assert sorted(by_modality) == ["SEG", "SR"]
        check_seg_and_sr(by_modality["SEG"], by_modality["SR"], source)
        assert dcmread(by_modality["SEG"]).PatientName == dcmread(next(source.iterdir())).PatientName
        texts = {proc.name: proc.log() for proc in processes if proc.name.startswith("pacsai")}
        texts["redis"] = redis_dump(redis_url)
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
            texts["metrics"] = response.read().decode()
        assert 'pacsai_instances_received_total{outcome="success"} 20.0' in texts["metrics"]
        assert 'pacsai_jobs{state="delivered"} 1.0' in texts["metrics"]
        assert find_leaks(canaries, texts, tmp_path / "data") == []


@pytest.mark.catalogue("E1")
def test_results_wait_for_a_pacs_that_is_down(tmp_path: Path, ct_series: Path) -> None:
    """The PACS is down when results are ready: delivery retries with back-off and succeeds once it is up.

    Runs `pacsai run` (node + worker on one box) in embedded mode: no broker URL, the on-disk queue.
    """
    need("storescu"), need("storescp")
    pacs_port, port = free_port(), free_port()
    env = pacsai_env(tmp_path / "data", port=port, peers=f"STORESCU@127.0.0.1:{pacs_port}")   # on-disk queue
    with supervised() as processes:
        processes.append(start_pacsai("run", tmp_path, env))
        subprocess.run(["storescu", "-xv", "-aet", "STORESCU", "-aec", "PACSAI", "+sd", "127.0.0.1", str(port),
                        str(ct_series)], check=True, timeout=120, capture_output=True)
        wait_until(lambda: "retrying in" in processes[0].log(), 300, "a failed delivery attempt", 1.0)
        storescp, _, received = start_storescp(tmp_path / "pacs", ae_title="STORESCU", port=pacs_port)
        processes.append(storescp)

        def status() -> dict[str, dict[str, int]]:
            run = subprocess.run([sys.executable, "-m", "dicom_node.cli", "status", "--json"],
                                 env={**os.environ, **env}, capture_output=True, text=True, check=True)
            counts: dict[str, dict[str, int]] = json.loads(run.stdout)
            return counts

        counts = wait_until(lambda: (c := status())["jobs"] == {"delivered": 1} and c, 120, "delivered", 1.0)
        assert counts["deliveries"] == {"success": 2}
        assert sorted(dcmread(p).Modality for p in received.iterdir() if p.is_file()) == ["SEG", "SR"]
        transfers = [e for e in read_entries(tmp_path / "data" / "audit.log")
                     if e.event == "DICOM Instances Transferred" and e.participants[0].startswith("PACSAI")]
        failed = [e for e in transfers if e.description.startswith("results not delivered (will retry)")]
        assert failed and all(e.outcome == "minor failure" and "STORESCU" in e.description for e in failed)
        assert transfers[-1].description == "results: 2 of 2 file(s) accepted" and transfers[-1].outcome == "success"


def test_chest_xray_comes_back_as_sr_and_heatmap(tmp_path: Path, shared: Path) -> None:
    """A chest radiograph auto-routed by Orthanc returns as a classification SR and a heat-map Secondary Capture."""
    need("Orthanc"), need("dciodvfy")
    port = free_port()
    orthanc = start_orthanc(tmp_path / "orthanc", modalities={"pacsai": ("PACSAI", "127.0.0.1", port)})
    env = pacsai_env(tmp_path / "data", port=port, peers=f"ORTHANC@127.0.0.1:{orthanc.dicom_port}")
    with supervised(orthanc.process) as processes:
        processes += [start_pacsai("node", tmp_path, env), start_pacsai("worker", tmp_path, env)]
        study_id = orthanc.upload(shared / "dicom" / "pydicom-data" / "RG1_UNCR.dcm")["ParentStudy"]

        def three_series() -> list[dict[str, object]]:
            series = orthanc.series_of_study(study_id)
            return series if len(series) >= 3 else []

        series = wait_until(three_series, 300, "SR and heat-map in Orthanc", 1.0)
        files = {}
        for item in series:
            (instance,) = item["Instances"]  # type: ignore[index]
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
