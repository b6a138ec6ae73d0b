"""Deployment files checked by the tools that run them: promtool for Prometheus rules and the dashboard's PromQL, the
compose-spec schema for docker/compose.yml, Kubernetes' own schemas for deploy/k8s, and their cross-references."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from dicom_node.route import parse_rules
from pacsai.profiles import parse_profiles
from tests.conftest import IN_CI, need
from tests.services import REPO

pytestmark = [pytest.mark.integration]

PROMETHEUS = REPO / "deploy" / "prometheus"
GRAFANA = REPO / "deploy" / "grafana"
COMPOSE = REPO / "docker" / "compose.yml"
K8S = REPO / "deploy" / "k8s"
# Grafana's variables, as Grafana substitutes them, so each expression is plain PromQL for promtool
GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$__interval": "30s", "$__range": "1h", "$model": ".*"}
PACSAI_IMAGE_SERVICES = ("node", "worker", "worker-gpu", "flower", "web")
REQUIRED_ALERTS = (
    "PacsaiJobStuck",
    "PacsaiDeliveriesFailing",
    "PacsaiSpoolReserveNear",
    "PacsaiPeerDown",
    "PacsaiWorkerMissing",
    "PacsaiNoticesFailing",  # pacsai_notices{state="<channel>_failed"} (HL7/FHIR to the RIS/EHR)
    "PacsaiDeliveryNotVerified",  # pacsai_verifications{state="failed"} (proof of delivery given up)
)


def need_module(name: str) -> None:
    """Skip when a Python package of the `test` extra is missing; in CI that is a failure."""
    if importlib.util.find_spec(name) is None:
        message = f"Python package {name} is not installed (pip install -e '.[test]')"
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)


def promtool(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run([need("promtool"), *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def readme_variables() -> set[str]:
    return set(re.findall(r"PACSAI_[A-Z0-9_]+", (REPO / "README.md").read_text(encoding="utf-8")))


# ---------------------------------------------------------------- Prometheus


def test_prometheus_config_passes_promtool() -> None:
    result = promtool("check", "config", str(PROMETHEUS / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout + result.stderr


def test_prometheus_scrapes_node_and_workers_by_job() -> None:
    config = yaml.safe_load((PROMETHEUS / "prometheus.yml").read_text())
    jobs = {scrape["job_name"]: scrape for scrape in config["scrape_configs"]}
    assert {"pacsai-node", "pacsai-worker"} <= set(jobs)
    assert jobs["pacsai-node"]["metrics_path"] == "/metrics"
    worker_names = {name for sd in jobs["pacsai-worker"]["dns_sd_configs"] for name in sd["names"]}
    compose_services = set(yaml.safe_load(COMPOSE.read_text())["services"])
    assert worker_names == {"worker", "worker-gpu"} <= compose_services
    assert config["rule_files"] == ["alerts.yml"]


def test_alert_rules_pass_promtool_check() -> None:
    result = promtool("check", "rules", str(PROMETHEUS / "alerts.yml"))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 10 rules found" in result.stdout


def test_alert_rules_unit_tests_pass() -> None:
    """alerts_test.yml: each alert fires on its condition (after its `for`) and stays quiet otherwise."""
    result = promtool("test", "rules", "alerts_test.yml", cwd=PROMETHEUS)
    assert result.returncode == 0, result.stdout + result.stderr
    tested = set(re.findall(r"alertname: (\w+)", (PROMETHEUS / "alerts_test.yml").read_text()))
    assert set(REQUIRED_ALERTS) <= tested


def test_every_alert_has_a_severity_and_explains_itself() -> None:
    rules = [
        rule for group in yaml.safe_load((PROMETHEUS / "alerts.yml").read_text())["groups"] for rule in group["rules"]
    ]
    by_name = {rule["alert"]: rule for rule in rules}
    assert set(REQUIRED_ALERTS) <= set(by_name)
    for rule in rules:
        assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
        assert rule["annotations"]["summary"] and len(rule["annotations"]["description"]) > 60, rule["alert"]
    assert "pacsai_deliveries_failing > 0" in by_name["PacsaiDeliveriesFailing"]["expr"]
    assert "pacsai_spool_free_bytes < 2 * pacsai_spool_reserve_bytes" in by_name["PacsaiSpoolReserveNear"]["expr"]
    assert (
        by_name["PacsaiPeerDown"]["expr"] == "pacsai_peer_reachable == 0" and by_name["PacsaiPeerDown"]["for"] == "5m"
    )
    assert "absent(pacsai_workers_online)" in by_name["PacsaiWorkerMissing"]["expr"]


# ---------------------------------------------------------------- Grafana


def dashboard_expressions(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(panel title, PromQL with Grafana's variables substituted) for every target of every panel."""
    panels = [*dashboard["panels"], *(p for row in dashboard["panels"] for p in row.get("panels", []))]
    for panel in panels:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            yield panel["title"], expr


