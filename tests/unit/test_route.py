"""Routing rules: YAML → rules → models for a series header."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from dicom_node.route import SeriesHeader, load_rules, parse_rules, route
from pacsai.errors import ConfigError
from pacsai.settings import Settings

CT = "1.2.840.10008.5.1.4.1.1.2"


def header(**changes: object) -> SeriesHeader:
    values: dict[str, object] = {
        "modality": "CT",
        "sop_class": CT,
        "body_part": "ABDOMEN",
        "series_description": "Abdomen 2.0 Br38",
        "instances": 20,
        "calling_ae": "ORTHANC",
        "called_ae": "PACSAI",
    }
    values.update(changes)
    return SeriesHeader(**values)  # type: ignore[arg-type]


RULES = parse_rules(
    yaml.safe_load("""
rules:
  - {model: ct-organs, match: {modality: [ct], sop_class: [1.2.840.10008.5.1.4.1.1.2], min_instances: 10}}
  - {model: chest, match: {body_part: [CHEST, THORAX], series_description: "lung|chest"}}
  - {model: ct-organs, match: {calling_ae: [OTHERPACS]}}
  - {model: research, match: {called_ae: [PACSAI_RESEARCH], max_instances: 5}}
""")
)


def test_each_key_selects() -> None:
    assert route(RULES, header()) == ("ct-organs",)
    assert route(RULES, header(instances=9)) == ()
    assert route(RULES, header(modality="MR")) == ()
    assert route(RULES, header(body_part="chest", series_description="LUNG 1mm")) == ("ct-organs", "chest")
    assert route(RULES, header(modality="MR", calling_ae="OTHERPACS")) == ("ct-organs",)
    assert route(RULES, header(modality="MR", called_ae="PACSAI_RESEARCH", instances=5)) == ("research",)
    assert route(RULES, header(modality="MR", called_ae="PACSAI_RESEARCH", instances=6)) == ()


def test_shipped_rules_route_the_ct_series_and_skip_localizers() -> None:
    rules = load_rules(Settings.from_env({"PACSAI_DATA_DIR": "/tmp"}).node.routes_file)
    assert route(rules, header()) == ("ct-organs-tiny",)
    assert route(rules, header(series_description="Topogram 0.6 T20f")) == ()
    assert route(rules, header(modality="SEG", sop_class="1.2.840.10008.5.1.4.1.1.66.4")) == ()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("rules: [{match: {modality: [CT]}}]", "needs a 'model'"),
        ("rules: [{model: m, match: {colour: [red]}}]", "unknown match key"),
        ("rules: [{model: m, match: {series_description: '(unclosed'}}]", "rule 1"),
        ("just text", "expected a mapping"),
    ],
)
def test_bad_rules_are_named(text: str, message: str, tmp_path: Path) -> None:
    path = tmp_path / "routes.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_rules(path)
