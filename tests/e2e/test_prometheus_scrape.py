"""Debian's real Prometheus scrapes a running node's /metrics every second; PromQL over its HTTP API sees the study."""

from __future__ import annotations

import json
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import need
from tests.services import REPO, Process, free_port, port_open, spawn, wait_until
from tests.stack import Stack, StoreScpPacs

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
ALERTS = REPO / "deploy" / "prometheus" / "alerts.yml"
DASHBOARD = REPO / "deploy" / "grafana" / "pacsai-dashboard.json"
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "30s", "$model": ".*"}


class Prometheus:
    """/usr/bin/prometheus on a free loopback port with its own storage, scraping `targets` every second."""

    def __init__(self, workdir: Path, node_metrics_port: int) -> None:
        self.port = free_port()
        config = {
            "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
            "rule_files": [str(ALERTS)],
            "scrape_configs": [
                {
                    "job_name": "pacsai-node",
                    "metrics_path": "/metrics",
                    "static_configs": [{"targets": [f"127.0.0.1:{node_metrics_port}"]}],
                }
            ],
        }
        workdir.mkdir(parents=True, exist_ok=True)
        (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
        argv = [
            need("prometheus"),
            f"--config.file={workdir / 'prometheus.yml'}",
            f"--storage.tsdb.path={workdir / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ]
        self.process: Process = spawn("prometheus", argv, workdir)
        wait_until(self._ready, 60, "Prometheus ready")

    def _ready(self) -> bool:
        if self.process.popen.poll() is not None:
            raise RuntimeError(f"prometheus exited: {self.process.log()[-2000:]}")
        if not port_open(self.port):
            return False
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/-/ready", timeout=5) as response:
            return bool(response.status == 200)

    def query(self, promql: str) -> list[dict[str, Any]]:
        """An instant query over the HTTP API; the vector's samples."""
        url = f"http://127.0.0.1:{self.port}/api/v1/query?" + urllib.parse.urlencode({"query": promql})
        with urllib.request.urlopen(url, timeout=10) as response:
            answer = json.load(response)
        assert answer["status"] == "success", answer
        assert answer["data"]["resultType"] == "vector", answer
        result: list[dict[str, Any]] = answer["data"]["result"]
        return result

    def get(self, path: str) -> Any:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}{path}", timeout=10) as response:
            return json.load(response)

    def wait_for(self, promql: str, check: Callable[[list[dict[str, Any]]], bool], timeout_s: float) -> Any:
        def ready() -> list[dict[str, Any]] | None:
            result = self.query(promql)
            return result if check(result) else None

        return wait_until(ready, timeout_s, f"PromQL {promql!r}", 1.0)


@pytest.fixture()
def monitored(
    tmp_path: Path, stack: Callable[..., Stack], pacs: StoreScpPacs
) -> Iterator[tuple[Stack, Prometheus, StoreScpPacs]]:
    """A node with its metrics endpoint on a free loopback port, and a Prometheus scraping it."""
    need("storescu")
    metrics_port = free_port()
    pacsai = stack(peers=pacs.peer, PACSAI_METRICS_HOST="127.0.0.1", PACSAI_METRICS_PORT=str(metrics_port))
    pacsai.start("node")
    wait_until(lambda: port_open(metrics_port), 30, "the node's metrics endpoint")
    prometheus = Prometheus(tmp_path / "prometheus", metrics_port)
    pacsai.adopt(prometheus.process)
    yield pacsai, prometheus, pacs


def value(sample: dict[str, Any]) -> float:
    return float(sample["value"][1])


def test_prometheus_scrapes_instances_received(
    monitored: tuple[Stack, Prometheus, StoreScpPacs], ct_series: Path
) -> None:
    """After a study is sent, Prometheus's own query says the node stored every instance of it."""
    pacsai, prometheus, pacs = monitored
    prometheus.wait_for('up{job="pacsai-node"}', lambda r: len(r) == 1 and value(r[0]) == 1, 30)
    files = sorted(path for path in ct_series.iterdir() if path.is_file())
    pacsai.send(files, pacs.ae_title)
    promql = 'sum(pacsai_instances_received_total{job="pacsai-node", outcome="success"})'
    (sample,) = prometheus.wait_for(promql, lambda r: len(r) == 1 and value(r[0]) >= len(files), 60)
    assert value(sample) == len(files)
    (total,) = prometheus.query("sum(pacsai_instances_received_total) > 0")
    assert value(total) == len(files)  # nothing refused


def test_per_stage_histogram_after_a_study(monitored: tuple[Stack, Prometheus, StoreScpPacs], ct_series: Path) -> None:
    """A study through node and worker: `sum by (stage) (pacsai_stage_seconds_count)` has its stages."""
    pacsai, prometheus, pacs = monitored
    pacsai.start("worker")
    pacsai.send(sorted(path for path in ct_series.iterdir() if path.is_file()), pacs.ae_title)
    pacsai.wait_jobs({"delivered": 1}, timeout_s=240)
    promql = "sum by (stage) (pacsai_stage_seconds_count)"

    def has_stages(result: list[dict[str, Any]]) -> bool:
        stages = {sample["metric"].get("stage") for sample in result}
        return {"receive_to_complete", "end_to_end"} <= stages

    result = prometheus.wait_for(promql, has_stages, 60)
    counts = {sample["metric"]["stage"]: value(sample) for sample in result}
    assert counts["receive_to_complete"] >= 1 and counts["end_to_end"] >= 1
    (model,) = {s["metric"]["model"] for s in prometheus.query("pacsai_stage_seconds_count{stage='end_to_end'}")}
    assert model == "ct-organs-tiny"


def test_dashboard_queries_and_alert_rules_run_on_real_data(
    monitored: tuple[Stack, Prometheus, StoreScpPacs], ct_series: Path
) -> None:
    """Every dashboard query runs on the node's real series; every alert rule evaluates; with no worker, the
    worker-missing alert is pending and nothing about deliveries or peers is."""
    pacsai, prometheus, pacs = monitored
    pacsai.send(sorted(path for path in ct_series.iterdir() if path.is_file())[:3], pacs.ae_title)
    prometheus.wait_for("pacsai_instances_received_total", lambda r: len(r) >= 1, 30)
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, replacement in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, replacement)
            prometheus.query(expr)  # raises unless Prometheus answers with a vector
    assert prometheus.query('max by (state) (pacsai_jobs{job="pacsai-node"})') is not None

    def evaluated() -> dict[str, dict[str, Any]] | None:
        groups = prometheus.get("/api/v1/rules")["data"]["groups"]
        rules = {rule["name"]: rule for group in groups for rule in group["rules"]}
        return (
            rules
            if rules and all(rule.get("lastEvaluation", "0001").startswith("20") for rule in rules.values())
            else None
        )

    rules = wait_until(evaluated, 30, "the alert rules evaluated")
    assert {name: rule["health"] for name, rule in rules.items()} == dict.fromkeys(rules, "ok")
    alerts = {
        alert["labels"]["alertname"]: alert["state"] for alert in prometheus.get("/api/v1/alerts")["data"]["alerts"]
    }
    assert alerts.get("PacsaiWorkerMissing") == "pending"
    assert not {"PacsaiDeliveriesFailing", "PacsaiSpoolFull", "PacsaiNodeDown"} & set(alerts)