def check_as_recording_rules(expressions: list[str], tmp_path: Path) -> subprocess.CompletedProcess[str]:
    rules = [{"record": f"pacsai:dashboard_check:{i}", "expr": expr} for i, expr in enumerate(expressions)]
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    return promtool("check", "rules", str(path))


def test_dashboard_promql_passes_promtool(tmp_path: Path) -> None:
    dashboard = json.loads((GRAFANA / "pacsai-dashboard.json").read_text())
    expressions = [expr for _, expr in dashboard_expressions(dashboard)]
    assert len(expressions) >= 20
    assert not [expr for expr in expressions if "$" in expr], "a Grafana variable was left unsubstituted"
    result = check_as_recording_rules(expressions, tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(expressions)} rules found" in result.stdout


def test_a_wrong_dashboard_expression_is_caught(tmp_path: Path) -> None:
    """The check above is not vacuous: promtool refuses PromQL with a syntax error."""
    result = check_as_recording_rules(["sum by (stage) (rate(pacsai_stage_seconds_count[5m])"], tmp_path)
    assert result.returncode != 0
    assert "parse error" in result.stdout + result.stderr


def test_dashboard_has_the_overview_panels_on_the_provisioned_datasource() -> None:
    dashboard = json.loads((GRAFANA / "pacsai-dashboard.json").read_text())
    datasource = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "pacsai.yml").read_text())["datasources"][0]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)) and dashboard["uid"] and dashboard["schemaVersion"] >= 36
    text = " ".join(expr for _, expr in dashboard_expressions(dashboard))
    for metric in (
        "pacsai_instances_received_total",
        "pacsai_queue_depth",
        "pacsai_jobs",
        "pacsai_stage_seconds_bucket",
        "pacsai_deliveries_failing",
        "pacsai_peer_reachable",
        "pacsai_spool_free_bytes",
        "pacsai_spool_reserve_bytes",
        "pacsai_workers_online",
        "pacsai_worker_model_loaded",
    ):
        assert metric in text, metric
    assert "histogram_quantile(0.5," in text and "histogram_quantile(0.95," in text
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
            assert {"x", "y", "w", "h"} <= set(panel["gridPos"]), panel["title"]
    provider = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "pacsai.yml").read_text())["providers"][0]
    grafana = yaml.safe_load(COMPOSE.read_text())["services"]["grafana"]
    mounted = {volume.split(":")[1] for volume in grafana["volumes"]}
    assert f"{provider['options']['path']}/pacsai-dashboard.json" in mounted


# ---------------------------------------------------------------- compose


def compose() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE.read_text())
    return loaded


def test_compose_file_matches_the_compose_spec_schema() -> None:
    need_module("check_jsonschema")
    argv = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec", str(COMPOSE)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr


def test_compose_services_profiles_and_health_checks() -> None:
    services = compose()["services"]
    assert {"redis", "node", "worker", "worker-gpu", "flower", "web", "orthanc", "prometheus", "grafana"} <= set(
        services
    )
    profiles = {name: tuple(service.get("profiles", ())) for name, service in services.items()}
    assert profiles["orthanc"] == ("demo",) and profiles["worker-gpu"] == ("gpu",)
    assert profiles["prometheus"] == profiles["grafana"] == ("monitoring",)
    assert not any(profiles[name] for name in ("redis", "node", "worker", "flower", "web"))
    for name, service in services.items():
        check = service.get("healthcheck")
        assert check and check["test"][0] in ("CMD", "CMD-SHELL") and len(check["test"]) > 1, name
    assert services["web"]["command"] == ["web"] and services["web"]["ports"] == ["127.0.0.1:8080:8080"]
    orthanc = services["orthanc"]
    assert orthanc["environment"]["TCP_NODELAY"] == "1"
    assert any(volume.startswith("../deploy/orthanc/pacsai-autoroute.lua:") for volume in orthanc["volumes"])
    assert '"/etc/orthanc/pacsai-autoroute.lua"' in orthanc["environment"]["ORTHANC_JSON"]
    modalities = json.loads(orthanc["environment"]["ORTHANC_JSON"])["DicomModalities"]
    lua = (REPO / "deploy" / "orthanc" / "pacsai-autoroute.lua").read_text()
    (routed_to,) = re.findall(r"^PACSAI_MODALITY = '(\w+)'", lua, flags=re.MULTILINE)
    assert modalities[routed_to] == {
        "AET": "PACSAI",
        "Host": "node",
        "Port": 11112,
        "AllowStore": True,
        "AllowEcho": True,
    }


