"""Destination profiles: per PACS peer, which results it gets, SEG options, transfer syntaxes and the SEG fallback.

Read from the YAML file PACSAI_PROFILES_FILE (see README "Destination profiles"); peers it does not name get its
`default` profile, and keys a profile leaves out come from `default`, then from the built-in defaults below.
The outbox names each result after its kind (OUTPUT_FILES); deliver selects files by those names.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from enum import Enum
from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEGBaseline8Bit

from pacsai.notices import Notices, parse_notices
from pacsai.peers import check_ae_title


class Output(Enum):
    """Kinds of result a peer can get."""

    SEG = "seg"  # DICOM Segmentation
    SR = "sr"  # TID 1500 measurement report / classification report
    SC = "sc"  # the SEG burned into Secondary Captures of its source slices (viewers without SEG)
    HEATMAP = "heatmap"  # the classification heat-map Secondary Capture


class Verify(Enum):
    """How pacsai confirms that the peer has the delivered results (README "Proof of delivery")."""

    COMMITMENT = "commitment"  # Storage Commitment Push Model (N-ACTION, then the peer's N-EVENT-REPORT)
    QUERY = "query"  # C-FIND (Study Root, IMAGE level) for each result's SOP Instance UID
    NONE = "none"  # a successful C-STORE is the proof


class SegFallback(Enum):
    """What goes instead of the SEG when a peer refuses the SEG SOP class (catalogue E5)."""

    SC = "sc"  # the SC overlay series
    SR_ONLY = "sr-only"  # the SR, even where the profile does not list it; no image
    SKIP = "skip"  # nothing instead; the profile's other outputs go as usual
    FAIL = "fail"  # no fallback: the job fails, as any other refusal


TRANSFER_SYNTAXES = {
    "explicit-le": ExplicitVRLittleEndian,
    "implicit-le": ImplicitVRLittleEndian,
    "jpeg-baseline": JPEGBaseline8Bit,
}
UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)
OVERLAY_PREFIX = "overlay-"
OUTPUT_FILES = {"seg.dcm": Output.SEG, "sr.dcm": Output.SR, "sc.dcm": Output.HEATMAP}
_E = TypeVar("_E", bound=Enum)
_KEYS = (
    "outputs",
    "seg_omit_empty_frames",
    "seg_fallback",
    "transfer_syntaxes",
    "report_not_evaluated",
    "notify",
    "verify",
)


@dataclass(frozen=True, slots=True)
class Profile:
    """What one peer gets; the defaults are what every peer got before profiles existed."""

    outputs: frozenset[Output] = frozenset({Output.SEG, Output.SR, Output.HEATMAP})
    seg_omit_empty_frames: bool = True
    seg_fallback: SegFallback = SegFallback.SC
    transfer_syntaxes: tuple[str, ...] = UNCOMPRESSED  # UIDs, in order of preference
    report_not_evaluated: bool = True  # an SR saying why, when the model refuses a series (outside its domain/OOD)
    verify: Verify = Verify.NONE  # proof of delivery: the job ends committed once the peer confirms every result
    notices: Notices | None = None  # HL7 ORU / FHIR DiagnosticReport to the RIS/EHR after delivery (pacsai/notices.py)

    @property
    def may_fall_back_to_sc(self) -> bool:
        """A refused SEG would be replaced by SC overlays: they must be made with the results."""
        return Output.SEG in self.outputs and self.seg_fallback is SegFallback.SC

    def sends(self, file_name: str, *, seg_refused: bool = False) -> bool:
        """Whether a file of the outbox goes to this peer; after a SEG refusal the fallback's files go too."""
        kind = output_of(file_name)
        if kind is None:
            return True  # not a result kind we name: sent, as before profiles
        if kind is Output.SEG:
            return kind in self.outputs and not seg_refused
        if seg_refused and (kind, self.seg_fallback) in ((Output.SC, SegFallback.SC), (Output.SR, SegFallback.SR_ONLY)):
            return True
        return kind in self.outputs


@dataclass(frozen=True, slots=True)
class Profiles:
    """Profiles by peer AE title, and the one for every other peer."""

    peers: tuple[tuple[str, Profile], ...] = ()
    default: Profile = field(default_factory=Profile)

    def for_peer(self, ae_title: str) -> Profile:
        return next((profile for title, profile in self.peers if title == ae_title), self.default)


