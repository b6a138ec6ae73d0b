"""The `notify` block of destination profiles (pacsai/notices.py): targets, auth, critical rules, specific errors."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from pacsai.notices import CriticalRule, FhirAuth, parse_notices
from pacsai.profiles import parse_profiles


def test_a_peer_gets_hl7_and_fhir_notices_others_none() -> None:
    profiles = parse_profiles(
        {
            "peers": {
                "PACS": {
                    "notify": {
                        "hl7": {"host": "ris.local", "port": 2575, "receiving_application": "RIS", "ca": "/ca.pem"},
                        "fhir": {"url": "https://ehr/fhir/", "auth": "basic", "username": "u", "password_file": "/p"},
                        "critical": [{"finding": "233604007", "at_least": 0.8}, {"finding": "Pneumothorax"}],
                        "max_attempts": 3,
                    }
                }
            }
        }
    )
    notices = profiles.for_peer("PACS").notices
    assert notices is not None and profiles.for_peer("OTHER").notices is None
    assert notices.hl7 is not None and notices.hl7.tls and notices.hl7.ca == Path("/ca.pem")
    assert notices.fhir is not None and notices.fhir.base_url == "https://ehr/fhir"
    assert notices.fhir.auth is FhirAuth.BASIC
    assert notices.critical == (CriticalRule("233604007", "Probability", 0.8), CriticalRule("Pneumothorax"))
    assert notices.max_attempts == 3


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({}, "names neither hl7 nor fhir"),
        ({"hl7": {"host": "h"}}, "host and port are required"),
        ({"hl7": {"host": "h", "port": 70000}}, "out of range"),
        ({"hl7": {"host": "h", "port": 1, "sending_application": "A|B"}}, "HL7 delimiters"),
        ({"fhir": {"url": "ftp://x"}}, "http(s) FHIR base URL"),
        ({"fhir": {"url": "https://x", "auth": "bearer"}}, "needs token_file"),
        ({"fhir": {"url": "https://x", "auth": "basic", "username": "u"}}, "needs username and password_file"),
        ({"fhir": {"url": "https://x", "auth": "kerberos"}}, "none, bearer or basic"),
        ({"fhir": {"url": "https://x"}, "critical": [{"at_least": 1}]}, "names a finding"),
        ({"fhir": {"url": "https://x"}, "email": "x"}, "unknown key(s) ['email']"),
        ({"fhir": {"url": "https://x"}, "max_attempts": 0}, "max_attempts must be >= 1"),
    ],
)
def test_each_mistake_is_named(block: dict[str, Any], message: str) -> None:
    with pytest.raises(ValueError, match="peer PACS") as error:
        parse_notices(block, "peer PACS")
    assert message in str(error.value)