def test_compose_gpu_worker_reserves_an_nvidia_device() -> None:
    gpu = compose()["services"]["worker-gpu"]
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices == [{"driver": "nvidia", "count": 1, "capabilities": ["gpu"]}]
    assert gpu["environment"]["PACSAI_DEVICE"] == "cuda" and gpu["environment"]["PACSAI_WORKER_MODELS"]
    assert "deploy" not in compose()["services"]["worker"]


def test_compose_volumes_secrets_and_mounted_files_exist() -> None:
    spec = compose()
    for name, service in spec["services"].items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE.parent / source).exists(), f"{name}: {source} does not exist"
            else:
                assert source in spec["volumes"], f"{name}: volume {source} is not declared"
        for secret in service.get("secrets", []):
            assert secret in spec["secrets"], f"{name}: secret {secret} is not declared"
        for dependency in service.get("depends_on", {}):
            assert dependency in spec["services"], f"{name} depends on unknown {dependency}"
    prometheus = spec["services"]["prometheus"]
    assert "../deploy/prometheus:/etc/prometheus:ro" in prometheus["volumes"]


def test_compose_pacsai_environment_is_documented() -> None:
    """Every variable a pacsai container gets (and every ${…} substituted into them) is a documented PACSAI_ one."""
    documented, services = readme_variables(), compose()["services"]
    for name in PACSAI_IMAGE_SERVICES:
        environment = services[name].get("environment", {})
        assert environment, name
        for variable, value in environment.items():
            assert variable.startswith("PACSAI_") and variable in documented, f"{name}: {variable} is not in README"
            for substituted in re.findall(r"\$\{(\w+)", str(value)):
                assert substituted in documented, f"{name}: ${{{substituted}}} is not in README"
        assert environment["PACSAI_BROKER_PASSWORD_FILE"].startswith("/run/secrets/"), name
        assert not [variable for variable in environment if variable.endswith("PASSWORD")], name


# ---------------------------------------------------------------- Kubernetes


def k8s_resources() -> list[tuple[str, dict[str, Any]]]:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    return [
        (file, document)
        for file in kustomization["resources"]
        for document in yaml.safe_load_all((K8S / file).read_text())
        if document
    ]


def workloads() -> dict[str, dict[str, Any]]:
    return {doc["metadata"]["name"]: doc for _, doc in k8s_resources() if doc["kind"] in ("Deployment", "StatefulSet")}


