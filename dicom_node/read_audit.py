"""Reading the audit trail back for `pacsai audit`: parse each line, filter by time and study, print."""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from xml.etree.ElementTree import Element, ParseError, fromstring

from pacsai.logs import key_of

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))+$")
_OUTCOMES = {"0": "success", "4": "minor failure", "8": "serious failure", "12": "major failure"}


@dataclass(frozen=True, slots=True)
class Entry:
    """One audit message, with what the listing shows."""

    at: datetime
    event: str
    event_type: str
    action: str
    outcome: str
    participants: tuple[str, ...]  # "AET (address)", the requestor first
    study_key: str
    description: str
    xml: str


def _text(element: Element | None, attribute: str) -> str:
    return "" if element is None else element.get(attribute, "")


def parse_line(line: str) -> Entry | None:
    """The entry in one line of the trail, or None when the line is not an audit message."""
    try:
        root = fromstring(line)
        ident = root.find("EventIdentification")
        at = datetime.fromisoformat(_text(ident, "EventDateTime"))
    except (ParseError, ValueError):
        return None
    people = sorted(root.findall("ActiveParticipant"), key=lambda p: p.get("UserIsRequestor") != "true")
    participants = tuple(f"{p.get('UserID', '')} ({p.get('NetworkAccessPointID', '')})" for p in people)
    study = root.find("ParticipantObjectIdentification")
    return Entry(
        at=at if at.tzinfo else at.replace(tzinfo=UTC),
        event=_text(root.find("EventIdentification/EventID"), "originalText"),
        event_type=_text(root.find("EventIdentification/EventTypeCode"), "originalText"),
        action=_text(ident, "EventActionCode"),
        outcome=_OUTCOMES.get(_text(ident, "EventOutcomeIndicator"), "?"),
        participants=participants,
        study_key=_text(study, "ParticipantObjectID"),
        description=(root.findtext("EventIdentification/EventOutcomeDescription") or ""),
        xml=line,
    )


def read_entries(path: Path) -> Iterator[Entry]:
    if not path.exists():
        return
    with open(path, encoding="utf-8", errors="replace") as handle:
        for line in handle:
            entry = parse_line(line.strip())
            if entry is not None:
                yield entry


def study_key_for(text: str, log_key: bytes) -> str:
    """A study key as given, or the key of a Study Instance UID (hashed with this deployment's key)."""
    text = text.strip()
    return key_of(log_key, text) if _UID.match(text) else text


def parse_time(text: str) -> datetime:
    """ISO 8601 date or date-time; without a zone it is taken as UTC."""
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def select(
    entries: Iterable[Entry], *, since: datetime | None = None, until: datetime | None = None, study_key: str = ""
) -> list[Entry]:
    return [
        entry
        for entry in entries
        if (since is None or entry.at >= since)
        and (until is None or entry.at <= until)
        and (not study_key or entry.study_key.startswith(study_key))
    ]


def format_entry(entry: Entry) -> str:
    what = entry.event + (f"/{entry.event_type}" if entry.event_type else "")
    study = f" study={entry.study_key}" if entry.study_key else ""
    return (
        f"{entry.at.isoformat(timespec='seconds')} {what} [{entry.action}] {entry.outcome}: "
        f"{' -> '.join(entry.participants)}{study} {entry.description}"
    ).rstrip()
