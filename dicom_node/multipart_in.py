"""A STOW-RS request body (multipart/related; type="application/dicom") streamed part by part into files beside
the spool, never held in memory; parsing by python-multipart's MultipartParser (the parser Starlette's forms use)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from python_multipart.multipart import MultipartParser, parse_options_header

PREFIX = "incoming-stow-"  # stream_to_disk.remove_leftovers() deletes what a killed node left under this prefix
DICOM = "application/dicom"


class UnsupportedMedia(ValueError):
    """The request is not multipart/related of application/dicom parts (HTTP 415)."""


def boundary_of(content_type: str) -> str:
    """The boundary of a 'multipart/related; type="application/dicom"; boundary=...' request."""
    media, options = parse_options_header(content_type)
    kind = options.get(b"type", b"").decode("latin-1").strip('"').lower()
    boundary = options.get(b"boundary", b"").decode("latin-1")
    if media.lower() != b"multipart/related" or kind != DICOM or not boundary:
        raise UnsupportedMedia('expected multipart/related; type="application/dicom" with a boundary')
    return boundary


@dataclass(slots=True)
class Part:
    """One part as received: where it was written, its media type, and whether it went over the size cap."""

    path: Path
    media_type: str
    too_large: bool = False
    no_room: bool = False  # the disk fell under the spool's reserve while it arrived: not kept
    size: int = 0


@dataclass(slots=True)
class _Open:
    part: Part
    handle: BinaryIO
    headers: dict[str, str] = field(default_factory=dict)


class PartsToFiles:
    """Feed the body with write(); each part lands in its own private file under `directory` (`max_part_bytes`:
    a larger part stops being written and is marked too large; `reserve_bytes`: free disk a part never eats into)."""

    def __init__(self, directory: Path, boundary: str, max_part_bytes: int, reserve_bytes: int = 0) -> None:
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        self.directory, self.max_part_bytes, self.reserve_bytes = directory, max_part_bytes, reserve_bytes
        self.parts: list[Part] = []
        self._open: _Open | None = None
        self._field, self._value = b"", b""
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._begin,
                "on_header_field": self._header_field,
                "on_header_value": self._header_value,
                "on_header_end": self._header_end,
                "on_headers_finished": self._headers_finished,
                "on_part_data": self._data,
                "on_part_end": self._end,
            },
        )

    def write(self, chunk: bytes) -> None:
        self._parser.write(chunk)

    def discard(self) -> None:
        """Remove every part's file that is still here (stored parts were moved into the spool)."""
        if self._open is not None:
            self._open.handle.close()
        for part in self.parts + ([self._open.part] if self._open else []):
            with contextlib.suppress(FileNotFoundError):
                part.path.unlink()

    def _begin(self) -> None:
        fd, name = tempfile.mkstemp(prefix=PREFIX, dir=self.directory)
        self._open = _Open(Part(Path(name), ""), os.fdopen(fd, "wb"))

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self._field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self._value += data[start:end]

    def _header_end(self) -> None:
        if self._open is not None:
            self._open.headers[self._field.decode("latin-1").strip().lower()] = self._value.decode("latin-1").strip()
        self._field, self._value = b"", b""

    def _headers_finished(self) -> None:
        if self._open is not None:
            media, _ = parse_options_header(self._open.headers.get("content-type", ""))
            self._open.part.media_type = media.decode("latin-1").lower()

    def _data(self, data: bytes, start: int, end: int) -> None:
        current = self._open
        if current is None or current.part.too_large or current.part.no_room:
            return
        current.part.size += end - start
        if current.part.size > self.max_part_bytes:
            current.part.too_large = True
            current.handle.truncate(0)
            return
        if shutil.disk_usage(self.directory).free - (end - start) < self.reserve_bytes:
            current.part.no_room = True
            current.handle.truncate(0)
            return
        current.handle.write(data[start:end])

    def _end(self) -> None:
        if self._open is not None:
            self._open.handle.close()
            self.parts.append(self._open.part)
            self._open = None
