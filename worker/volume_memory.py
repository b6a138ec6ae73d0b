"""The memory of the last series' volume and label map, kept for the next series, so the kernel does not zero fresh
pages for each.

numpy takes a large array's memory straight from the kernel (mmap; huge pages where it may) and hands it back when
the array is freed, so every 300 × 512² float32 volume (315 MB) is faulted in and zeroed anew: 0.03–0.5 s of system
time per load on our development VM (docs/benchmarks.md). The kept buffer is lent only when nothing else holds it
(no Volume, no view of it: every numpy view holds a reference to it), so a volume still in use is never written
into: the next load then takes new memory. Buffers over KEEP_BYTES are not kept (an idle worker would hold them).
"""

from __future__ import annotations

import math
import sys
import threading
from typing import Any, TypeVar

import numpy as np
from numpy.typing import NDArray

ScalarT = TypeVar("ScalarT", bound=np.generic)

KEEP_BYTES = 1 << 30  # a larger volume's memory goes back to the system as before
_UNUSED_REFERENCES = 3  # the dictionary's own, the caller's local name and getrefcount's argument
_lock = threading.Lock()
_kept: dict[str, NDArray[Any]] = {}  # by use: the series' float32 volume, the uint8 label map on its grid


def empty_volume(shape: tuple[int, ...]) -> NDArray[np.float32]:
    """An uninitialised float32 array of `shape`: the last volume's memory when it is free and large enough."""
    return _lend("volume", shape, np.float32)


def empty_labels(shape: tuple[int, ...]) -> NDArray[np.uint8]:
    """An uninitialised uint8 label map of `shape` (on the source grid), lent as the volume is."""
    return _lend("labels", shape, np.uint8)


def _lend(use: str, shape: tuple[int, ...], dtype: type[ScalarT]) -> NDArray[ScalarT]:
    size = math.prod(shape)
    with _lock:
        kept = _kept.get(use)
        if kept is not None and kept.size >= size and sys.getrefcount(kept) == _UNUSED_REFERENCES:
            return kept[:size].reshape(shape)
        del kept
        fresh = np.empty(size, dtype=dtype)
        if fresh.nbytes <= KEEP_BYTES:
            _kept[use] = fresh
        return fresh.reshape(shape)


def forget() -> None:
    """Let the kept buffers go (each is freed once nothing uses it)."""
    with _lock:
        _kept.clear()
