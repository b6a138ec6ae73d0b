"""worker/volume_memory.py: a series' volume reuses the last one's memory only when nothing holds it any more."""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray

from bench.make_ct import write_ct
from worker import volume_memory
from worker.load_volume import load_series


def _address(array: NDArray[np.float32]) -> int:
    return int(array.__array_interface__["data"][0])


@pytest.fixture(autouse=True)
def _nothing_kept() -> Iterator[None]:
    volume_memory.forget()
    yield
    volume_memory.forget()


def test_a_held_volume_or_any_view_of_it_is_never_lent_again() -> None:
    first = volume_memory.empty_volume((4, 8, 8))
    first[...] = 7.0
    second = volume_memory.empty_volume((4, 8, 8))
    assert not np.shares_memory(first, second)
    one_slice = second[2]
    kept_at = _address(second)
    del second
    third = volume_memory.empty_volume((4, 8, 8))  # a slice of `second` is still alive
    assert _address(third) != kept_at
    assert np.all(first == 7.0)
    del one_slice


def test_a_free_buffer_is_lent_for_the_same_or_a_smaller_volume_not_a_larger_one() -> None:
    volume = volume_memory.empty_volume((4, 8, 8))
    kept_at = _address(volume)
    del volume
    smaller = volume_memory.empty_volume((3, 8, 8))
    assert _address(smaller) == kept_at and smaller.shape == (3, 8, 8) and smaller.flags.c_contiguous
    del smaller
    larger = volume_memory.empty_volume((5, 8, 8))
    assert larger.size == 5 * 8 * 8


def test_buffers_over_the_limit_are_not_kept(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(volume_memory, "KEEP_BYTES", 1000)
    big = volume_memory.empty_volume((4, 8, 8))  # 1024 bytes
    del big
    small = volume_memory.empty_volume((2, 8, 8))
    assert small.nbytes <= 1000  # a new buffer (kept from now on), not the big one
    del small
    assert volume_memory._kept is not None and volume_memory._kept.nbytes == 512


def test_loads_give_the_same_volume_whether_the_memory_is_new_or_reused(tmp_path: Path) -> None:
    """Two series loaded while the first is held (new memory), then again once it is dropped (its memory reused):
    every load has the same values as a load on new memory; a held volume is never overwritten."""
    first_paths = write_ct(tmp_path / "a", slices=6, size=32, seed=1)
    second_paths = write_ct(tmp_path / "b", slices=6, size=32, seed=2)
    first = load_series(first_paths)
    expected_first = first.array.copy()
    second = load_series(second_paths)
    assert not np.shares_memory(first.array, second.array)
    assert np.array_equal(first.array, expected_first)  # untouched by the second load
    expected_second = second.array.copy()
    kept_at = _address(second.array)
    del second
    gc.collect()
    again = load_series(second_paths)
    assert _address(again.array) == kept_at  # the dropped volume's memory
    assert np.array_equal(again.array, expected_second)
    assert np.array_equal(first.array, expected_first)
