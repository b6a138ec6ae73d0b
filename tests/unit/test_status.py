"""How we classify the C-STORE statuses a PACS answers with."""

from __future__ import annotations

import pytest

from pacsai.dimse import StoreOutcome, classify


@pytest.mark.parametrize(
    ("code", "outcome"),
    [
        (0x0000, StoreOutcome.SUCCESS),
        (0xB000, StoreOutcome.WARNING),
        (0xB007, StoreOutcome.WARNING),
        (0x0107, StoreOutcome.WARNING),
        (0xA700, StoreOutcome.TRANSIENT),
        (0xA7FF, StoreOutcome.TRANSIENT),
        (0x0213, StoreOutcome.TRANSIENT),
        (0xA900, StoreOutcome.PERMANENT),
        (0xC000, StoreOutcome.PERMANENT),
        (0xC211, StoreOutcome.PERMANENT),
        (0x0122, StoreOutcome.PERMANENT),
        (0x0110, StoreOutcome.PERMANENT),
    ],
)
def test_classify(code: int, outcome: StoreOutcome) -> None:
    assert classify(code) is outcome
