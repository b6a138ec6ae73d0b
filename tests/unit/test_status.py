"""How we classify the C-STORE statuses a PACS answers with."""

from __future__ import annotations

import pytest

from dicom_node.status import Outcome, classify


@pytest.mark.parametrize(("code", "outcome"), [
    (0x0000, Outcome.SUCCESS), (0xB000, Outcome.WARNING), (0xB007, Outcome.WARNING), (0x0107, Outcome.WARNING),
    (0xA700, Outcome.TRANSIENT), (0xA7FF, Outcome.TRANSIENT), (0x0213, Outcome.TRANSIENT),
    (0xA900, Outcome.PERMANENT), (0xC000, Outcome.PERMANENT), (0xC211, Outcome.PERMANENT),
    (0x0122, Outcome.PERMANENT), (0x0110, Outcome.PERMANENT),
])
def test_classify(code: int, outcome: Outcome) -> None:
    assert classify(code) is outcome
