"""Limits that span the receiver processes (dicom_node/receivers.py), counted in shared memory.

One row per receiver process: the associations it admitted (PACSAI_MAX_ASSOCIATIONS) and the connections it holds per
source address (PACSAI_MAX_CONNECTIONS_PER_ADDRESS), by a 64-bit hash of the address. Each process writes only its
own row, under the shared lock when it decides on a limit, and adds up the others'; the node process clears the row of
a receiver that died.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
from collections.abc import Iterator, Mapping
from typing import Any

log = logging.getLogger(__name__)
ADDRESS_SLOTS = 256  # distinct source addresses one receiver publishes (more: the ones holding most connections)
LOCK_WAIT_S = 5.0  # the lock is held for microseconds: longer means its holder died (see SharedLimits.recover)


def _address_hash(address: str) -> int:
    return int.from_bytes(hashlib.blake2b(address.encode(), digest_size=8).digest(), "little") or 1  # 0: empty slot


class SharedLimits:
    """Associations admitted and connections per source address, one row per receiver process, in shared memory.

    Each process writes only its own row (`index`), under `lock` when it decides on a limit; it reads the others'.
    """

    def __init__(self, receivers: int, context: Any) -> None:
        self.receivers, self.index = receivers, 0
        self.lock = context.Lock()
        self._associations = context.RawArray("i", receivers)
        self._hashes = context.RawArray("Q", receivers * ADDRESS_SLOTS)
        self._counts = context.RawArray("i", receivers * ADDRESS_SLOTS)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold the shared lock to decide on a limit; if it cannot be had within LOCK_WAIT_S (a receiver killed while
        holding it, before the node freed it), decide without it rather than stop taking connections."""
        acquired = self.lock.acquire(timeout=LOCK_WAIT_S)
        if not acquired:
            log.error("the receivers' shared lock was not free within %.0f s; deciding without it", LOCK_WAIT_S)
        try:
            yield
        finally:
            if acquired:
                self.lock.release()

    def recover(self) -> None:
        """After a receiver died: free the lock if it died holding it (nothing else holds it for a second)."""
        if self.lock.acquire(timeout=1.0):
            self.lock.release()
        else:
            self.lock.release()
            log.warning("a receiver died holding the shared lock; freed it")

    def associations_elsewhere(self) -> int:
        return int(sum(self._associations) - self._associations[self.index])

    def publish_associations(self, admitted: int) -> None:
        self._associations[self.index] = admitted

    def connections_elsewhere(self, address: str) -> int:
        wanted, held = _address_hash(address), 0
        for row in range(self.receivers):
            if row == self.index:
                continue
            start = row * ADDRESS_SLOTS
            for slot in range(start, start + ADDRESS_SLOTS):
                if self._counts[slot] == 0:
                    break  # a row is written densely: the first empty slot ends it
                if self._hashes[slot] == wanted:
                    held += self._counts[slot]
        return held

    def publish_connections(self, held: Mapping[str, int]) -> None:
        """This process's connections per source address (replaces what it published before)."""
        start = self.index * ADDRESS_SLOTS
        busiest = sorted(((count, address) for address, count in held.items() if count > 0), reverse=True)
        for offset, (count, address) in enumerate(busiest[:ADDRESS_SLOTS]):
            self._hashes[start + offset], self._counts[start + offset] = _address_hash(address), count
        for slot in range(start + min(len(busiest), ADDRESS_SLOTS), start + ADDRESS_SLOTS):
            if self._counts[slot] == 0:
                break
            self._counts[slot] = 0

    def clear(self, index: int) -> None:
        """A receiver died: nothing it held counts any more."""
        with self.locked():
            self._associations[index] = 0
            for slot in range(index * ADDRESS_SLOTS, (index + 1) * ADDRESS_SLOTS):
                self._counts[slot] = 0
