"""At start: audit the instances a node acknowledged but never audited because it died with the association open.

"Instances Transferred" is written when an association ends (receive.py). A node killed (kill -9, power loss) with
associations open never writes it, so at the next start, before listening, the instances the database recorded since
the previous start are compared, per study and SOP class, with what the trail counted since then; the difference is
audited now, one message per study, dated when the last of them arrived. Nothing is audited twice: the messages
written here come before this run's Application Start, so the next start counts them with the previous run.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from xml.etree.ElementTree import fromstring

from dicom_node.read_audit import read_entries
from pacsai import audit
from pacsai.audit import AuditTrail
from pacsai.settings import Settings
from pacsai.state import State

log = logging.getLogger(__name__)
_START, _TRANSFERRED = audit.APPLICATION_START[2], audit.INSTANCES_TRANSFERRED[2]
Tally = Counter[tuple[str, str]]  # (study key, SOP Class UID) → instances


def audited_since_start(path: Path) -> tuple[float, Tally] | None:
    """When the last run started, and the instances received that the trail counts since; None without a start."""
    started: float | None = None
    counted: Tally = Counter()
    for entry in read_entries(path):
        if entry.event_type == _START:
            started, counted = entry.at.timestamp(), Counter()
        elif entry.event == _TRANSFERRED and started is not None:
            for sop_class in fromstring(entry.xml).iter("SOPClass"):  # only received instances carry SOP classes
                counted[(entry.study_key, sop_class.get("UID", ""))] += int(sop_class.get("NumberOfInstances", "0"))
    return None if started is None else (started, counted)


def audit_unrecorded(state: State, settings: Settings, trail: AuditTrail) -> int:
    """Audit what the database holds since the last start and the trail does not; return how many instances."""
    previous = audited_since_start(settings.audit_path)
    if previous is None:  # first start, or the trail was rotated away: nothing to compare with
        return 0
    started, counted = previous
    stored: Tally = Counter()
    calling: dict[str, str] = {}
    last_at: dict[str, float] = {}
    for study_key, calling_ae, header, count, received_at in state.received_since(started):
        sop_class = str(json.loads(header or "{}").get("SOPClassUID", ""))
        stored[(study_key, sop_class)] += count
        calling.setdefault(study_key, calling_ae)
        last_at[study_key] = max(last_at.get(study_key, 0.0), received_at)
    missing: dict[str, dict[str, int]] = {}
    for (study_key, sop_class), count in stored.items():
        if count > counted[(study_key, sop_class)]:
            missing.setdefault(study_key, {})[sop_class] = count - counted[(study_key, sop_class)]
    for study_key, by_class in missing.items():
        event = audit.instances_received(settings, calling[study_key], "", "", study_key, by_class, 0)
        at = datetime.fromtimestamp(last_at[study_key], UTC)
        why = "; audited at the next start: the node stopped before the association ended"
        trail.record(replace(event, description=event.description + why, at=at))
    total = sum(sum(by_class.values()) for by_class in missing.values())
    if total:
        log.warning(
            "audited %d instance(s) of %d study(ies) whose association the last run never ended", total, len(missing)
        )
    return total
