"""Priorities: routing rules give each job stat, routine or background; the node dispatches the most urgent first."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import yaml

from dicom_node.assemble import dispatchable, in_window
from dicom_node.route import SeriesHeader, parse_rules, route_jobs, why_not
from pacsai.enqueue import infer_queue, infer_queues
from pacsai.errors import ConfigError
from pacsai.jobs import JobState, Priority, SeriesJob, SeriesState
from pacsai.settings import QueueSettings, Settings
from pacsai.state import State
from pacsai.storage import SpooledInstance
from tests.job_paths import move_job

RULES = parse_rules(
    yaml.safe_load("""
rules:
  - {model: ct, match: {modality: [CT]}}
  - {model: ct, priority: stat, match: {modality: [CT], requested_procedure_priority: [STAT, HIGH]}}
  - {model: ct, priority: stat, match: {modality: [CT], study_description: "trauma|stroke"}}
  - {model: ct, priority: stat, match: {modality: [CT], store_priority: [HIGH]}}
  - {model: ct, priority: STAT, match: {modality: [CT], calling_ae: [ER_CT]}}
  - {model: research, priority: background, match: {modality: [CT]}}
""")
)


def header(**changes: str) -> SeriesHeader:
    values: dict[str, object] = {"modality": "CT", "sop_class": "", "body_part": "", "series_description": ""}
    values.update(instances=20, calling_ae="PACS", called_ae="PACSAI")
    return SeriesHeader(**{**values, **changes})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("changes", "ct_priority"),
    [
        ({}, Priority.ROUTINE),
        ({"requested_procedure_priority": "STAT"}, Priority.STAT),
        ({"requested_procedure_priority": "ROUTINE"}, Priority.ROUTINE),
        ({"study_description": "CT head STROKE protocol"}, Priority.STAT),
        ({"store_priority": "HIGH"}, Priority.STAT),
        ({"store_priority": "LOW"}, Priority.ROUTINE),
        ({"calling_ae": "ER_CT"}, Priority.STAT),
    ],
)
def test_the_most_urgent_matching_rule_sets_the_priority(changes: dict[str, str], ct_priority: Priority) -> None:
    assert route_jobs(RULES, header(**changes)) == (("ct", ct_priority), ("research", Priority.BACKGROUND))


def test_a_failed_study_description_is_explained_without_its_value() -> None:
    assert (
        why_not(RULES[2], header(study_description="CANARY^PHI")) == "StudyDescription excluded by the rule's pattern"
    )


def test_an_unknown_priority_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="rule 1.*'urgent' is not a valid Priority"):
        parse_rules({"rules": [{"model": "ct", "priority": "urgent"}]})


def test_each_priority_has_its_queue_and_workers_take_stat_first() -> None:
    assert infer_queues("ct") == ["infer.ct.stat", "infer.ct", "infer.ct.background"]
    assert infer_queue("ct") == "infer.ct"  # routine: the queue name of releases before priorities
    job = SeriesJob("j", "s", "r", "ct", "m", "PACS", priority=Priority.STAT)
    assert SeriesJob.from_message(job.to_message()) == job


def _pending(state: State, job_id: str, model: str, priority: Priority) -> None:
    state.record_instance(SpooledInstance("t", job_id, job_id, "p"), calling_ae="A", called_ae="B", header={})
    state.close_series(
        job_id, SeriesState.COMPLETE, "", [SeriesJob(job_id, "t", job_id, model, "m", "A", priority=priority)]
    )


def test_dispatch_puts_stat_first_within_each_models_window(tmp_path: Path) -> None:
    state = State(tmp_path / "pacsai.db")
    for index in range(3):
        _pending(state, f"routine-{index}", "ct", Priority.ROUTINE)
    _pending(state, "bg", "ct", Priority.BACKGROUND)
    _pending(state, "stat", "ct", Priority.STAT)  # arrives last
    _pending(state, "cxr", "cxr", Priority.ROUTINE)
    now = time.localtime()
    window2 = QueueSettings(dispatch_window=2)
    assert [r.job_id for r in dispatchable(state, window2, now)] == ["stat", "routine-0", "cxr"]
    move_job(state, "stat", JobState.QUEUED)
    assert [r.job_id for r in dispatchable(state, window2, now)] == ["routine-0", "cxr"]  # one place left for ct
    move_job(state, "routine-0", JobState.QUEUED)
    _pending(state, "stat-2", "ct", Priority.STAT)
    assert [r.job_id for r in dispatchable(state, window2, now)] == ["stat-2", "cxr"]  # STAT needs no room
    unlimited = QueueSettings(dispatch_window=0)
    assert [r.job_id for r in dispatchable(state, unlimited, now)] == [
        "stat-2",
        "routine-1",
        "routine-2",
        "cxr",
        "bg",
    ]
    closed = (now.tm_hour * 60 + now.tm_min + 60) % 1440, (now.tm_hour * 60 + now.tm_min + 120) % 1440
    held = dispatchable(state, QueueSettings(dispatch_window=0, off_peak=closed), now)
    assert "bg" not in [r.job_id for r in held]


def test_off_peak_windows_may_wrap_midnight() -> None:
    def at(hh: int, mm: int) -> time.struct_time:
        return time.struct_time((2026, 12, 2, hh, mm, 0, 2, 336, 0))

    night = (20 * 60, 6 * 60)
    assert in_window(night, at(23, 0)) and in_window(night, at(5, 59)) and not in_window(night, at(6, 0))
    assert in_window((60, 120), at(1, 30)) and not in_window((60, 120), at(2, 0))
    assert in_window(None, at(12, 0))


def test_off_peak_and_window_settings_are_checked() -> None:
    settings = Settings.from_env({"PACSAI_OFF_PEAK": "20:00-06:30", "PACSAI_DISPATCH_WINDOW": "0"})
    assert settings.queue.off_peak == (1200, 390) and settings.queue.dispatch_window == 0
    for bad in ("20:00", "25:00-06:00", "06:00-06:00"):
        with pytest.raises(ConfigError, match="PACSAI_OFF_PEAK"):
            Settings.from_env({"PACSAI_OFF_PEAK": bad})