def output_of(file_name: str) -> Output | None:
    """The kind of result an outbox file holds, from its name (overlay-0001.dcm, seg.dcm, ...)."""
    if file_name.startswith(OVERLAY_PREFIX) and file_name.endswith(".dcm"):
        return Output.SC
    return OUTPUT_FILES.get(file_name)


def overlay_file(index: int) -> str:
    """Outbox name of the index-th (from 1) overlay image."""
    return f"{OVERLAY_PREFIX}{index:04d}.dcm"


def load_profiles(text: str) -> Profiles:
    """PACSAI_PROFILES_FILE: read and check the YAML file; ValueError says where it is wrong."""
    path = Path(text.strip()).expanduser()
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise ValueError(f"{path} cannot be read ({type(exc).__name__})") from None
    return parse_profiles(raw)


def parse_profiles(raw: Any) -> Profiles:
    """{default: {...}, peers: {AET: {...}}}, both optional; every key and value is checked."""
    if raw is None:
        return Profiles()
    if not isinstance(raw, Mapping) or set(raw) - {"default", "peers"}:
        raise ValueError("expected a mapping with 'default' and/or 'peers'")
    default = _profile(raw.get("default") or {}, Profile(), "default")
    peers = raw.get("peers") or {}
    if not isinstance(peers, Mapping):
        raise ValueError("'peers' must map AE titles to profiles")
    return Profiles(
        peers=tuple(
            (check_ae_title(str(title)), _profile(item or {}, default, f"peer {title}"))
            for title, item in peers.items()
        ),
        default=default,
    )


def _profile(item: Any, base: Profile, where: str) -> Profile:
    if not isinstance(item, Mapping):
        raise ValueError(f"{where}: expected a mapping of {', '.join(_KEYS)}")
    unknown = sorted(str(key) for key in item if key not in _KEYS)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {', '.join(_KEYS)}")
    changes: dict[str, Any] = {}
    if "outputs" in item:
        changes["outputs"] = frozenset(_choice(Output, value, f"{where}: outputs") for value in _names(item["outputs"]))
        if not changes["outputs"]:
            raise ValueError(f"{where}: outputs lists nothing (a peer that gets nothing needs no profile)")
    if "seg_omit_empty_frames" in item:
        if not isinstance(item["seg_omit_empty_frames"], bool):
            raise ValueError(f"{where}: seg_omit_empty_frames must be true or false")
        changes["seg_omit_empty_frames"] = item["seg_omit_empty_frames"]
    if "report_not_evaluated" in item:
        if not isinstance(item["report_not_evaluated"], bool):
            raise ValueError(f"{where}: report_not_evaluated must be true or false")
        changes["report_not_evaluated"] = item["report_not_evaluated"]
    if "verify" in item:
        changes["verify"] = _choice(Verify, item["verify"], f"{where}: verify")
    if "seg_fallback" in item:
        changes["seg_fallback"] = _choice(SegFallback, item["seg_fallback"], f"{where}: seg_fallback")
    if "transfer_syntaxes" in item:
        changes["transfer_syntaxes"] = _transfer_syntaxes(item["transfer_syntaxes"], where)
    if "notify" in item:
        changes["notices"] = None if item["notify"] is None else parse_notices(item["notify"], where)
    return replace(base, **changes)


def _transfer_syntaxes(value: Any, where: str) -> tuple[str, ...]:
    names = _names(value)
    unknown = [name for name in names if name not in TRANSFER_SYNTAXES]
    if unknown:
        raise ValueError(f"{where}: unknown transfer syntax(es) {unknown}; known: {', '.join(TRANSFER_SYNTAXES)}")
    uids = tuple(dict.fromkeys(TRANSFER_SYNTAXES[name] for name in names))
    if not set(uids) & set(UNCOMPRESSED):
        raise ValueError(f"{where}: transfer_syntaxes needs explicit-le or implicit-le (SEG and SR are uncompressed)")
    return uids


def _names(value: Any) -> list[str]:
    """A YAML list, or one comma-separated string."""
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, list):
        raise ValueError(f"expected a list, got {type(value).__name__}")
    return [str(item).strip().lower() for item in items if str(item).strip()]


def _choice(kind: type[_E], value: Any, where: str) -> _E:
    try:
        return kind(str(value).strip().lower())
    except ValueError:
        raise ValueError(f"{where}: '{value}' is not one of {', '.join(str(m.value) for m in kind)}") from None
