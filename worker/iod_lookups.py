"""highdicom's "is this attribute in that IOD" lookups, memoised.

highdicom answers `is_attribute_in_iod(attribute, sop_class_uid)` by walking every attribute of every module of the
IOD in its standard tables (~1 ms each), and asks it once per source image when it builds a SEG
(`get_plane_positions_of_series` checks each of the 300 CT slices for being multi-frame): ~0.3 s of the SEG build
for a 300-slice CT. The answer depends only on the arguments and on tables highdicom loads once at import, so it is
cached here; `install()` puts the cached function where highdicom looks it up. A highdicom whose module no longer
has that function is left as it is.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

from highdicom import _standard_utils, base

_SOURCES = (_standard_utils, base)  # where highdicom calls it from (base imported it by name)


def memoised(lookup: Callable[..., bool]) -> Callable[..., bool]:
    """`lookup(attribute, sop_class_uid, exclude_path_elements=None)`, cached on its (hashable) arguments."""

    @functools.lru_cache(maxsize=4096)
    def cached(attribute: str, sop_class_uid: str, excluded: tuple[str, ...] | None) -> bool:
        return lookup(attribute, sop_class_uid, exclude_path_elements=None if excluded is None else list(excluded))

    @functools.wraps(lookup)
    def is_attribute_in_iod(
        attribute: str, sop_class_uid: str, exclude_path_elements: Sequence[str] | None = None
    ) -> bool:
        excluded = None if exclude_path_elements is None else tuple(exclude_path_elements)
        return cached(str(attribute), str(sop_class_uid), excluded)

    is_attribute_in_iod.cache_info = cached.cache_info  # type: ignore[attr-defined]
    is_attribute_in_iod.uncached = lookup  # type: ignore[attr-defined]
    return is_attribute_in_iod


def install() -> None:
    """Process-wide and idempotent."""
    original: Any = getattr(_standard_utils, "is_attribute_in_iod", None)
    if original is None or hasattr(original, "uncached"):
        return
    fast = memoised(original)
    for module in _SOURCES:
        if getattr(module, "is_attribute_in_iod", None) is original:
            module.is_attribute_in_iod = fast  # type: ignore[attr-defined]
