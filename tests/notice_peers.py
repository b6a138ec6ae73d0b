"""Receivers of our notices for the tests: an MLLP listener (asyncio server, python-hl7 parsing) ACKing as scripted, and
an HTTP FHIR endpoint (http.server) that validates each DiagnosticReport with fhir.resources before answering."""

from __future__ import annotations

import asyncio
import json
import ssl
import subprocess
import threading
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import hl7
from fhir.resources.R4B.diagnosticreport import DiagnosticReport
from pydantic import ValidationError

START, END = b"\x0b", b"\x1c\x0d"


class MllpListener:
    """Receives ORU messages on a free loopback port; answers each with the next scripted (code, text), then AA."""

    def __init__(self, answers: list[tuple[str, str]] | None = None, *, tls: ssl.SSLContext | None = None) -> None:
        self.answers = list(answers or [])
        self._tls = tls
        self.received: list[str] = []
        self.port = 0
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        ready = threading.Event()
        self._thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError("MLLP listener did not start")

    def _run(self, ready: threading.Event) -> None:
        asyncio.set_event_loop(self._loop)
        started = asyncio.start_server(self._client, "127.0.0.1", 0, ssl=self._tls)
        self._server = self._loop.run_until_complete(started)
        self.port = int(self._server.sockets[0].getsockname()[1])
        ready.set()
        self._loop.run_forever()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """MLLP framing (<VT> message <FS><CR>) by hand: python-hl7's own server hangs in the TLS handshake."""
        try:
            while not reader.at_eof():
                block = await reader.readuntil(END)
                message = hl7.parse(block.removeprefix(START).removesuffix(END).decode("utf-8"))
                self.received.append(str(message))
                code, text = self.answers.pop(0) if self.answers else ("AA", "")
                control = str(message.segment("MSH")(10))
                now = datetime.now(UTC).strftime("%Y%m%d%H%M%S")
                ack = f"MSH|^~\\&|RIS|HOSP|PACSAI||{now}||ACK^R01^ACK|A{len(self.received)}|P|2.5.1\r"
                writer.write(START + f"{ack}MSA|{code}|{control}|{text}".encode() + END)
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError, ssl.SSLError):
            pass
        finally:
            writer.close()

    def stop(self) -> None:
        if self._server is not None:
            self._loop.call_soon_threadsafe(self._server.close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)


class FhirReceiver:
    """POST {base}/DiagnosticReport: 401 without the bearer token, 400 with an OperationOutcome when fhir.resources
    finds the resource invalid, else the next scripted status (then 201 with a Location)."""

    def __init__(self, token: str, statuses: list[int] | None = None, *, tls: ssl.SSLContext | None = None) -> None:
        self.token, self.statuses = token, list(statuses or [])
        self.received: list[dict[str, Any]] = []
        self.headers: list[dict[str, str]] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        if tls is not None:
            self.server.socket = tls.wrap_socket(self.server.socket, server_side=True)
        scheme = "https" if tls is not None else "http"
        self.url = f"{scheme}://127.0.0.1:{self.server.server_address[1]}/fhir"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                receiver.headers.append(dict(self.headers.items()))
                if self.path != "/fhir/DiagnosticReport":
                    return self._answer(404, outcome("not-found", self.path))
                if self.headers.get("Authorization") != f"Bearer {receiver.token}":
                    return self._answer(401, outcome("login", "bearer token required"))
                try:
                    resource = DiagnosticReport.model_validate_json(body)
                except ValidationError as exc:
                    return self._answer(400, outcome("invalid", str(exc)[:300]))
                receiver.received.append(json.loads(resource.model_dump_json(exclude_none=True)))
                status = receiver.statuses.pop(0) if receiver.statuses else 201
                if status == 201:
                    return self._answer(201, body, location=f"DiagnosticReport/{len(receiver.received)}/_history/1")
                return self._answer(status, outcome("exception" if status >= 500 else "invalid", f"scripted {status}"))

            def _answer(self, status: int, body: bytes, *, location: str = "") -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/fhir+json")
                self.send_header("Content-Length", str(len(body)))
                if location:
                    self.send_header("Location", f"{receiver.url}/{location}")
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 (http.server's name)
                return

        return Handler

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self._thread.join(5)


def server_tls(folder: Path) -> tuple[ssl.SSLContext, Path]:
    """A self-signed certificate for 127.0.0.1 (openssl), as a server context and the CA file a client trusts."""
    cert, key = folder / "server.pem", folder / "server.key"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(cert)]
        + ["-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True,
        capture_output=True,
        timeout=60,
    )
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert, key)
    return context, cert


def outcome(code: str, diagnostics: str) -> bytes:
    issue = {"severity": "error", "code": code, "diagnostics": diagnostics}
    return json.dumps({"resourceType": "OperationOutcome", "issue": [issue]}).encode()
