"""Worker and model faults W2, W3, W6, W7: real inference through the pipeline with stand-in networks.

The stand-in networks below are test inputs, real `torch.nn.Module`s: one runs out of (GPU) memory, one loses its
device, one answers NaN, one finds nothing. The W3/W6 test runs them inside real `pacsai worker` processes, as
MONAI bundles whose config names the class here (`_target_`), the way a site plugs in a network of its own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from pydicom.dataset import Dataset

from models.registry import LoadedModel, load_model, load_spec
from pacsai.errors import ModelError
from pacsai.jobs import JobState
from pacsai.state import State
from tests.checks import VOLUME_CODE, dciodvfy_errors, read_strict, to_bytes
from tests.conftest import need
from tests.services import REPO, free_port, pacsai_env, start_pacsai, start_storescp, supervised, wait_until
from worker.pipeline import process_series

pytestmark = pytest.mark.integration
CHANNELS = 6  # ct-organs-tiny: background and five organs


class RunsOutOfMemory(torch.nn.Module):
    """Raises torch.cuda.OutOfMemoryError on its first `failures` calls, then answers (a 1x1x1 convolution)."""

    def __init__(self, failures: int) -> None:
        super().__init__()
        self.conv = torch.nn.Conv3d(1, CHANNELS, 1)
        self.failures = failures
        self.batch_sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batch_sizes.append(int(x.shape[0]))
        if len(self.batch_sizes) <= self.failures:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        out: torch.Tensor = self.conv(x)
        return out


class FindsNothing(torch.nn.Module):
    """Every voxel is background: channel 0 wins everywhere."""

    def __init__(self, channels: int = CHANNELS) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(1))
        self.channels = channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.zeros(x.shape[0], self.channels, *x.shape[2:])
        out[:, 0] = self.scale
        return out


class AnswersNaN(FindsNothing):
    """Scores that are NaN in one organ's channel (argmax would make that organ of every voxel)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        out[:, 4] = float("nan")
        return out


class DeviceLost(FindsNothing):
    """The GPU fails mid-job: torch raises AcceleratorError ("CUDA error: ...") from the forward pass."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise torch.AcceleratorError("CUDA error: unspecified launch failure")


class Bright(FindsNothing):
    """A healthy network: voxels brighter than the middle of the intensity window are label 1."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([torch.full_like(x, 0.5) * self.scale, x], dim=1)


@pytest.fixture(scope="module")
def ct_files(ct_series: Path) -> list[Path]:
    return sorted(ct_series.iterdir())


@pytest.fixture(scope="module")
def ct_model() -> LoadedModel:
    """ct-organs-tiny's spec with small windows (so a pass has several batches of them), and a network to swap."""
    model = load_model(load_spec("ct-organs-tiny"), "cpu")
    pre = dataclasses.replace(model.spec.preprocessing, roi_size=(32, 32, 8), sw_batch_size=4)
    return dataclasses.replace(model, spec=dataclasses.replace(model.spec, preprocessing=pre))


def with_network(model: LoadedModel, module: torch.nn.Module) -> LoadedModel:
    """The model with a stand-in network; without its OOD check, whose feature layer the stand-in does not have."""
    return dataclasses.replace(model, module=module.eval(), spec=dataclasses.replace(model.spec, ood=None))


@pytest.mark.catalogue("W2")
def test_out_of_memory_retries_once_with_a_smaller_window_batch(ct_files: list[Path], ct_model: LoadedModel) -> None:
    """W2: one OOM frees memory and runs the whole sliding window again with half the batch; results follow."""
    network = RunsOutOfMemory(failures=1)
    datasets = process_series(ct_files, with_network(ct_model, network))
    assert network.batch_sizes[0] == 4  # the spec's sw_batch_size, which ran out
    assert max(network.batch_sizes[1:]) == 2 and len(network.batch_sizes) > 2  # a whole pass again, halved
    assert [str(ds.Modality) for ds in datasets][-1] == "SR"
    for ds in datasets:
        read_strict(to_bytes(ds))


@pytest.mark.catalogue("W2")
def test_out_of_memory_twice_fails_the_job_with_a_reason_and_the_model_still_works(
    ct_files: list[Path], ct_model: LoadedModel
) -> None:
    """W2: a second OOM is a ModelError (not retryable: the job fails, not retried forever); the next job runs."""
    network = RunsOutOfMemory(failures=2)
    with pytest.raises(ModelError, match=r"ran out of memory on cpu again with sw_batch_size 2; not retried") as err:
        process_series(ct_files, with_network(ct_model, network))
    assert not err.value.retryable
    assert network.batch_sizes == [4, 2]
    datasets = process_series(ct_files, with_network(ct_model, network))  # same process, same module: healthy
    assert [str(ds.Modality) for ds in datasets][-1] == "SR"


