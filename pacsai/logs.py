"""Logging without patient identifiers: keyed study keys, context fields, quiet third-party loggers."""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import hmac
import logging
import re
import sys
from collections.abc import Iterator

_context: contextvars.ContextVar[tuple[tuple[str, str], ...]] = contextvars.ContextVar("pacsai_log", default=())
# C0 and C1 controls (newlines, ANSI escapes) and Unicode line breaks: a value could otherwise forge a log line
_CONTROL = re.compile("[\x00-\x08\x0a-\x1f\x7f-\x9f\u2028\u2029]")


def key_of(log_key: bytes, uid: str, *, length: int = 24) -> str:
    """Keyed hash of a UID: stable per deployment, reveals nothing without the key; used in logs and file names."""
    return hmac.new(log_key, uid.encode("ascii", "replace"), hashlib.sha256).hexdigest()[:length]


@contextlib.contextmanager
def log_context(**fields: str) -> Iterator[None]:
    """Add fields (study key, task id, model) to every log line written inside the block."""
    token = _context.set((*_context.get(), *fields.items()))
    try:
        yield
    finally:
        _context.reset(token)


class _ContextFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.ctx = "".join(f" {name}={value}" for name, value in dict(_context.get()).items())
        return True


_QUOTED = re.compile(r"'[^']*'|\"[^\"]*\"")
_UID_LIKE = re.compile(r"\b\d+(?:\.\d+){2,}\b")


class _ThirdPartyRedactor(logging.Filter):
    """pydicom, pynetdicom and Python warnings may quote element values (UIDs, names): withhold them."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.startswith(("pydicom", "pynetdicom", "py.warnings", "highdicom", "celery", "kombu")):
            text = _UID_LIKE.sub("<uid>", _QUOTED.sub("'<value>'", record.getMessage()))
            record.msg, record.args = text, None
            if record.exc_info and record.exc_info[1] is not None:
                record.exc_text = f"{type(record.exc_info[1]).__name__} (message withheld)"
                record.exc_info = None
        return True


def escape_controls(text: str) -> str:
    """Control characters as visible escapes (\\x1b, \\n, \\u2028): one log line stays one line, no terminal codes."""
    return _CONTROL.sub(
        lambda m: f"\\x{ord(m.group()):02x}" if ord(m.group()) < 0x100 else f"\\u{ord(m.group()):04x}", text
    )


class _SafeFormatter(logging.Formatter):
    """Escape control characters in the message line (ANSI, newlines in values) so a peer cannot forge log lines.

    The whole message is escaped, whatever it interpolates; only a traceback, which the formatter appends after the
    message, keeps its own line breaks.
    """

    def formatMessage(self, record: logging.LogRecord) -> str:  # noqa: N802 - logging.Formatter's name
        return escape_controls(super().formatMessage(record))


def configure(level: str = "INFO") -> None:
    """Install our handler on the root logger and silence identifier logging in pynetdicom."""
    from pynetdicom import _config

    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    _config.LOG_HANDLER_LEVEL = "none"
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_ContextFilter())
    handler.addFilter(_ThirdPartyRedactor())
    logging.captureWarnings(True)
    handler.setFormatter(_SafeFormatter("%(asctime)s %(levelname)s %(name)s:%(ctx)s %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)
    logging.getLogger("kombu.connection").setLevel(logging.ERROR)  # "no hostname" for the on-disk queue
    for noisy in ("pynetdicom", "pydicom", "highdicom", "celery", "kombu", "amqp", "PIL"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
    # pynetdicom's own handler duplicates and may quote element values
    logging.getLogger("pynetdicom").handlers.clear()
    logging.getLogger("pynetdicom").propagate = True
