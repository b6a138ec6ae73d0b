"""DICOM over TLS (PS3.15 B.9, BCP 195 profile): SSL contexts for the SCP and for sending, and the TLS server.

The server's context is rebuilt when its certificate, key or CA file changes (checked on each new connection), so
certificates are rotated by replacing the files: no restart, no signal. The TLS handshake runs in the connection's own
thread under a total deadline, never in pynetdicom's accept loop (which would let one slow client block all others).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import ssl
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from dicom_node.guard import GuardedServer
from pacsai.errors import ConfigError
from pacsai.peers import PeerTls
from pacsai.settings import Settings

log = logging.getLogger(__name__)
MINIMUM_VERSION = ssl.TLSVersion.TLSv1_2
# BCP 195 (RFC 9325) TLS 1.2 suites: forward secrecy and AEAD only; TLS 1.3 suites are OpenSSL's defaults (all AEAD)
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20:DHE+AESGCM:DHE+CHACHA20"


def _harden(context: ssl.SSLContext) -> ssl.SSLContext:
    context.minimum_version = MINIMUM_VERSION
    context.set_ciphers(TLS12_CIPHERS)
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    return context


def server_context(cert: Path, key: Path, ca: Path | None) -> ssl.SSLContext:
    """Our certificate; with a CA, every caller must present a certificate that CA signed (mutual TLS)."""
    context = _harden(ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER))
    context.load_cert_chain(cert, key)
    if ca is not None:
        context.load_verify_locations(cafile=ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(tls: PeerTls) -> ssl.SSLContext:
    """Verify the peer's certificate and host name (CA file, else the system's CAs); present ours when configured."""
    context = _harden(ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.ca))
    if tls.cert is not None and tls.key is not None:
        context.load_cert_chain(tls.cert, tls.key)
    return context


def tls_args(host: str, tls: PeerTls | None) -> tuple[ssl.SSLContext, str] | None:
    """What pynetdicom's associate() takes as tls_args for this peer (None: plain TCP)."""
    return None if tls is None else (client_context(tls), host)


def _signature(files: tuple[Path, ...]) -> tuple[tuple[int, int, int], ...]:
    stats = [os.stat(path) for path in files]
    return tuple((stat.st_ino, stat.st_size, stat.st_mtime_ns) for stat in stats)


class ReloadingContext:
    """The server's SSL context, rebuilt from its files when one of them changed since the last connection."""

    def __init__(self, settings: Settings) -> None:
        assert settings.security.tls_cert is not None and settings.security.tls_key is not None
        self._cert, self._key, self._ca = (
            settings.security.tls_cert,
            settings.security.tls_key,
            settings.security.tls_ca,
        )
        self._files = tuple(path for path in (self._cert, self._key, self._ca) if path is not None)
        self._lock = threading.Lock()
        try:
            self._seen = _signature(self._files)
            self._context = server_context(self._cert, self._key, self._ca)
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"PACSAI_TLS_CERT, PACSAI_TLS_KEY or PACSAI_TLS_CA cannot be loaded ({handshake_failure(exc)})"
            ) from None
        if os.stat(self._key).st_mode & 0o077:
            log.warning("PACSAI_TLS_KEY is readable by group or others; make it readable by this user only")

    @property
    def mutual(self) -> bool:
        return self._ca is not None

    def current(self) -> ssl.SSLContext:
        with self._lock:
            try:
                seen = _signature(self._files)
                if seen != self._seen:
                    self._seen = seen
                    self._context = server_context(self._cert, self._key, self._ca)
                    log.info("TLS certificate files changed: reloaded")
            except (OSError, ssl.SSLError) as exc:  # mid-rotation (key and certificate not matching yet): keep the old
                log.warning(
                    "TLS certificate files changed but cannot be loaded (%s); keeping the previous ones",
                    type(exc).__name__,
                )
            return self._context


def handshake_failure(exc: BaseException) -> str:
    """A short, value-free reason: OpenSSL's reason code (e.g. UNSUPPORTED_PROTOCOL), or the exception type."""
    reason = getattr(exc, "reason", None)
    return str(reason) if reason else type(exc).__name__


class TlsServer(GuardedServer):
    """The guarded association server, with the TLS handshake done per connection before any DICOM PDU is read."""

    handshake_deadline_s = 10.0
    tls: ReloadingContext | None = None
    on_refused: Callable[[str, str], None] | None = None  # (address, why), for audit and metrics

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        address = str(client_address[0])
        try:
            request = self._handshake(request)
        except (OSError, ValueError) as exc:  # ssl.SSLError is an OSError; ValueError: no context
            self.shutdown_request(request)
            why = handshake_failure(exc)
            log.warning("TLS handshake from %s failed (%s); connection closed", address, why)
            if self.on_refused is not None:
                self.on_refused(address, why)
            return
        super().process_request_thread(request, client_address)

    def _handshake(self, sock: socket.socket) -> ssl.SSLSocket:
        if self.tls is None:
            raise ValueError("no TLS context")
        watch = sock.dup()  # the wrapped socket takes over sock; the duplicate lets the timer end a slow handshake
        timer = threading.Timer(self.handshake_deadline_s, _shut, (watch,))
        timer.start()
        try:
            sock.settimeout(self.handshake_deadline_s)
            wrapped = self.tls.current().wrap_socket(sock, server_side=True)
        finally:
            timer.cancel()
            watch.close()
        wrapped.settimeout(None)
        return wrapped


def _shut(sock: socket.socket) -> None:
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)