@pytest.mark.catalogue("W7")
def test_nan_scores_fail_the_job_instead_of_becoming_labels(ct_files: list[Path], ct_model: LoadedModel) -> None:
    with pytest.raises(ModelError, match="returned NaN or infinite scores") as err:
        process_series(ct_files, with_network(ct_model, AnswersNaN()))
    assert not err.value.retryable


@pytest.mark.catalogue("W7")
def test_an_empty_mask_gives_no_seg_and_an_sr_that_finds_nothing(
    ct_files: list[Path], ct_model: LoadedModel, tmp_path: Path
) -> None:
    """W7: nothing found ⇒ no SEG at all (never an empty one), and a valid SR with 0 mL for every organ."""
    datasets = process_series(ct_files, with_network(ct_model, FindsNothing()))
    assert [str(ds.Modality) for ds in datasets] == ["SR"]
    sr = read_strict(to_bytes(datasets[0]))
    volumes = [
        float(item.MeasuredValueSequence[0].NumericValue)
        for item in _content(sr)
        if item.get("ValueType") == "NUM" and item.ConceptNameCodeSequence[0].CodeValue == VOLUME_CODE
    ]
    assert volumes == [0.0] * (CHANNELS - 1)
    segment_refs = [ref for item in _content(sr) for ref in item.get("ReferencedSOPSequence", [])]
    assert not any("ReferencedSegmentNumber" in ref for ref in segment_refs)  # refers to no segment (only images)
    need("dciodvfy")
    (tmp_path / "sr.dcm").write_bytes(to_bytes(datasets[0]))
    assert dciodvfy_errors(tmp_path / "sr.dcm") == []


def _content(ds: Dataset) -> Iterator[Dataset]:
    for item in ds.get("ContentSequence", []):
        yield item
        yield from _content(item)


# --- W3 and W6 in real worker processes ----------------------------------------------------------------------------

BUNDLE_META = {
    "name": "stand-in",
    "version": "0.1.0",
    "task": "segmentation",
    "network_data_format": {
        "inputs": {"image": {"type": "image", "num_channels": 1, "spatial_shape": [64, 64, 16]}},
        "outputs": {
            "pred": {
                "type": "image",
                "format": "segmentation",
                "num_channels": 2,
                "channel_def": {"0": "background", "1": "spleen"},
            }
        },
    },
}
BUNDLE_SPEC = """\
name: stand-in
version: 0.1.0
task: segmentation
modalities: [CT]
network: monai.bundle
weights: models/model.pt
weights_sha256: "{sha}"
labels:
  - number: 1
    name: spleen
    category: {{value: "123037004", meaning: Anatomical Structure}}
    type: {{value: "78961009", meaning: Spleen}}
    colour_rgb: [157, 108, 162]
"""
ROUTES = """\
rules:
  - name: every-ct-series
    model: stand-in
    match: {modality: [CT]}
"""


def stand_in_bundle(models_dir: Path, network: type[torch.nn.Module]) -> Path:
    """Model "stand-in": a MONAI bundle whose network_def is `network` (a class of this module)."""
    folder = models_dir / "stand_in"
    (folder / "configs").mkdir(parents=True)
    (folder / "models").mkdir()
    inference = {
        "image_key": "image",
        "network_def": {"_target_": f"{__name__}.{network.__name__}"},
        "preprocessing": {
            "_target_": "Compose",
            "transforms": [
                {"_target_": "LoadImaged", "keys": "@image_key"},
                {"_target_": "EnsureChannelFirstd", "keys": "@image_key"},
                {
                    "_target_": "ScaleIntensityRanged",
                    "keys": "@image_key",
                    "a_min": -57,
                    "a_max": 164,
                    "b_min": 0,
                    "b_max": 1,
                    "clip": True,
                },
            ],
        },
        "inferer": {"_target_": "SlidingWindowInferer", "roi_size": [512, 512, 32], "sw_batch_size": 1},
        "postprocessing": {
            "_target_": "Compose",
            "transforms": [{"_target_": "AsDiscreted", "keys": "pred", "argmax": True}],
        },
    }
    (folder / "configs" / "metadata.json").write_text(json.dumps(BUNDLE_META))
    (folder / "configs" / "inference.json").write_text(json.dumps(inference))
    torch.save(network().state_dict(), folder / "models" / "model.pt")
    sha = hashlib.sha256((folder / "models" / "model.pt").read_bytes()).hexdigest()
    (folder / "spec.yaml").write_text(BUNDLE_SPEC.format(sha=sha))
    return models_dir


@dataclasses.dataclass
class GpuFailureRun:
    broken_exit_code: int | None
    broken_log: str
    state_when_broken_stopped: str
    final_state: str
    attempts: int
    delivered: list[str]
    parent_maps_torch: bool
    child_maps_torch: list[bool]
    healthy_log: str


def _maps_torch(pid: int) -> bool:
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def _pool_children(pid: int) -> list[int]:
    """Processes forked by `pid` (same command line): its Celery pool; not spawned helpers."""
    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    return [int(c) for c in children if Path(f"/proc/{c}/cmdline").read_bytes() == cmdline]