def test_kustomization_lists_every_manifest() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    on_disk = {path.name for path in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == on_disk
    assert kustomization["namespace"] == "pacsai"


def test_k8s_manifests_validate_against_kubernetes_schemas() -> None:
    """Strict: an unknown or misspelt field fails, not only a wrong type."""
    need_module("kubernetes_validate")
    import kubernetes_validate

    version = kubernetes_validate.latest_version()
    kinds = []
    for file, document in k8s_resources():
        try:
            kubernetes_validate.validate(document, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            pytest.fail(f"{file} {document['kind']}/{document['metadata']['name']}: {exc.message}")
        kinds.append(document["kind"])
    assert {"StatefulSet", "Deployment", "Service", "ConfigMap", "PersistentVolumeClaim"} <= set(kinds)


def test_k8s_validation_catches_a_misspelt_field() -> None:
    need_module("kubernetes_validate")
    import kubernetes_validate

    node = json.loads(json.dumps(workloads()["pacsai-node"]))
    node["spec"]["template"]["spec"]["containers"][0]["resource"] = node["spec"]["template"]["spec"]["containers"][
        0
    ].pop("resources")
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(node, kubernetes_validate.latest_version(), strict=True)


def test_k8s_has_the_site_components() -> None:
    found = workloads()
    assert found["pacsai-node"]["kind"] == "StatefulSet"
    assert found["pacsai-postgres"]["kind"] == "StatefulSet" and found["pacsai-redis"]["kind"] == "StatefulSet"
    assert {"pacsai-worker-gpu", "pacsai-worker-cpu", "pacsai-flower", "pacsai-web"} <= set(found)
    services = {doc["metadata"]["name"]: doc for _, doc in k8s_resources() if doc["kind"] == "Service"}
    dicom = services["pacsai-node"]["spec"]
    assert [port["port"] for port in dicom["ports"]] == [11112] and dicom["externalTrafficPolicy"] == "Local"
    assert {port["port"] for port in services["pacsai-node-internal"]["spec"]["ports"]} == {11112, 9100}
    assert found["pacsai-node"]["spec"]["serviceName"] == "pacsai-node-internal"
    redis = found["pacsai-redis"]["spec"]["template"]["spec"]["containers"][0]
    assert (
        "appendonly yes" in redis["args"][0] and "requirepass" in redis["args"][0] and "noeviction" in redis["args"][0]
    )


def test_k8s_worker_groups_gpu_limits_and_models() -> None:
    found, installed = workloads(), {path.parent.name.replace("_", "-") for path in REPO.glob("models/*/spec.yaml")}
    served: set[str] = set()
    for name, expect_gpu in (("pacsai-worker-gpu", True), ("pacsai-worker-cpu", False)):
        container = found[name]["spec"]["template"]["spec"]["containers"][0]
        env = {item["name"]: item["value"] for item in container["env"]}
        models = set(env["PACSAI_WORKER_MODELS"].split(","))
        assert models <= installed, f"{name} serves models that are not installed: {models - installed}"
        served |= models
        limits = container["resources"]["limits"]
        assert ("nvidia.com/gpu" in limits) is expect_gpu, name
        assert env["PACSAI_DEVICE"] == ("cuda" if expect_gpu else "cpu")
    assert served == installed, "every installed model has a worker group"


def test_k8s_references_resolve() -> None:
    """ConfigMaps, Secrets and claims that pods name exist; every Service selects a workload; PACSAI_ names are real."""
    resources = k8s_resources()
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    config_maps = {doc["metadata"]["name"]: doc for _, doc in resources if doc["kind"] == "ConfigMap"}
    secrets = {gen["name"]: {f.split("=")[0] for f in gen["files"]} for gen in kustomization["secretGenerator"]}
    claims = {doc["metadata"]["name"] for _, doc in resources if doc["kind"] == "PersistentVolumeClaim"}
    documented = readme_variables()
    for name, workload in workloads().items():
        pod = workload["spec"]["template"]["spec"]
        templates = {claim["metadata"]["name"] for claim in workload["spec"].get("volumeClaimTemplates", [])}
        for volume in pod.get("volumes", []):
            if "configMap" in volume:
                assert volume["configMap"]["name"] in config_maps, name
            if "secret" in volume:
                keys = {item["key"] for item in volume["secret"].get("items", [])}
                assert keys <= secrets[volume["secret"]["secretName"]], name
            if "persistentVolumeClaim" in volume:
                assert volume["persistentVolumeClaim"]["claimName"] in claims, name
        for container in pod["containers"]:
            mounted = {mount["name"] for mount in container.get("volumeMounts", [])}
            assert mounted <= {volume["name"] for volume in pod.get("volumes", [])} | templates, name
            for source in container.get("envFrom", []):
                assert source["configMapRef"]["name"] in config_maps, name
            for item in container.get("env", []):
                assert not item["name"].startswith("PACSAI_") or item["name"] in documented, item["name"]
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, name
        assert pod["securityContext"]["runAsNonRoot"] is True, name
    labels = [workload["spec"]["template"]["metadata"]["labels"] for workload in workloads().values()]
    for _, service in (item for item in resources if item[1]["kind"] == "Service"):
        selector = service["spec"]["selector"].items()
        assert any(selector <= pod_labels.items() for pod_labels in labels), service["metadata"]["name"]
    env = config_maps["pacsai-env"]["data"]
    assert set(env) <= documented, set(env) - documented
    for variable in ("PACSAI_BROKER_PASSWORD_FILE", "PACSAI_DATABASE_URL_FILE", "PACSAI_LOG_KEY_FILE"):
        key = env[variable].removeprefix("/run/secrets/pacsai/")
        assert key in secrets["pacsai-secrets"], variable


def test_k8s_routes_and_profiles_parse_with_pacsai_itself() -> None:
    rules_map = {doc["metadata"]["name"]: doc for _, doc in k8s_resources() if doc["kind"] == "ConfigMap"}
    data = rules_map["pacsai-rules"]["data"]
    rules = parse_rules(yaml.safe_load(data["routes.yaml"]), source="pacsai-rules")
    assert {rule.model for rule in rules} == {"ct-organs-tiny", "cxr-pneumonia"}
    parse_profiles(yaml.safe_load(data["profiles.yaml"]))
    env = rules_map["pacsai-env"]["data"]
    assert (
        env["PACSAI_ROUTES_FILE"] == "/etc/pacsai/routes.yaml"
        and env["PACSAI_PROFILES_FILE"] == "/etc/pacsai/profiles.yaml"
    )
