"""Routing: pure rules from a YAML file, series header → model names, each with its priority."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from pacsai.errors import ConfigError
from pacsai.jobs import Priority

_LIST_KEYS = {
    "modality": "Modality",
    "sop_class": "SOPClassUID",
    "body_part": "BodyPartExamined",
    "calling_ae": "calling_ae",
    "called_ae": "called_ae",
    "requested_procedure_priority": "RequestedProcedurePriority",  # STAT, HIGH, ROUTINE, MEDIUM, LOW
    "store_priority": "store_priority",  # the C-STORE request's own Priority: HIGH, MEDIUM, LOW
}
_KNOWN = {*_LIST_KEYS, "series_description", "study_description", "min_instances", "max_instances"}


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
    study_description: str = ""
    requested_procedure_priority: str = ""
    store_priority: str = ""  # HIGH, MEDIUM or LOW: what the C-STORE of the series' first instance asked for

    def value(self, field: str) -> str:
        return {
            "Modality": self.modality,
            "SOPClassUID": self.sop_class,
            "BodyPartExamined": self.body_part,
            "calling_ae": self.calling_ae,
            "called_ae": self.called_ae,
            "RequestedProcedurePriority": self.requested_procedure_priority,
            "store_priority": self.store_priority,
        }[field]


@dataclass(frozen=True, slots=True)
class Rule:
    name: str
    model: str
    lists: tuple[tuple[str, frozenset[str]], ...]
    description: re.Pattern[str] | None
    min_instances: int
    max_instances: int
    study_description: re.Pattern[str] | None = None
    priority: Priority = Priority.ROUTINE

    def matches(self, header: SeriesHeader) -> bool:
        return not why_not(self, header)


def route(rules: Sequence[Rule], header: SeriesHeader) -> tuple[str, ...]:
    """Return the models whose rules match, in rule order, without repeats (empty: no model)."""
    return tuple(model for model, _ in route_jobs(rules, header))


def route_jobs(rules: Sequence[Rule], header: SeriesHeader) -> tuple[tuple[str, Priority], ...]:
    """The models whose rules match, in rule order, each with the most urgent priority its matching rules give."""
    chosen: dict[str, Priority] = {}
    for rule in (r for r in rules if r.matches(header)):
        known = chosen.get(rule.model)
        chosen[rule.model] = rule.priority if known is None or rule.priority.rank < known.rank else known
    return tuple(chosen.items())


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
    if rule.study_description is not None and not rule.study_description.search(header.study_description):
        return "StudyDescription excluded by the rule's pattern"
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
        lists = tuple(
            (_LIST_KEYS[key], frozenset(str(v).upper() for v in _as_list(match[key])))
            for key in _LIST_KEYS
            if key in match
        )
        description = _pattern(match, "series_description")
        study_description = _pattern(match, "study_description")
        low, high = int(match.get("min_instances", 1)), int(match.get("max_instances", 100_000))
        priority = Priority(str(item.get("priority", Priority.ROUTINE.value)).lower())
    except (re.error, TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
    return Rule(
        name=str(item.get("name", f"rule-{index + 1}")),
        model=str(item["model"]),
        lists=lists,
        description=description,
        min_instances=low,
        max_instances=high,
        study_description=study_description,
        priority=priority,
    )


def _pattern(match: Mapping[str, Any], key: str) -> re.Pattern[str] | None:
    return re.compile(match[key], re.IGNORECASE) if key in match else None


def _as_list(value: Any) -> list[Any]:
    return list(value) if isinstance(value, list | tuple) else [value]


def load_rules(path: Path) -> tuple[Rule, ...]:
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"PACSAI_ROUTES_FILE {path}: cannot read ({type(exc).__name__})") from None
    return parse_rules(raw, source=str(path))
