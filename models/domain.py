"""What a model was made for (its spec's `domain:` block) and the check of a series' headers against it.

`check_domain` is pure: it takes a SeriesHeader (built from the pydicom headers of a series by `series_header`) and
returns the reasons the series lies outside the domain; an empty list means inside. Reasons name attributes and
ranges, never patient values such as names or dates (an age in years is given, rounded, without the birth date).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date
from enum import Enum
from typing import Any

from pydicom.dataset import Dataset

_AGE = re.compile(r"^(\d{3})([DWMY])$")
_AGE_UNIT_YEARS = {"D": 1 / 365.25, "W": 7 / 365.25, "M": 1 / 12, "Y": 1.0}
HUMAN = ("", "HOMO SAPIENS", "HUMAN")  # PatientSpeciesDescription values taken as human (absent = human)


class Unknown(Enum):
    """What to do when the attribute a domain constrains is absent from the series."""

    ACCEPT = "accept"
    REFUSE = "refuse"


Range = tuple[float, float]


@dataclass(frozen=True, slots=True)
class Domain:
    """The series a model may evaluate; an empty tuple or None constrains nothing. Ranges are inclusive."""

    modalities: tuple[str, ...] = ()
    sop_classes: tuple[str, ...] = ()  # SOP Class UIDs accepted (e.g. no Secondary Capture)
    body_parts: tuple[str, ...] = ()  # BodyPartExamined, upper case
    unknown_body_part: Unknown = Unknown.ACCEPT
    views: tuple[str, ...] = ()  # ViewPosition (PA, AP, LL, …)
    unknown_view: Unknown = Unknown.ACCEPT
    age_years: Range | None = None  # completed years, from PatientAge or PatientBirthDate vs StudyDate
    unknown_age: Unknown = Unknown.ACCEPT
    pixel_spacing_mm: Range | None = None  # in-plane, PixelSpacing or else ImagerPixelSpacing, both directions
    field_of_view_mm: Range | None = None  # the longer edge, rows x spacing or columns x spacing
    slices: Range | None = None  # images in the series (a multi-frame image counts its frames)
    photometric: tuple[str, ...] = ()  # PhotometricInterpretation
    human_only: bool = True  # PatientSpeciesDescription, when present, must name a human


@dataclass(frozen=True, slots=True)
class SeriesHeader:
    """The header values of one series that a domain can constrain (the first image's, the image count)."""

    modality: str
    sop_class: str
    body_part: str
    view: str
    age_years: float | None
    pixel_spacing_mm: tuple[float, float] | None
    rows: int
    columns: int
    slices: int
    photometric: str
    species: str = ""

    @property
    def field_of_view_mm(self) -> float | None:
        if self.pixel_spacing_mm is None:
            return None
        return max(self.rows * self.pixel_spacing_mm[0], self.columns * self.pixel_spacing_mm[1])


def check_domain(domain: Domain, header: SeriesHeader) -> list[str]:
    """Why the series lies outside the domain (empty: inside)."""
    reasons: list[str] = []
    _member(reasons, "modality", header.modality, domain.modalities)
    _member(reasons, "SOP class", header.sop_class, domain.sop_classes)
    _member(reasons, "photometric interpretation", header.photometric, domain.photometric)
    if domain.human_only and header.species.upper() not in HUMAN:
        reasons.append("patient species is not human")
    _coded(reasons, "body part", header.body_part, domain.body_parts, domain.unknown_body_part)
    _coded(reasons, "view position", header.view, domain.views, domain.unknown_view)
    _ranged(reasons, "patient age", header.age_years, domain.age_years, domain.unknown_age, unit=" years")
    spacing = min(header.pixel_spacing_mm) if header.pixel_spacing_mm else None
    _ranged(reasons, "pixel spacing", spacing, domain.pixel_spacing_mm, Unknown.REFUSE, unit=" mm")
    _ranged(reasons, "field of view", header.field_of_view_mm, domain.field_of_view_mm, Unknown.REFUSE, unit=" mm")
    _ranged(reasons, "image count", float(header.slices), domain.slices, Unknown.REFUSE, unit="")
    return reasons


def _member(reasons: list[str], name: str, value: str, allowed: tuple[str, ...]) -> None:
    if allowed and value not in allowed:
        reasons.append(f"{name} {value or '(none)'} is not one of {', '.join(allowed)}")


def _coded(reasons: list[str], name: str, value: str, allowed: tuple[str, ...], unknown: Unknown) -> None:
    if not allowed:
        return
    if not value:
        if unknown is Unknown.REFUSE:
            reasons.append(f"{name} is not stated and the model needs one of {', '.join(allowed)}")
    elif value.upper() not in allowed:
        reasons.append(f"{name} {value} is not one of {', '.join(allowed)}")


def _ranged(
    reasons: list[str], name: str, value: float | None, span: Range | None, unknown: Unknown, *, unit: str
) -> None:
    if span is None:
        return
    if value is None or not math.isfinite(value):
        if unknown is Unknown.REFUSE:
            reasons.append(f"{name} is not known and the model needs {_span(span)}{unit}")
    elif not span[0] <= value <= span[1]:
        reasons.append(f"{name} {value:.3g}{unit} is outside {_span(span)}{unit}")


def _span(span: Range) -> str:
    return f"{span[0]:g}–{span[1]:g}"


def series_header(datasets: Sequence[Dataset]) -> SeriesHeader:
    """The SeriesHeader of a series from its images' headers (pixel data not needed); the first image speaks."""
    first = datasets[0]
    frames = sum(int(ds.get("NumberOfFrames", 1) or 1) for ds in datasets)
    return SeriesHeader(
        modality=_text(first, "Modality"),
        sop_class=_text(first, "SOPClassUID"),
        body_part=_text(first, "BodyPartExamined").upper(),
        view=_text(first, "ViewPosition").upper(),
        age_years=age_years(first),
        pixel_spacing_mm=_spacing(first),
        rows=int(first.get("Rows", 0) or 0),
        columns=int(first.get("Columns", 0) or 0),
        slices=frames,
        photometric=_text(first, "PhotometricInterpretation"),
        species=_text(first, "PatientSpeciesDescription"),
    )


def age_years(ds: Dataset) -> float | None:
    """Completed years from PatientAge ("005Y", "018M", …), else PatientBirthDate vs StudyDate; None if neither.

    "000Y" is what de-identification tools write for a removed age (an age under a year is stated in months, weeks
    or days): it counts as not stated, not as a newborn."""
    match = _AGE.match(_text(ds, "PatientAge"))
    if match and match.group(0) != "000Y":
        return float(int(match.group(1)) * _AGE_UNIT_YEARS[match.group(2)])
    born, seen = _date(_text(ds, "PatientBirthDate")), _date(_text(ds, "StudyDate") or _text(ds, "SeriesDate"))
    if born is None or seen is None or seen < born:
        return None
    return float(seen.year - born.year - ((seen.month, seen.day) < (born.month, born.day)))


def _date(value: str) -> date | None:
    try:
        return date(int(value[:4]), int(value[4:6]), int(value[6:8])) if len(value) >= 8 else None
    except ValueError:
        return None


def _spacing(ds: Dataset) -> tuple[float, float] | None:
    """PixelSpacing, else ImagerPixelSpacing, else an enhanced multi-frame's pixel measures (shared, else the first
    frame's: a volume's frames all have the same, which loading checks); None if unusable."""
    value = ds.get("PixelSpacing") or ds.get("ImagerPixelSpacing")
    for groups in ("SharedFunctionalGroupsSequence", "PerFrameFunctionalGroupsSequence"):
        if value is not None:
            break
        try:
            value = getattr(ds, groups)[0].PixelMeasuresSequence[0].PixelSpacing
        except (AttributeError, IndexError):
            value = None
    if value is None:
        return None
    try:
        rows, columns = (float(v) for v in value)
    except (TypeError, ValueError):
        return None
    return (rows, columns) if rows > 0 and columns > 0 else None


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword, "")
    return str(value).strip() if value is not None else ""


