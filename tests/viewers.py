"""Our SEG and SR read the way viewers read them: dcmjs as OHIF loads them (tests/js/read_results.mjs) and dcmqi
(pip `dcmqi`: segimage2itkimage, tid1500reader), the libraries behind 3D Slicer's DICOM SEG/SR import."""

from __future__ import annotations

import gzip
import json
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread

from tests.checks import seg_voxels_per_segment
from tests.conftest import IN_CI
from tests.services import REPO

JS_DIR = REPO / "tests" / "js"
# DCMTK's value checker (dcmqi is built on DCMTK) can check character repertoires only for single-byte sets; for our
# UTF-8 (ISO_IR 192, declared so patient names of any script survive) it skips that check and says so. Not a finding.
KNOWN_WARNINGS = ("W: The VR checker does not support this Specific Character Set: ISO_IR 192",)


def require(check: bool, what: str) -> None:
    """Skip when a viewer tool is missing; fail in CI (CI=true), where scripts/setup.sh installs them."""
    if check:
        return
    message = f"{what} is not installed (run scripts/setup.sh)"
    if IN_CI:
        pytest.fail(f"{message}; CI=true: a missing tool is a failure")
    pytest.skip(message)


def dcmqi_tool(name: str) -> str:
    """A dcmqi command: beside the running Python (the .venv's bin), else on PATH."""
    beside = Path(sys.executable).parent / name
    found = str(beside) if beside.exists() else shutil.which(name)
    require(found is not None, f"dcmqi's {name} (pip package dcmqi)")
    assert found is not None
    return found


def node_with_dcmjs() -> str:
    """Debian's node, with dcmjs installed in tests/js by `npm ci`."""
    node = shutil.which("node") or shutil.which("nodejs")
    require(node is not None, "node (Debian package nodejs)")
    require((JS_DIR / "node_modules" / "dcmjs" / "package.json").exists(), "dcmjs (npm ci in tests/js)")
    assert node is not None
    return node


def warnings_in(output: str) -> list[str]:
    """DCMTK/dcmqi warning, error and fatal lines other than the known one."""
    lines = [line.strip() for line in output.splitlines()]
    flagged = [line for line in lines if line[:2] in ("W:", "E:", "F:") or "warning" in line.lower()]
    return [line for line in flagged if line not in KNOWN_WARNINGS]


def read_with_dcmjs(*, seg: Path | None = None, sr: Path | None = None, sources: Sequence[Path] = ()) -> Any:
    """What read_results.mjs reports for a SEG (with its source images) and/or an SR."""
    argv = [node_with_dcmjs(), str(JS_DIR / "read_results.mjs")]
    argv += ["--seg", str(seg)] if seg else []
    argv += ["--sr", str(sr)] if sr else []
    for source in sources:
        argv += ["--source", str(source)]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=120, cwd=JS_DIR)
    assert run.returncode == 0, f"dcmjs could not read the results:\n{run.stderr[-3000:]}"
    return json.loads(run.stdout)


def dcmqi_seg(seg: Path, out_dir: Path) -> tuple[dict[str, Any], dict[int, int], list[str]]:
    """segimage2itkimage: its metadata JSON, voxel count per segment number in its NRRD files, and its warnings."""
    out_dir.mkdir(parents=True, exist_ok=True)
    argv = [dcmqi_tool("segimage2itkimage"), "--inputDICOM", str(seg), "--outputDirectory", str(out_dir)]
    run = subprocess.run([*argv, "--outputType", "nrrd", "-p", "seg"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, f"segimage2itkimage failed:\n{run.stdout[-2000:]}{run.stderr[-2000:]}"
    meta: dict[str, Any] = json.loads((out_dir / "seg-meta.json").read_text())
    counts: dict[int, int] = {}
    for index, attributes in enumerate(meta["segmentAttributes"], start=1):
        labels = read_nrrd(out_dir / f"seg-{index}.nrrd")
        for segment in attributes:
            counts[int(segment["labelID"])] = int((labels == int(segment["labelID"])).sum())
    return meta, counts, warnings_in(run.stdout + run.stderr)


def dcmqi_sr(sr: Path, out_dir: Path) -> tuple[dict[str, Any], list[str]]:
    """tid1500reader: the report as dcmqi's JSON, and its warnings."""
    out_dir.mkdir(parents=True, exist_ok=True)
    target = out_dir / f"{sr.stem}.json"
    argv = [dcmqi_tool("tid1500reader"), "--inputDICOM", str(sr), "--outputMetadata", str(target)]
    run = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, f"tid1500reader failed:\n{run.stdout[-2000:]}{run.stderr[-2000:]}"
    report: dict[str, Any] = json.loads(target.read_text())
    return report, warnings_in(run.stdout + run.stderr)


def read_nrrd(path: Path) -> np.ndarray[Any, np.dtype[Any]]:
    """The voxels of a NRRD file as dcmqi writes them (raw or gzip, little endian), flat; no geometry needed here."""
    data = path.read_bytes()
    header, _, body = data.partition(b"\n\n")
    fields = dict(line.split(": ", 1) for line in header.decode().splitlines()[1:] if ": " in line)
    dtypes = {"short": "<i2", "unsigned short": "<u2", "unsigned char": "u1", "char": "i1", "int": "<i4"}
    raw = gzip.decompress(body) if fields.get("encoding") in ("gzip", "gz") else body
    return np.frombuffer(raw, dtype=dtypes[fields["type"]])


def check_seg_in_viewers(seg_path: Path, sources: Sequence[Path], work: Path) -> dict[int, int]:
    """dcmjs maps every SEG frame to a source image and dcmqi reads the SEG, both without a warning, and both get
    the SEG's own voxel count for every segment; returns those counts."""
    seg = dcmread(seg_path)
    expected = seg_voxels_per_segment(seg)
    js = read_with_dcmjs(seg=seg_path, sources=sources)
    assert js["warnings"] == []
    frames = int(seg.NumberOfFrames)
    assert js["seg"]["frames"] == js["seg"]["framesOnSourceImages"] == frames, "a SEG frame has no source image"
    assert {int(k): v for k, v in js["seg"]["voxels"].items()} == expected
    meta, counts, warnings = dcmqi_seg(seg_path, work / "dcmqi-seg")
    assert warnings == []
    assert counts == expected
    assert meta["ContentCreatorName"] == str(seg.ContentCreatorName)
    return expected


def check_sr_in_viewers(sr_path: Path, source_uids: set[str], work: Path) -> list[dict[str, Any]]:
    """dcmjs (OHIF's access pattern) and dcmqi's tid1500reader read the same Image Library (the source images) and
    the same measurement groups with the same values, without a warning; returns dcmjs's measurements."""
    js = read_with_dcmjs(sr=sr_path)
    assert js["warnings"] == []
    assert js["sr"]["template"] == "1500"
    assert set(js["sr"]["referencedImages"]) == source_uids
    report, warnings = dcmqi_sr(sr_path, work / "dcmqi-sr")
    assert warnings == []
    assert set(report["imageLibrary"]) == source_uids
    measurements: list[dict[str, Any]] = js["sr"]["measurements"]
    by_uid = {m["trackingUid"]: [v["value"] for v in m["values"]] for m in measurements}
    assert len(by_uid) == len(measurements) == len(report["Measurements"]) > 0
    for group in report["Measurements"]:
        values = [float(item["value"]) for item in group.get("measurementItems", [])]
        assert np.allclose(values, by_uid[group["TrackingUniqueIdentifier"]], rtol=1e-9), group["TrackingIdentifier"]
    return measurements
