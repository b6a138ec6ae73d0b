"""Profile key `verify` (proof of delivery): its values, its default, and a wrong value named."""

from __future__ import annotations

import pytest

from pacsai.profiles import Verify, parse_profiles


def test_verify_defaults_to_none_and_peers_inherit_the_default() -> None:
    profiles = parse_profiles({"default": {"verify": "query"}, "peers": {"ORTHANC": {"verify": "commitment"}}})
    assert profiles.for_peer("ORTHANC").verify is Verify.COMMITMENT
    assert profiles.for_peer("OTHER").verify is Verify.QUERY
    assert parse_profiles(None).default.verify is Verify.NONE


def test_a_wrong_verify_value_is_named() -> None:
    with pytest.raises(ValueError, match="peer PACS: verify: 'maybe' is not one of commitment, query, none"):
        parse_profiles({"peers": {"PACS": {"verify": "maybe"}}})
