"""Test setup: bring a job to a state along allowed transitions (the state machine refuses shortcuts)."""

from __future__ import annotations

from collections import deque

from pacsai.jobs import JOB_TRANSITIONS, JobState
from pacsai.state import State


def path_between(start: JobState, goal: JobState) -> list[JobState]:
    """The shortest chain of allowed transitions from `start` to `goal` (excluding start)."""
    previous: dict[JobState, JobState] = {}
    todo = deque([start])
    while todo:
        here = todo.popleft()
        if here is goal and (here is not start or goal in JOB_TRANSITIONS[start]):
            break
        for nxt in sorted(JOB_TRANSITIONS[here], key=lambda s: s.value):
            if nxt not in previous and nxt is not start:
                previous[nxt] = here
                todo.append(nxt)
    if start is goal:
        return [goal]
    chain = [goal]
    while chain[-1] is not start:
        chain.append(previous[chain[-1]])
    return chain[-2::-1]


def move_job(state: State, job_id: str, goal: JobState, reason: str = "") -> None:
    """Set the job to `goal` the way the product would get there (each step a legal transition)."""
    row = state.job(job_id)
    assert row is not None, "no such job"
    if row.state is goal:
        return
    for step in path_between(row.state, goal):
        state.set_job(job_id, step, reason if step is goal else "")
