"""Real peers for tests and the demo: redis-server, Orthanc, dcmtk storescp, and pacsai node/worker processes."""

from __future__ import annotations

import base64
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
SHARED = Path(os.environ.get("PACSAI_SHARED_DIR", REPO.parent / "shared"))
ORTHANC_LUA = REPO / "deploy" / "orthanc" / "pacsai-autoroute.lua"


class ServiceMissing(RuntimeError):
    """A binary the test needs is not installed."""


def require_binary(name: str) -> str:
    path = shutil.which(name) or (f"/usr/sbin/{name}" if Path(f"/usr/sbin/{name}").exists() else None)
    if path is None:
        raise ServiceMissing(f"{name} is not installed (run scripts/setup.sh)")
    return path


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A free TCP port below the kernel's ephemeral range (32768-60999 here), so that no outgoing connection can take
    it before the server we start binds it (the tests open many thousands of connections); never the same twice."""
    for _ in range(1000):
        port = random.randrange(20000, 32768)
        if port in _HANDED_OUT:
            continue
        with socket.socket() as sock:
            try:
                sock.bind(("0.0.0.0", port))
            except OSError:
                continue
        _HANDED_OUT.add(port)
        return port
    raise RuntimeError("no free TCP port between 20000 and 32767")


def wait_until(check: Callable[[], Any], timeout_s: float, what: str, interval_s: float = 0.2) -> Any:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(interval_s)
    raise TimeoutError(f"timed out after {timeout_s:.0f} s waiting for {what}")


def port_open(port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(0.5)
        return sock.connect_ex(("127.0.0.1", port)) == 0


@dataclass
class Process:
    """A child process with its output in a log file; stop() terminates it (kill() for SIGKILL)."""

    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()

    def kill(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
            self.popen.wait()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def spawn(name: str, argv: list[str], workdir: Path, env: Mapping[str, str] | None = None) -> Process:
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{name}.log"
    handle = open(log_path, "ab")  # noqa: SIM115 - owned by the child for its lifetime
    popen = subprocess.Popen(
        argv,
        stdout=handle,
        stderr=subprocess.STDOUT,
        cwd=workdir,
        env={**os.environ, **(env or {})},
        start_new_session=True,
    )
    handle.close()
    return Process(name, popen, log_path)


def start_redis(workdir: Path, *, appendonly: bool = True, port: int = 0) -> tuple[Process, str]:
    port = port or free_port()
    argv = [
        require_binary("redis-server"),
        "--port",
        str(port),
        "--bind",
        "127.0.0.1",
        "--dir",
        str(workdir),
        "--save",
        "",
        "--appendonly",
        "yes" if appendonly else "no",
        "--maxmemory-policy",
        "noeviction",
    ]
    proc = spawn("redis", argv, workdir)
    wait_until(lambda: port_open(port), 20, "redis-server")
    return proc, f"redis://127.0.0.1:{port}/0"


@dataclass
class Orthanc:
    """Debian's Orthanc on loopback ports, driven over its REST API."""

    process: Process
    http_port: int
    dicom_port: int
    ae_title: str = "ORTHANC"
    auth: tuple[str, str] | None = None  # (user, password) when its REST API asks for HTTP basic auth
    base: str = field(init=False)

    def __post_init__(self) -> None:
        self.base = f"http://127.0.0.1:{self.http_port}"

    def request(self, method: str, path: str, body: bytes | None = None) -> Any:
        req = urllib.request.Request(self.base + path, data=body, method=method)
        if self.auth is not None:
            token = base64.b64encode(":".join(self.auth).encode()).decode()
            req.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(req, timeout=60) as response:
            payload = response.read()
        return json.loads(payload) if payload[:1] in (b"{", b"[") else payload

    def upload(self, path: Path) -> dict[str, Any]:
        result: dict[str, Any] = self.request("POST", "/instances", path.read_bytes())
        return result

    def series_of_study(self, study_id: str) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.request("GET", f"/studies/{study_id}/series?expand")
        return result

    def wait_for_modalities(self, study_id: str, modalities: set[str], timeout_s: float) -> list[dict[str, Any]]:
        def ready() -> list[dict[str, Any]] | None:
            series = self.series_of_study(study_id)
            found = {s["MainDicomTags"].get("Modality") for s in series}
            return series if modalities <= found else None

        result: list[dict[str, Any]] = wait_until(ready, timeout_s, f"{sorted(modalities)} in Orthanc", 1.0)
        return result

    def stop(self) -> None:
        self.process.stop()


