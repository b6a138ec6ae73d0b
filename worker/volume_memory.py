"""The memory of the last series' volume, kept for the next one, so the kernel does not zero fresh pages for each.

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

import numpy as np
from numpy.typing import NDArray

KEEP_BYTES = 1 << 30  # a larger volume's memory goes back to the system as before
_UNUSED_REFERENCES = 3  # the module's own, the caller's local name and getrefcount's argument
_lock = threading.Lock()
_kept: NDArray[np.float32] | None = None


def empty_volume(shape: tuple[int, ...]) -> NDArray[np.float32]:
    """An uninitialised float32 array of `shape`: the kept buffer's memory when it is free and large enough."""
    global _kept
    size = math.prod(shape)
    with _lock:
        kept = _kept
        if kept is not None and kept.size >= size and sys.getrefcount(kept) == _UNUSED_REFERENCES:
            return kept[:size].reshape(shape)
        del kept
        fresh = np.empty(size, dtype=np.float32)
        if fresh.nbytes <= KEEP_BYTES:
            _kept = fresh
        return fresh.reshape(shape)


def forget() -> None:
    """Let the kept buffer go (it is freed once no volume uses it)."""
    global _kept
    with _lock:
        _kept = None