def parse_domain(raw: Mapping[str, Any] | None) -> Domain | None:
    """The `domain:` block of a spec.yaml; None when the spec has none. Raises ValueError naming the field."""
    if raw is None:
        return None
    if not isinstance(raw, Mapping):
        raise ValueError("domain must be a mapping")
    known = set(Domain.__dataclass_fields__)
    extra = set(raw) - known
    if extra:
        raise ValueError(f"domain has unknown fields {', '.join(sorted(extra))}")
    return Domain(
        modalities=_strings(raw, "modalities"),
        sop_classes=_strings(raw, "sop_classes"),
        body_parts=tuple(s.upper() for s in _strings(raw, "body_parts")),
        unknown_body_part=Unknown(raw.get("unknown_body_part", "accept")),
        views=tuple(s.upper() for s in _strings(raw, "views")),
        unknown_view=Unknown(raw.get("unknown_view", "accept")),
        age_years=_range(raw, "age_years"),
        unknown_age=Unknown(raw.get("unknown_age", "accept")),
        pixel_spacing_mm=_range(raw, "pixel_spacing_mm"),
        field_of_view_mm=_range(raw, "field_of_view_mm"),
        slices=_range(raw, "slices"),
        photometric=_strings(raw, "photometric"),
        human_only=bool(raw.get("human_only", True)),
    )


def _strings(raw: Mapping[str, Any], key: str) -> tuple[str, ...]:
    value = raw.get(key) or ()
    if isinstance(value, str):
        raise ValueError(f"domain.{key} must be a list")
    return tuple(str(v) for v in value)


def _range(raw: Mapping[str, Any], key: str) -> Range | None:
    value = raw.get(key)
    if value is None:
        return None
    low, high = (float(v) for v in value)
    if not low <= high:
        raise ValueError(f"domain.{key} needs [low, high] with low <= high")
    return (low, high)
