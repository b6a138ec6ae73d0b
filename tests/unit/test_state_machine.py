"""The transition tables of pacsai.jobs, exhaustively: every allowed change works, every other one raises."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest

from pacsai.jobs import (
    DELIVERY_TRANSITIONS,
    ENDED_JOB_STATES,
    JOB_TRANSITIONS,
    SERIES_TRANSITIONS,
    DeliveryStatus,
    IllegalTransition,
    JobState,
    SeriesJob,
    SeriesState,
)
from pacsai.state import State
from pacsai.storage import SpooledInstance
from tests.job_paths import move_job, path_between


def _state_with_job(tmp_path: Path, start: JobState) -> State:
    state = State(tmp_path / "pacsai.db")
    state.record_instance(SpooledInstance("t", "s", "i", "t/s/i.dcm"), calling_ae="PACS", called_ae="PACSAI", header={})
    state.close_series("s", SeriesState.COMPLETE, "", [SeriesJob("j", "t", "s", "model", "m.json", "PACS")])
    move_job(state, "j", start)
    return state


def test_every_state_is_reachable_from_pending_and_can_end() -> None:
    for target in JobState:
        assert path_between(JobState.PENDING, target)[-1] is target
        assert any(path_between(target, end) for end in ENDED_JOB_STATES)
    assert set(JOB_TRANSITIONS) == set(JobState) and set(SERIES_TRANSITIONS) == set(SeriesState)


@pytest.mark.parametrize(("old", "new"), list(itertools.product(JobState, JobState)), ids=lambda s: s.value)
def test_job_transition(tmp_path: Path, old: JobState, new: JobState) -> None:
    state = _state_with_job(tmp_path, old)
    before = len(state.job_events("j"))
    if new in JOB_TRANSITIONS[old]:
        state.set_job("j", new, "because")
        row = state.job("j")
        assert row is not None and row.state is new and row.reason == "because"
        last = state.job_events("j")[-1]
        assert (last.from_state, last.to_state, last.reason) == (old.value, new.value, "because")
    else:
        with pytest.raises(IllegalTransition, match=f"{old.value} → {new.value}"):
            state.set_job("j", new, "because")
        row = state.job("j")
        assert row is not None and row.state is old and len(state.job_events("j")) == before


@pytest.mark.parametrize(("old", "new"), list(itertools.product(SeriesState, SeriesState)), ids=lambda s: s.value)
def test_series_transition(tmp_path: Path, old: SeriesState, new: SeriesState) -> None:
    state = State(tmp_path / "pacsai.db")
    state.record_instance(SpooledInstance("t", "s", "i", "t/s/i.dcm"), calling_ae="PACS", called_ae="PACSAI", header={})
    if old is not SeriesState.RECEIVING:
        via = SeriesState.COMPLETE if old is SeriesState.PURGED else old
        state.close_series("s", via, "", [])
        if old is SeriesState.PURGED:
            state.mark_series("s", SeriesState.PURGED)
    if new in SERIES_TRANSITIONS[old]:
        state.mark_series("s", new)
        assert state.counts()["series"] == {new.value: 1}
    else:
        with pytest.raises(IllegalTransition):
            state.mark_series("s", new)
        assert state.counts()["series"] == {old.value: 1}


@pytest.mark.parametrize(
    ("old", "new"), list(itertools.product([None, *DeliveryStatus], DeliveryStatus)), ids=lambda s: str(s)
)
def test_delivery_transition(tmp_path: Path, old: DeliveryStatus | None, new: DeliveryStatus) -> None:
    state = _state_with_job(tmp_path, JobState.ENCODED)
    if old is not None:
        state.record_delivery("j", "seg.dcm", "PACS", old.value, "first")
    if new in DELIVERY_TRANSITIONS[old]:
        state.record_delivery("j", "seg.dcm", "PACS", new.value, "second")
        assert state.deliveries("j") == [("seg.dcm", new.value, 1 if old is None else 2, "second")]
    else:
        with pytest.raises(IllegalTransition):
            state.record_delivery("j", "seg.dcm", "PACS", new.value, "second")


def test_an_unknown_delivery_status_is_refused(tmp_path: Path) -> None:
    state = _state_with_job(tmp_path, JobState.ENCODED)
    with pytest.raises(ValueError, match="not a valid DeliveryStatus"):
        state.record_delivery("j", "seg.dcm", "PACS", "stored-maybe", "")


def test_a_dead_job_of_a_series_sent_again_starts_afresh(tmp_path: Path) -> None:
    state = _state_with_job(tmp_path, JobState.DEAD)
    state.record_instance(  # the same instance again re-opens the series
        SpooledInstance("t", "s", "i", "t/s/i.dcm"), calling_ae="PACS", called_ae="PACSAI", header={}
    )
    job = SeriesJob("j", "t", "s", "model", "m.json", "PACS")
    assert state.close_series("s", SeriesState.COMPLETE, "", [job]) == ["j"]
    row = state.job("j")
    assert row is not None and row.state is JobState.PENDING and row.attempts == 0
    assert state.job_events("j")[-1].reason == "series sent again"


def test_stage_times_are_read_back_in_order(tmp_path: Path) -> None:
    state = _state_with_job(tmp_path, JobState.RUNNING)
    state.record_stage("j", "model", "load", 0.5)
    state.record_stage("j", "model", "model", 2.0)
    stages = state.stages_since(0)
    assert [(s.stage, s.seconds) for s in stages] == [("load", 0.5), ("model", 2.0)]
    assert state.stages_since(stages[0].stage_id) == stages[1:]


def test_only_a_delivered_job_becomes_committed_and_committed_ends_it() -> None:
    """Storage commitment / C-FIND confirmation: delivered → committed, and an operator may re-deliver from there."""
    assert {old for old, news in JOB_TRANSITIONS.items() if JobState.COMMITTED in news} == {JobState.DELIVERED}
    assert JOB_TRANSITIONS[JobState.COMMITTED] == frozenset({JobState.ENCODED})
    assert JobState.COMMITTED in ENDED_JOB_STATES
