"""The stack under test as fixtures use it: a stand-in PACS (dcmtk storescp) and pacsai processes on one data dir."""

from __future__ import annotations

import subprocess
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread

from pacsai.state import State
from tests.services import Process, free_port, pacsai_env, start_pacsai, wait_until


@dataclass
class StoreScpPacs:
    """dcmtk storescp playing the PACS: results arrive in `inbox`."""

    process: Process
    port: int
    inbox: Path
    ae_title: str

    @property
    def peer(self) -> str:
        return f"{self.ae_title}@127.0.0.1:{self.port}"

    def modalities(self) -> list[str]:
        """Modalities of the files received so far, sorted."""
        return sorted(dcmread(p, stop_before_pixels=True).Modality for p in self.inbox.iterdir() if p.is_file())


@dataclass
class Stack:
    """pacsai node, worker or run processes sharing one data dir and environment; all stopped at teardown."""

    workdir: Path
    env: dict[str, str]
    processes: list[Process] = field(default_factory=list)

    @property
    def data(self) -> Path:
        return Path(self.env["PACSAI_DATA_DIR"])

    @property
    def port(self) -> int:
        return int(self.env["PACSAI_PORT"])

    def start(self, command: str, *, workdir: Path | None = None, **env: str) -> Process:
        """Start `pacsai <command>` (node, worker, run) with the stack's environment plus `env`."""
        process = start_pacsai(command, workdir or self.workdir, {**self.env, **env})
        self.processes.append(process)
        return process

    def adopt(self, process: Process) -> Process:
        """Stop this process (a Redis, an Orthanc…) with the stack."""
        self.processes.append(process)
        return process

    def send(self, paths: Sequence[Path], calling_ae: str, *, timeout_s: float = 120) -> None:
        """dcmtk storescu, one association, every file; raises when a C-STORE fails."""
        argv = ["storescu", "-xv", "-aet", calling_ae, "-aec", "PACSAI", "127.0.0.1", str(self.port)]
        subprocess.run([*argv, *map(str, paths)], check=True, timeout=timeout_s, capture_output=True)

    def jobs(self) -> dict[str, int]:
        """Jobs by state, from the node's database."""
        state = State(self.data / "pacsai.db")
        try:
            return state.counts()["jobs"]
        finally:
            state.close()

    def wait_jobs(self, expected: dict[str, int], timeout_s: float = 180) -> None:
        wait_until(lambda: self.jobs() == expected, timeout_s, f"jobs {expected}", 0.5)

    def logs(self) -> str:
        return "\n".join(f"----- {p.name} log -----\n{p.log()[-6000:]}" for p in self.processes)

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()


def stack_env(data: Path, *, peers: str, broker_url: str = "", port: int = 0, **extra: str) -> dict[str, str]:
    """The test environment of a stack on `port` (0: a free DICOM port)."""
    return pacsai_env(data, port=port or free_port(), peers=peers, broker_url=broker_url, **extra)
