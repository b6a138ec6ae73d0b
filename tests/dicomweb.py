"""STOW-RS from tests: a multipart/related body written here (independent of pacsai's own client) and POSTed with
httpx; console users made straight in the system of record."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import httpx

from dicom_node.console.auth import hash_password
from pacsai.console_db import ConsoleTables
from pacsai.state import State
from tests.services import port_open, wait_until

BOUNDARY = "test-boundary-7d3f"
STOW_TYPE = f'multipart/related; type="application/dicom"; boundary={BOUNDARY}'


def add_user(data: Path, username: str, password: str, role: str) -> None:
    state = State(data / "pacsai.db")
    try:
        ConsoleTables(state).add_user(username, hash_password(password), role, phi=False)
    finally:
        state.close()


def body_of(parts: Sequence[bytes], media_type: str = "application/dicom") -> bytes:
    chunks = [f"--{BOUNDARY}\r\nContent-Type: {media_type}\r\n\r\n".encode() + part + b"\r\n" for part in parts]
    return b"".join(chunks) + f"--{BOUNDARY}--\r\n".encode()


def stow(
    url: str, parts: Sequence[bytes], *, auth: httpx.Auth | None = None, headers: dict[str, str] | None = None
) -> httpx.Response:
    """POST the parts to url (…/dicom-web/studies[/{study}]); the response as it came."""
    sent = {"Content-Type": STOW_TYPE, "Accept": "application/dicom+json", **(headers or {})}
    return httpx.post(url, content=body_of(parts), headers=sent, auth=auth, timeout=60)


def wait_for_web(port: int) -> None:
    wait_until(lambda: port_open(port), 30, "the console's HTTP port")