@pytest.fixture(scope="module")
def gpu_failure_run(tmp_path_factory: pytest.TempPathFactory, ct_series: Path) -> GpuFailureRun:
    """A study goes to worker A, whose device fails; worker B (a healthy network, same model name) finishes it."""
    need("storescp"), need("storescu")
    tmp = tmp_path_factory.mktemp("w3")
    storescp, pacs_port, inbox = start_storescp(tmp / "pacs", ae_title="PACS")
    (tmp / "routes.yaml").write_text(ROUTES)
    port, data = free_port(), tmp / "data"
    env = pacsai_env(
        data,
        port=port,
        peers=f"PACS@127.0.0.1:{pacs_port}",
        PACSAI_QUIET_PERIOD_S="1",
        PACSAI_ROUTES_FILE=str(tmp / "routes.yaml"),
        PACSAI_RETRY_DELAY_S="1",
    )
    broken_env = {**env, "PACSAI_MODELS_DIR": str(stand_in_bundle(tmp / "models-a", DeviceLost))}
    healthy_env = {**env, "PACSAI_MODELS_DIR": str(stand_in_bundle(tmp / "models-b", Bright))}
    with supervised(storescp) as processes:
        processes.append(start_pacsai("node", tmp, env))
        broken = start_pacsai("worker", tmp / "a", broken_env)
        processes.append(broken)
        storescu = ["storescu", "-xv", "-aet", "PACS", "-aec", "PACSAI", "+sd", "127.0.0.1", str(port), str(ct_series)]
        subprocess.run(storescu, check=True, timeout=60, capture_output=True)
        state = State(data / "pacsai.db")
        wait_until(lambda: state.jobs_in(JobState.RUNNING), 120, "worker A to take the job", 0.2)
        healthy = start_pacsai("worker", tmp / "b", healthy_env)  # only now: A holds the job
        processes.append(healthy)
        exit_code = broken.popen.wait(timeout=120)  # A stops by itself
        (row,) = state.jobs_in(*JobState)
        stopped_state = row.state.value
        wait_until(lambda: state.jobs_in(JobState.DELIVERED), 180, "worker B to deliver the job", 0.5)
        (row,) = state.jobs_in(*JobState)
        children = _pool_children(healthy.popen.pid)
        run = GpuFailureRun(
            broken_exit_code=exit_code,
            broken_log=broken.log(),
            state_when_broken_stopped=stopped_state,
            final_state=row.state.value,
            attempts=row.attempts,
            delivered=sorted(path.name.split(".")[0] for path in inbox.iterdir()),
            parent_maps_torch=_maps_torch(healthy.popen.pid),
            child_maps_torch=[_maps_torch(c) for c in children],
            healthy_log=healthy.log(),
        )
        state.close()
        return run


@pytest.mark.slow
@pytest.mark.catalogue("W3")
def test_a_worker_whose_gpu_fails_hands_the_job_back_and_stops(gpu_failure_run: GpuFailureRun) -> None:
    """W3: worker A marks itself unhealthy, puts the job back (queued, not failed) and shuts down gracefully;
    worker B runs the job and it is delivered."""
    run = gpu_failure_run
    assert "worker unhealthy: the worker's accelerator failed (AcceleratorError)" in run.broken_log
    assert "Warm shutdown" in run.broken_log and run.broken_exit_code is not None
    assert run.state_when_broken_stopped in ("queued", "running", "encoded", "delivered")  # never failed or dead
    assert run.final_state == "delivered" and run.attempts == 2
    assert run.delivered  # results of worker B's network at the PACS
    assert "job failed" not in run.broken_log and "job dead" not in run.broken_log


@pytest.mark.slow
@pytest.mark.catalogue("W6")
def test_the_celery_parent_never_loads_torch(gpu_failure_run: GpuFailureRun) -> None:
    """W6: the worker's parent process never maps libtorch, so it cannot have initialised CUDA or torch's thread
    pools before forking; its pool process, which ran the job, has torch loaded."""
    run = gpu_failure_run
    assert "fork check: torch is not loaded in the worker's parent process" in run.healthy_log
    assert run.child_maps_torch and all(run.child_maps_torch)
    assert not run.parent_maps_torch


@pytest.mark.gpu
@pytest.mark.catalogue("W6")
def test_a_worker_whose_parent_initialised_cuda_refuses_to_start(tmp_path: Path) -> None:
    """W6 on a GPU host: CUDA initialised in the process that becomes the Celery parent stops the worker (exit 3)."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    code = "import sys, torch; torch.cuda.init(); from worker.cli import main; sys.exit(main(['worker']))"
    env = {
        "PACSAI_DATA_DIR": str(tmp_path / "data"),
        "PACSAI_WORKER_MODELS": "ct-organs-tiny",
        "PYTHONPATH": str(REPO),
        "PATH": "/usr/bin:/bin",
    }
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 3
    assert "not starting: CUDA is initialised in the worker's parent process" in run.stderr
