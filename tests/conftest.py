"""Shared fixtures: real services on free loopback ports; missing services skip locally and fail in CI."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.services import SHARED, Process, ServiceMissing, require_binary, start_redis, start_storescp
from tests.stack import Stack, StoreScpPacs, stack_env
from worker.load_volume import load_series
from worker.volume import Volume

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def need(binary: str) -> str:
    """Return the binary's path; skip the test when it is missing, except in CI where that is a failure."""
    try:
        return require_binary(binary)
    except ServiceMissing as exc:
        if IN_CI:
            pytest.fail(f"{exc} (CI=true: a missing service is a failure)")
        pytest.skip(str(exc))


@pytest.fixture(scope="session")
def shared() -> Path:
    if not (SHARED / "dicom").is_dir():
        if IN_CI:
            pytest.fail(f"shared test data not found at {SHARED}")
        pytest.skip(f"shared test data not found at {SHARED}")
    return SHARED


@pytest.fixture(scope="session")
def ct_series(shared: Path) -> Path:
    return shared / "dicom" / "totalsegmentator-ct-abdomen"


@pytest.fixture(scope="module")
def ct(ct_series: Path) -> Volume:
    """That CT series loaded as the worker loads it (one per test module: a module may change it)."""
    return load_series(sorted(ct_series.iterdir()))


@pytest.fixture()
def redis_url(tmp_path: Path) -> Iterator[str]:
    need("redis-server")
    proc: Process
    proc, url = start_redis(tmp_path / "redis")
    yield url
    proc.stop()


@pytest.fixture()
def pacs(tmp_path: Path) -> Iterator[StoreScpPacs]:
    """dcmtk storescp as the PACS (AE title STORESCU, as the tests' storescu calls itself)."""
    need("storescp"), need("storescu")
    process, port, inbox = start_storescp(tmp_path / "pacs", ae_title="STORESCU")
    yield StoreScpPacs(process, port, inbox, "STORESCU")
    process.stop()


@pytest.fixture()
def stack(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., Stack]]:
    """Make pacsai stacks: `stack(peers=..., broker_url=..., PACSAI_X=...)`, then `.start("node")` etc.

    Every process is stopped at teardown; when the test failed, their logs are printed."""
    made: list[Stack] = []

    def make(*, peers: str, broker_url: str = "", data: Path | None = None, port: int = 0, **extra: str) -> Stack:
        env = stack_env(data or tmp_path / "data", peers=peers, broker_url=broker_url, port=port, **extra)
        made.append(Stack(tmp_path, env))
        return made[-1]

    yield make
    report = getattr(request.node, "call_report", None)
    for one in made:
        if report is not None and report.failed:
            print(one.logs())
        one.stop()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    if call.when == "call":
        item.call_report = outcome.get_result()  # type: ignore[attr-defined]


POSTGRES_ADMIN_URL = os.environ.get("PACSAI_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(params=["sqlite", "postgres"])
def database(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A fresh database for State: a SQLite file, or a new PostgreSQL database on the machine's server."""
    if request.param == "sqlite":
        yield str(tmp_path / "state.db")
        return
    import uuid

    import psycopg

    name = f"pacsai_test_{uuid.uuid4().hex[:12]}"
    try:
        admin = psycopg.connect(POSTGRES_ADMIN_URL, autocommit=True, connect_timeout=5)
    except psycopg.OperationalError as exc:
        if IN_CI:
            pytest.fail(f"PostgreSQL not reachable at {POSTGRES_ADMIN_URL} ({type(exc).__name__})")
        pytest.skip("PostgreSQL not reachable")
    admin.execute(f"CREATE DATABASE {name}")
    try:
        yield POSTGRES_ADMIN_URL.rsplit("/", 1)[0] + f"/{name}"
    finally:
        admin.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        admin.close()


_catalogue_results: dict[str, dict[str, object]] = {}


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Record the outcome of tests marked with fault-catalogue ids (for scripts/reliability_report.py).

    The ids travel in `user_properties`, which pytest-xdist carries from its workers to the controlling process.
    """
    ids = next((value for name, value in report.user_properties if name == "catalogue"), None)
    if not ids or (report.when != "call" and not (report.when == "setup" and not report.passed)):
        return
    entry = _catalogue_results.setdefault(report.nodeid, {"ids": list(ids), "outcome": "passed"})  # type: ignore[call-overload]
    if not report.passed:
        entry["outcome"] = report.outcome


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        ids = [i for mark in item.iter_markers("catalogue") for i in mark.args]
        if ids:
            item.user_properties.append(("catalogue", ids))


def pytest_sessionfinish(session: pytest.Session) -> None:
    target = os.environ.get("PACSAI_RELIABILITY_JSON")
    if target and not hasattr(session.config, "workerinput"):  # the controller, or a run without xdist
        import json

        Path(target).write_text(json.dumps(_catalogue_results, indent=1))
