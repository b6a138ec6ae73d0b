"""Storing one received instance, for C-STORE and STOW-RS alike: read its header, check its UIDs and content
(validate.check_instance), move it into the spool (fsync'd) and record it in the series table; a DICOM status says how
it went, so both protocols answer and audit the same way."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID

from dicom_node.validate import check_instance
from pacsai import dimse
from pacsai.state import State
from pacsai.storage import InvalidUid, Spool, SpoolFull, check_uid

log = logging.getLogger(__name__)
_HEADER_KEYWORDS = (
    "Modality",
    "SOPClassUID",
    "BodyPartExamined",
    "SeriesDescription",
    "StudyDescription",
    "RequestedProcedurePriority",
    "ImagesInAcquisition",  # the declared size of the series (assemble.declared_instances)
    "NumberOfTemporalPositions",
    "NumberOfFrames",
)
_LEFT_ON_DISK_BYTES = 64 * 1024  # C15: values larger than this (pixel data) are not read into memory by the node


@dataclass(frozen=True, slots=True)
class Received:
    """How storing one instance went: its DICOM status, and what was read of it before that (empty: nothing)."""

    status: int
    study_uid: str = ""
    series_key: str = ""  # set once stored
    sop_class_uid: str = ""
    sop_instance_uid: str = ""

    @property
    def stored(self) -> bool:
        return self.status == dimse.SUCCESS


@dataclass(frozen=True, slots=True)
class Sender:
    """Who sent it: calling and called AE title (for STOW-RS: the user name and our AE title), extra header values."""

    calling: str
    called: str
    header: Mapping[str, str]


def header_of(ds: Dataset) -> dict[str, str]:
    """The few routing attributes we keep in the database (no patient data)."""
    return {keyword: str(ds.get(keyword, "") or "") for keyword in _HEADER_KEYWORDS}


class Truncated(Exception):
    """The data set ends inside an element of undefined length; `header` is what precedes its pixel data."""

    def __init__(self, reason: str, header: Dataset) -> None:
        super().__init__(reason)
        self.header = header


def read_received(path: Path, transfer_syntax: str) -> Dataset:
    """The header of a received file; large values stay on disk (a deflated data set is inflated whole by pydicom,
    whose offsets then refer to the inflated stream: read it without leaving anything behind).

    pydicom returns a data set without a single element when the file ends inside an element of undefined length
    (encapsulated pixel data cut short): the header is then read again up to the pixel data, to name what is wrong.
    """
    syntax = UID(transfer_syntax) if transfer_syntax else None
    defer_size = None if syntax is not None and syntax.is_deflated else _LEFT_ON_DISK_BYTES
    ds = dcmread(path, defer_size=defer_size)
    if len(ds):
        return ds
    header = dcmread(path, defer_size=defer_size, stop_before_pixels=True)
    if not len(header):
        raise Truncated("the data set is empty or ends inside an element of undefined length", header)
    if syntax is not None and syntax.is_encapsulated:
        raise Truncated("PixelData is truncated (the data set ends inside its encapsulated fragments)", header)
    raise Truncated("the data set is truncated after PixelData (it ends inside an element of undefined length)", header)


def store_received(
    spool: Spool,
    state: State,
    path: Path,
    sender: Sender,
    *,
    transfer_syntax: str,
    sop_instance_uid: str | None = None,
    study_uid: str | None = None,
    digest: str | None = None,
) -> Received:
    """Check and spool the file at `path` (moved, never copied); `sop_instance_uid`/`study_uid`: what the request
    said it holds (a C-STORE command, a STOW-RS study URL), refused with 0xA900 when the data set differs;
    `digest`: the file's SHA-256 when it was computed as the file was written."""
    calling = sender.calling
    try:
        ds = read_received(path, transfer_syntax)
        study = check_uid("StudyInstanceUID", ds.get("StudyInstanceUID"))
        series_uid = check_uid("SeriesInstanceUID", ds.get("SeriesInstanceUID"))
        sop_uid = check_uid("SOPInstanceUID", ds.get("SOPInstanceUID"))
        read = Received(dimse.DATASET_DOES_NOT_MATCH, study, "", str(ds.get("SOPClassUID", "")), sop_uid)
        for what, expected, found in (
            ("SOPInstanceUID", sop_instance_uid, sop_uid),
            ("StudyInstanceUID", study_uid, study),
        ):
            if expected is not None and expected != found:
                log.warning("refused instance from %s: %s differs from the request's", calling, what)
                return read
        header = {**header_of(ds), **sender.header}
        refusal = check_instance(ds, path.stat().st_size, transfer_syntax=transfer_syntax, source=path)
    except InvalidUid as exc:
        log.warning("refused instance from %s: %s", calling, exc)
        return Received(dimse.CANNOT_UNDERSTAND)
    except Truncated as exc:  # 0xC000, as any data set that cannot be read to its end
        log.warning("refused instance from %s: %s (0x%04X)", calling, exc, dimse.CANNOT_UNDERSTAND)
        return Received(dimse.CANNOT_UNDERSTAND, _valid_uid(exc.header, "StudyInstanceUID"))
    except RecursionError:  # C5: pydicom parses undefined-length sequences recursively
        log.warning("refused instance from %s: sequences nested too deep to decode", calling)
        return Received(dimse.CANNOT_UNDERSTAND)
    except Exception as exc:  # malformed dataset: pydicom errors may quote values, so log the type only
        log.warning("refused instance from %s: unreadable dataset (%s)", calling, type(exc).__name__)
        return Received(dimse.CANNOT_UNDERSTAND)
    if refusal is not None:
        log.warning("refused instance from %s: %s (0x%04X)", calling, refusal.reason, refusal.status)
        return Received(refusal.status, study, "", read.sop_class_uid, sop_uid)
    return _put(spool, state, path, sender, header, read, series_uid, digest)


def _put(
    spool: Spool,
    state: State,
    path: Path,
    sender: Sender,
    header: dict[str, str],
    read: Received,
    series: str,
    digest: str | None,
) -> Received:
    """Move a checked instance into the spool (fsync'd) and record it; out of resources when that fails."""
    try:
        stored = spool.put_file(read.study_uid, series, read.sop_instance_uid, path, digest=digest)
        state.record_instance(
            stored,
            calling_ae=sender.calling,
            called_ae=sender.called,
            header=header,
        )
    except SpoolFull:
        log.warning("refused instance from %s: spool disk under its reserve", sender.calling)
        return replace(read, status=dimse.OUT_OF_RESOURCES)
    except OSError as exc:
        log.error("refused instance from %s: spool write failed (%s)", sender.calling, type(exc).__name__)
        return replace(read, status=dimse.OUT_OF_RESOURCES)
    return replace(read, status=dimse.SUCCESS, series_key=stored.series_key)


def _valid_uid(ds: Dataset, keyword: str) -> str:
    """The UID if it is valid, else '' (for tallies: never raises)."""
    try:
        return check_uid(keyword, ds.get(keyword))
    except InvalidUid:
        return ""