def start_orthanc(
    workdir: Path,
    *,
    modalities: Mapping[str, tuple[str, str, int]],
    stable_age_s: int = 2,
    lua: Path | None = ORTHANC_LUA,
    users: Mapping[str, str] | None = None,
    extra: Mapping[str, Any] | None = None,
) -> Orthanc:
    """Orthanc with its plugins (DICOMweb at /dicom-web); `users`: HTTP basic auth required, even on loopback;
    `extra`: further configuration keys."""
    binary = require_binary("Orthanc")
    http_port, dicom_port = free_port(), free_port()
    storage = workdir / "orthanc-db"
    config = {
        "Name": "pacsai-test-pacs",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "DicomAet": "ORTHANC",
        "RemoteAccessAllowed": False,
        "DicomModalities": {
            name: {"AET": aet, "Host": host, "Port": port, "AllowStore": True}
            for name, (aet, host, port) in modalities.items()
        },
        "StableAge": stable_age_s,
        "LuaScripts": [str(lua)] if lua else [],
        "Plugins": ["/usr/share/orthanc/plugins"] if Path("/usr/share/orthanc/plugins").is_dir() else [],
        "DicomWeb": {"Enable": True},
        "ConcurrentJobs": 2,
        **({"AuthenticationEnabled": True, "RegisteredUsers": dict(users)} if users else {}),
        **(extra or {}),
    }
    config = {key: value for key, value in config.items() if value is not None}
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "orthanc.json").write_text(json.dumps(config, indent=2))
    proc = spawn("orthanc", [binary, str(workdir / "orthanc.json")], workdir, {"TCP_NODELAY": "1"})
    orthanc = Orthanc(proc, http_port, dicom_port, auth=next(iter(users.items())) if users else None)

    def up() -> bool:
        try:
            orthanc.request("GET", "/system")
            return True
        except (urllib.error.URLError, ConnectionError):
            if proc.popen.poll() is not None:
                raise RuntimeError(f"Orthanc exited: {proc.log()[-2000:]}") from None
            return False

    wait_until(up, 60, "Orthanc REST API")
    return orthanc


def start_storescp(
    workdir: Path, ae_title: str = "STORESCP", port: int = 0, options: Sequence[str] = ("+xa",)
) -> tuple[Process, int, Path]:
    """dcmtk storescp as a stand-in PACS; received files land in workdir/received. `options`: storescp's own (by
    default +xa: every transfer syntax accepted)."""
    port = port or free_port()
    received = workdir / "received"
    received.mkdir(parents=True, exist_ok=True)
    argv = [require_binary("storescp"), "-aet", ae_title, "-od", str(received), *options, str(port)]
    proc = spawn("storescp", argv, workdir, {"TCP_NODELAY": "1"})
    wait_until(lambda: port_open(port), 20, "storescp")
    return proc, port, received


def pacsai_env(data_dir: Path, *, port: int, peers: str, broker_url: str = "", **extra: str) -> dict[str, str]:
    env = {
        "PACSAI_DATA_DIR": str(data_dir),
        "PACSAI_PORT": str(port),
        "PACSAI_BIND_HOST": "127.0.0.1",
        "PACSAI_PEERS": peers,
        "PACSAI_QUIET_PERIOD_S": "10",
        "PACSAI_RELEASE_GRACE_S": "1",
        "PACSAI_SPOOL_RESERVE_MB": "64",
        "PACSAI_LOG_KEY": "test-log-key",
        "PACSAI_SEND_BACKOFF_S": "1",
        "PYTHONUNBUFFERED": "1",
        **extra,
    }
    if broker_url:
        env["PACSAI_BROKER_URL"] = broker_url
    return env


def run_cli(*args: str, env: Mapping[str, str], timeout_s: float = 60) -> subprocess.CompletedProcess[str]:
    """Run `pacsai <args>` to its end with only this environment (plus our PYTHONPATH; PATH /usr/bin unless given)."""
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout_s,
        cwd=REPO,
        env={"PATH": "/usr/bin", **env, "PYTHONPATH": str(REPO)},
    )


