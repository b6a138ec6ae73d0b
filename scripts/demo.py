"""Demo of the main job: Orthanc → pacsai (node + worker on Redis) → Orthanc, with a real CT study."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pydicom import dcmread  # noqa: E402

from tests.checks import seg_voxels_per_segment, sr_volumes  # noqa: E402
from tests.services import SHARED, free_port, pacsai_env, start_orthanc, start_pacsai, start_redis  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--series", type=Path, default=SHARED / "dicom" / "totalsegmentator-ct-abdomen")
    parser.add_argument("--workdir", type=Path, default=REPO / "demo-run")
    parser.add_argument("--keep-running", action="store_true", help="leave Orthanc and pacsai up until Ctrl-C")
    args = parser.parse_args()
    work = args.workdir.resolve()
    work.mkdir(parents=True, exist_ok=True)
    print(f"demo: working directory {work}")
    redis, broker = start_redis(work / "redis")
    port = free_port()
    orthanc = start_orthanc(work / "orthanc", modalities={"pacsai": ("PACSAI", "127.0.0.1", port)})
    print(f"demo: Orthanc (the PACS) at {orthanc.base}, DICOM port {orthanc.dicom_port}; Redis at {broker}")
    env = pacsai_env(
        work / "pacsai-data", port=port, peers=f"ORTHANC@127.0.0.1:{orthanc.dicom_port}", broker_url=broker
    )
    processes = [redis, orthanc.process]
    try:
        processes.append(start_pacsai("node", work, env))
        processes.append(start_pacsai("worker", work, env))
        print(f"demo: pacsai node listening as PACSAI on port {port}; worker started (logs in {work})")
        files = sorted(p for p in args.series.iterdir() if p.is_file())
        started = time.monotonic()
        study_id = {orthanc.upload(path)["ParentStudy"] for path in files}.pop()
        print(f"demo: uploaded {len(files)} CT images to Orthanc; its auto-routing forwards the series to pacsai")
        series = orthanc.wait_for_modalities(study_id, {"SEG", "SR"}, timeout_s=600)
        print(f"demo: results arrived in Orthanc after {time.monotonic() - started:.0f} s")
        summarise(orthanc, series, work)
        print(f"\nResults: {orthanc.base}/app/explorer.html#study?uuid={study_id}")
        print(f"         {orthanc.base}/studies/{study_id}/series  (REST)")
        print(f"         copies of the SEG and SR in {work / 'results'}")
        if args.keep_running:
            print("Orthanc and pacsai keep running; press Ctrl-C to stop.")
            while True:
                time.sleep(3600)
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        for proc in reversed(processes):
            proc.stop()


def summarise(orthanc: object, series: list[dict[str, Any]], work: Path) -> None:
    results = work / "results"
    results.mkdir(exist_ok=True)
    paths = {}
    for item in series:
        tags = item["MainDicomTags"]
        modality = tags["Modality"]
        print(f"  series {tags.get('SeriesNumber', '?'):>5} {modality:<4} {tags.get('SeriesDescription', '')}")
        if modality in ("SEG", "SR"):
            instance = item["Instances"][0]
            paths[modality] = results / f"{modality.lower()}.dcm"
            paths[modality].write_bytes(orthanc.request("GET", f"/instances/{instance}/file"))  # type: ignore[attr-defined]
    seg = dcmread(paths["SEG"])
    names = {int(s.SegmentNumber): s.SegmentLabel for s in seg.SegmentSequence}
    counts = seg_voxels_per_segment(seg)
    volumes = sr_volumes(dcmread(paths["SR"]))
    print(f"\n  {'segment':<14} {'SEG voxels':>11} {'SR volume (mL)':>15}")
    for number in sorted(names):
        print(f"  {names[number]:<14} {counts.get(number, 0):>11} {volumes.get(number, 0.0):>15.1f}")


if __name__ == "__main__":
    sys.exit(main())
