"""Routing: pure rules from a YAML file, series header → model names."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from worker.errors import ConfigError

_LIST_KEYS = {"modality": "Modality", "sop_class": "SOPClassUID", "body_part": "BodyPartExamined",
              "calling_ae": "calling_ae", "called_ae": "called_ae"}
_KNOWN = {*_LIST_KEYS, "series_description", "min_instances", "max_instances"}


@dataclass(frozen=True, slots=True)
class SeriesHeader:
    """What routing may look at: a few non-identifying attributes, the instance count and the AE titles."""

    modality: str
    sop_class: str
    body_part: str
    series_description: str
    instances: int
    calling_ae: str
    called_ae: str

    def value(self, field: str) -> str:
        return {"Modality": self.modality, "SOPClassUID": self.sop_class, "BodyPartExamined": self.body_part,
                "calling_ae": self.calling_ae, "called_ae": self.called_ae}[field]


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    model: str
    lists: tuple[tuple[str, frozenset[str]], ...]
    description: re.Pattern[str] | None
    min_instances: int
    max_instances: int

    def matches(self, header: SeriesHeader) -> bool:
        if not self.min_instances <= header.instances <= self.max_instances:
            return False
        if any(header.value(field).upper() not in allowed for field, allowed in self.lists):
            return False
        return self.description is None or bool(self.description.search(header.series_description))


def route(rules: Sequence[Rule], header: SeriesHeader) -> tuple[str, ...]:
    """Return the models whose rules match, in rule order, without repeats (empty: no model)."""
    return tuple(dict.fromkeys(rule.model for rule in rules if rule.matches(header)))


def explain(rules: Sequence[Rule], header: SeriesHeader) -> str:
    """Why no rule takes the series: each rule's name and the first criterion it fails, without header values."""
    return "; ".join(f"{rule.name}: {why_not(rule, header)}" for rule in rules if not rule.matches(header))


def why_not(rule: Rule, header: SeriesHeader) -> str:
    """The first criterion of `rule` the series fails ('' when the rule matches); quotes no header value."""
    for field, allowed in rule.lists:
        if header.value(field).upper() not in allowed:
            return f"{field} is not one the rule takes"
    if rule.description is not None and not rule.description.search(header.series_description):
        return "SeriesDescription excluded by the rule's pattern"
    if header.instances < rule.min_instances:
        return f"{header.instances} instance(s), the rule needs at least {rule.min_instances}"
    if header.instances > rule.max_instances:
        return f"{header.instances} instances, the rule takes at most {rule.max_instances}"
    return ""


def parse_rules(raw: Any, *, source: str = "rules") -> tuple[Rule, ...]:
    """Validate the YAML structure; errors name the rule and the key."""
    if not isinstance(raw, Mapping) or not isinstance(raw.get("rules"), list):
        raise ConfigError(f"{source}: expected a mapping with a 'rules' list")
    return tuple(_rule(item, index, source) for index, item in enumerate(raw["rules"]))


def _rule(item: Any, index: int, source: str) -> Rule:
    where = f"{source}: rule {index + 1}"
    if not isinstance(item, Mapping) or "model" not in item:
        raise ConfigError(f"{where}: needs a 'model'")
    match = item.get("match") or {}
    unknown = set(match) - _KNOWN
    if unknown:
        raise ConfigError(f"{where}: unknown match key(s) {sorted(unknown)}")
    try:
        lists = tuple((_LIST_KEYS[key], frozenset(str(v).upper() for v in _as_list(match[key])))
                      for key in _LIST_KEYS if key in match)
        description = re.compile(match["series_description"], re.IGNORECASE) if "series_description" in match else None
        low, high = int(match.get("min_instances", 1)), int(match.get("max_instances", 100_000))
    except (re.error, TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return Rule(name=str(item.get("name", f"rule-{index + 1}")), model=str(item["model"]), lists=lists,
                description=description, min_instances=low, max_instances=high)


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value]


def load_rules(path: Path) -> tuple[Rule, ...]:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"PACSAI_ROUTES_FILE {path}: cannot read ({type(exc).__name__})") from None
    return parse_rules(raw, source=str(path))