def status_counts(env: Mapping[str, str]) -> dict[str, dict[str, int]]:
    """`pacsai status --json`: counts by table and state."""
    run = run_cli("status", "--json", env=env)
    assert run.returncode == 0, run.stderr[-2000:]
    counts: dict[str, dict[str, int]] = json.loads(run.stdout)
    return counts


def send_folder(port: int, folder: Path, *, calling: str = "STORESCU", called: str = "PACSAI") -> None:
    """dcmtk storescu: every file under `folder` in one association (proposing what each file is)."""
    subprocess.run(
        ["storescu", "-xv", "-aet", calling, "-aec", called, "+sd", "127.0.0.1", str(port), str(folder)],
        check=True,
        timeout=120,
        capture_output=True,
    )


DIMSE_STATUS = re.compile(r"DIMSE Status\s*:\s*0x([0-9a-fA-F]{4})")  # a reply's status in storescu's -d output


def store_statuses(
    port: int, files: Sequence[Path], *, calling: str, called: str = "PACSAI", propose: str = "-xv"
) -> list[int]:
    """dcmtk storescu: `files` in order on one association, carrying on after a refusal; the status of each reply.
    `propose`: storescu's transfer syntax option (-xv: JPEG 2000 lossless and the uncompressed ones).

    For tests that assert the status of every C-STORE: a pynetdicom SCU sometimes loses a fast reply (its reactor
    thread can take the reply off the queue before send_c_store waits for it, cf. pydicom/pynetdicom#875) and then
    waits out its DIMSE timeout."""
    run = subprocess.run(
        [require_binary("storescu"), "-d", "-nh", propose, "-aet", calling, "-aec", called, "127.0.0.1", str(port)]
        + [str(f) for f in files],
        timeout=300,
        capture_output=True,
    )
    output = (run.stdout + run.stderr).decode("utf-8", "replace")
    return [int(code, 16) for code in DIMSE_STATUS.findall(output)]


def files_arrived(inbox: Path, count: int, timeout_s: float = 300) -> list[Path]:
    """Wait until `inbox` (a storescp's folder) holds at least `count` files; return them."""

    def arrived() -> list[Path]:
        files = [p for p in inbox.iterdir() if p.is_file()]
        return files if len(files) >= count else []

    found: list[Path] = wait_until(arrived, timeout_s, f"{count} files at storescp", 1.0)
    return found


def start_pacsai(command: str, workdir: Path, env: Mapping[str, str], *, repo: Path = REPO) -> Process:
    """Start `pacsai node`, `pacsai worker` or `pacsai run` as a process with the given PACSAI_* environment
    (`repo`: the code of another checkout, e.g. a benchmark's `git worktree` of an earlier commit)."""
    proc = spawn(
        f"pacsai-{command}",
        [sys.executable, "-m", "worker.cli", command],
        workdir,
        {**env, "PYTHONPATH": str(repo)},
    )
    if command in ("node", "run"):
        port = int(env["PACSAI_PORT"])

        def listening() -> bool:
            if proc.popen.poll() is not None:
                raise RuntimeError(f"pacsai node exited: {proc.log()[-3000:]}")
            return port_open(port)

        wait_until(listening, 60, "pacsai node")
    return proc


@contextmanager
def supervised(*started: Process) -> Iterator[list[Process]]:
    """Stop every process appended to the list at the end; print their logs when the block fails."""
    processes = list(started)
    try:
        yield processes
    except BaseException:
        for proc in processes:
            print(f"----- {proc.name} log -----\n{proc.log()[-6000:]}")
        raise
    finally:
        for proc in reversed(processes):
            proc.stop()


def redis_dump(url: str, password: str | None = None) -> str:
    """Every key and value in Redis, as text (for checks that nothing private is on the queue)."""
    import redis

    client = redis.Redis.from_url(url, password=password)
    readers: dict[str, Callable[[Any], Any]] = {
        "string": client.get,
        "hash": client.hgetall,
        "set": client.smembers,
        "list": lambda key: client.lrange(key, 0, -1),
        "zset": lambda key: client.zrange(key, 0, -1),
    }
    parts = []
    for key in client.scan_iter():
        kind = client.type(key)
        read = readers.get(kind.decode() if isinstance(kind, bytes) else str(kind))
        parts.append(f"{key!r} {read(key) if read else b''!r}")
    return "\n".join(parts)
