"""Group commit: rows that concurrent threads must each see committed before they go on are written together.

The first thread to take the commit lock writes every row waiting at that moment in one transaction (one fsync of
the database's log for all of them); the threads whose rows it wrote return as soon as it has committed, with its
error if it failed. A lone writer commits its own row at once: nothing waits for a batch to fill.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import Generic, TypeVar

Row = TypeVar("Row")


class _Entry(Generic[Row]):
    __slots__ = ("done", "error", "row")

    def __init__(self, row: Row) -> None:
        self.row = row
        self.done = False
        self.error: BaseException | None = None


class GroupCommit(Generic[Row]):
    """Commits rows of concurrent threads in shared transactions (see the module docstring)."""

    def __init__(self, write: Callable[[Sequence[Row]], None]) -> None:
        self._write = write  # writes and commits the rows in one transaction
        self._pending: list[_Entry[Row]] = []
        self._pending_lock = threading.Lock()
        self._commit_lock = threading.Lock()

    def commit(self, row: Row) -> None:
        """Return once `row` is committed, together with whatever other threads were waiting to commit."""
        entry = _Entry(row)
        with self._pending_lock:
            self._pending.append(entry)
        with self._commit_lock:
            if not entry.done:  # nobody took it yet: this thread writes the batch
                with self._pending_lock:
                    batch, self._pending = self._pending, []
                try:
                    self._write([waiting.row for waiting in batch])
                except BaseException as exc:
                    for waiting in batch:
                        waiting.error = exc
                    raise
                finally:
                    for waiting in batch:
                        waiting.done = True
        if entry.error is not None:
            raise entry.error
