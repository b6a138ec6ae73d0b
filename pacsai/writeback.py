"""Start writing a file's pages to disk while it is still being received, so the fsync before success waits less.

A streamed instance arrives over several milliseconds; asking the kernel to begin writeback of each part as it is
written (Linux sync_file_range with SYNC_FILE_RANGE_WRITE: asynchronous, it does not wait for the disk) leaves the
fsync that makes the instance durable only the last part and the metadata to wait for. Durability does not depend on
it: the fsync is still what the success answer waits for. Elsewhere (not Linux, or no libc) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Callable

SYNC_FILE_RANGE_WRITE = 2  # linux/fs.h


def _load() -> Callable[[int, int, int, int], int] | None:
    if not sys.platform.startswith("linux") or not (name := ctypes.util.find_library("c")):
        return None
    try:
        function = ctypes.CDLL(name, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_sync_file_range = _load()


def start_writeback(fd: int, offset: int, length: int) -> bool:
    """Begin writing bytes [offset, offset + length) of `fd` to disk without waiting; False when not available or
    refused (a file system without it, a pipe): the caller's fsync does all the work then, as without this."""
    if _sync_file_range is None or length <= 0:
        return False
    return _sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE) == 0
