"""What the console's pages show, read from the system of record (values in, values out; no HTTP here)."""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from dicom_node.console.stages import StageSummary, stage_summary
from dicom_node.route import Rule, SeriesHeader, why_not
from pacsai.console_db import ConsoleTables, PeerStatus, WorkerBeat
from pacsai.jobs import JobState
from pacsai.settings import Settings
from pacsai.state import State

LIST_LIMIT = 200


@dataclass(frozen=True, slots=True)
class Overview:
    arrivals_per_hour: tuple[int, ...]  # instances received in each of the last 24 hours, oldest first
    queue_depths: tuple[tuple[str, int | None], ...]
    jobs_by_state: tuple[tuple[str, int], ...]
    stages_hour: tuple[StageSummary, ...]
    stages_day: tuple[StageSummary, ...]
    failing: tuple[tuple[str, str, int, str], ...]  # job id, model, delivery failures, reason
    peers: tuple[PeerStatus, ...]
    spool_free_bytes: int
    spool_reserve_bytes: int
    workers: tuple[WorkerBeat, ...]


def overview(
    state: State, settings: Settings, queues: Sequence[str], depth: Callable[[str], int | None], now: float
) -> Overview:
    tables = ConsoleTables(state)
    since = now - 24 * 3600
    arrivals = [0] * 24
    for (received_at,) in state._query("SELECT received_at FROM instances WHERE received_at > ?", (since,)):
        arrivals[min(23, int((float(received_at) - since) // 3600))] += 1
    failing = state._query(
        "SELECT job_id, model, delivery_failures, reason FROM jobs WHERE state=? AND delivery_failures > 0"
        " ORDER BY delivery_failures DESC LIMIT 50",
        (JobState.ENCODED.value,),
    )
    configured = {peer.ae_title: f"{peer.host}:{peer.port}" for peer in settings.delivery.peers}
    configured |= {peer.ae_title: peer.url for peer in settings.delivery.web_peers}
    peers = {status.ae_title: status for status in tables.peers()}
    for ae_title, address in configured.items():
        peers.setdefault(ae_title, PeerStatus(ae_title, address, False, "not checked yet", 0.0))
    try:
        free = shutil.disk_usage(settings.storage.data_dir).free
    except OSError:
        free = 0
    return Overview(
        arrivals_per_hour=tuple(arrivals),
        queue_depths=tuple((queue, depth(queue)) for queue in queues),
        jobs_by_state=tuple(sorted(state.counts()["jobs"].items())),
        stages_hour=tuple(stage_summary(state, 3600, now)),
        stages_day=tuple(stage_summary(state, 24 * 3600, now)),
        failing=tuple((str(r[0]), str(r[1]), int(r[2]), str(r[3])) for r in failing),
        peers=tuple(peers[name] for name in sorted(peers)),
        spool_free_bytes=free,
        spool_reserve_bytes=settings.storage.spool_reserve_bytes,
        workers=tuple(tables.workers_online(now)),
    )


@dataclass(frozen=True, slots=True)
class Filters:
    state: str = ""
    model: str = ""
    sender: str = ""  # calling AE title
    since_h: float = 0.0  # only what changed within the last hours (0: any time)

    def where(self, *, jobs: bool) -> tuple[str, list[Any]]:
        clauses, params = ["1=1"], []  # type: list[str], list[Any]
        prefix = "j." if jobs else "s."
        if self.state:
            clauses.append(f"{prefix}state=?")
            params.append(self.state)
        if self.model and jobs:
            clauses.append("j.model=?")
            params.append(self.model)
        if self.sender:
            clauses.append("s.calling_ae=?")
            params.append(self.sender)
        if self.since_h > 0:
            clauses.append(f"{prefix}updated_at > ?")
            params.append(time.time() - self.since_h * 3600)
        return " AND ".join(clauses), params


@dataclass(frozen=True, slots=True)
class JobLine:
    job_id: str
    study_key: str
    series_key: str
    model: str
    state: str
    reason: str
    attempts: int
    sender: str
    created_at: float
    updated_at: float


def jobs(state: State, filters: Filters) -> list[JobLine]:
    where, params = filters.where(jobs=True)
    rows = state._query(
        "SELECT j.job_id, j.study_key, j.series_key, j.model, j.state, j.reason, j.attempts,"
        " COALESCE(s.calling_ae, ''), j.created_at, j.updated_at FROM jobs j"
        f" LEFT JOIN series s ON s.series_key=j.series_key WHERE {where} ORDER BY j.updated_at DESC LIMIT ?",
        [*params, LIST_LIMIT],
    )
    return [
        JobLine(
            str(r[0]),
            str(r[1]),
            str(r[2]),
            str(r[3]),
            str(r[4]),
            str(r[5]),
            int(r[6]),
            str(r[7]),
            float(r[8]),
            float(r[9]),
        )
        for r in rows
    ]


@dataclass(frozen=True, slots=True)
class SeriesLine:
    series_key: str
    study_key: str
    state: str
    reason: str
    sender: str
    modality: str
    description: str
    instances: int
    updated_at: float
    models: tuple[str, ...] = field(default=())


def series(state: State, filters: Filters) -> list[SeriesLine]:
    where, params = filters.where(jobs=False)
    if filters.model:
        where += " AND EXISTS (SELECT 1 FROM jobs j WHERE j.series_key=s.series_key AND j.model=?)"
        params.append(filters.model)
    concat = "STRING_AGG(DISTINCT j.model, ',')" if state._db.postgres else "GROUP_CONCAT(DISTINCT j.model)"
    rows = state._query(
        "SELECT s.series_key, s.study_key, s.state, s.reason, s.calling_ae, s.header, s.updated_at,"
        " (SELECT COUNT(*) FROM instances i WHERE i.series_key=s.series_key),"
        f" (SELECT {concat} FROM jobs j WHERE j.series_key=s.series_key)"
        f" FROM series s WHERE {where} ORDER BY s.updated_at DESC LIMIT ?",
        [*params, LIST_LIMIT],
    )
    lines = []
    for r in rows:
        header = json.loads(r[5])
        lines.append(
            SeriesLine(
                str(r[0]),
                str(r[1]),
                str(r[2]),
                str(r[3]),
                str(r[4]),
                str(header.get("Modality", "")),
                str(header.get("SeriesDescription", "")),
                int(r[7]),
                float(r[6]),
                tuple(sorted(filter(None, str(r[8] or "").split(",")))),
            )
        )
    return lines


def series_header(state: State, series_key: str) -> SeriesHeader | None:
    """The routing view of a received series, as the assembler builds it."""
    rows = state._query("SELECT header, calling_ae, called_ae FROM series WHERE series_key=?", (series_key,))
    if not rows:
        return None
    header = json.loads(rows[0][0])
    return SeriesHeader(
        modality=str(header.get("Modality", "")),
        sop_class=str(header.get("SOPClassUID", "")),
        body_part=str(header.get("BodyPartExamined", "")),
        series_description=str(header.get("SeriesDescription", "")),
        instances=len(state.series_instances(series_key)),
        calling_ae=str(rows[0][1]),
        called_ae=str(rows[0][2]),
    )


@dataclass(frozen=True, slots=True)
class RuleOutcome:
    name: str
    model: str
    matched: bool
    failed: str  # the first criterion the series fails ('' when it matches)


def test_rules(rules: Sequence[Rule], header: SeriesHeader) -> list[RuleOutcome]:
    return [RuleOutcome(rule.name, rule.model, rule.matches(header), why_not(rule, header)) for rule in rules]


def routing_decision(rules: Sequence[Rule], header: SeriesHeader | None) -> str:
    if header is None:
        return "series no longer known"
    taken = [f"{rule.name} → {rule.model}" for rule in rules if rule.matches(header)]
    return ("matched: " + ", ".join(taken)) if taken else "no rule matches"
