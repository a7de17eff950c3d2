"""Logging to stdout: JSON lines for machines, plain lines on a terminal.

Callers pass structured fields with `extra={...}`; they must never include emails or tokens
(customer data stays out of logs entirely: log counts, shops and reasons). What libraries log is
not ours to word, so every record passes RedactSecrets on its way out.
"""

from __future__ import annotations

import logging
import re
import sys
import time
from collections.abc import Iterable
from typing import Any

import msgspec

from common.settings import Settings

# Attributes every LogRecord has; anything else came from `extra=` and is worth printing.
_STANDARD = set(logging.LogRecord("", 0, "", 0, "", (), None).__dict__) | {"message", "asctime"}
_encode = msgspec.json.Encoder().encode


def _extras(record: logging.LogRecord) -> dict[str, Any]:
    return {k: v for k, v in record.__dict__.items() if k not in _STANDARD}


def _exception_text(formatter: logging.Formatter, record: logging.LogRecord) -> str | None:
    # RedactSecrets leaves the redacted traceback in exc_text: print that, never a fresh one.
    if record.exc_info and not record.exc_text:
        record.exc_text = formatter.formatException(record.exc_info)
    return record.exc_text or None


REDACTED = "[redacted]"

# Where a secret sits in text that libraries log: the value of a query parameter named like a
# token, an Authorization header's value, credentials after Basic/Bearer (aiohttp's pure-Python
# parser quotes a bad header's value without its name; capitalised as in headers, so that prose
# saying "basic" keeps its next word), the password of a URL's user:password@.
# Each alternative keeps its named prefix and loses the rest; the value runs on over the
# \xNN escapes of a quoted bytes object, so a bad byte inside a token does not leave its tail.
_SECRET_PLACES = (
    r"(?P<query>\b\w*(?:token|password|passwd|secret)=)[^&\s'\"]+",
    r"(?P<header>\bauthorization:[ \t]*)[^\r\n'\"]+",
    r"(?P<scheme>\b(?-i:Basic|Bearer)[ \t]+)[^\s'\",]+",
    r"(?P<userinfo>\b[a-z][a-z0-9+.-]*://[^\s/:@'\"]*:)[^\s/@'\"]+(?=@)",
)


def _keep_prefix(match: re.Match[str]) -> str:
    prefix = match.lastgroup
    return (match[prefix] if prefix and prefix != "known" else "") + REDACTED


class RedactSecrets(logging.Filter):
    """Blank tokens and credentials out of every record, whichever library's logger wrote it.

    aiohttp's server logger, for one, logs a request line or header it cannot parse verbatim in
    its exception text, query string and Authorization header included. The message (with its
    arguments applied), the exception text and the stack pass through the patterns above and
    the configured tokens themselves. `extra=` fields are our own and carry no secrets by rule:
    they are left alone, which keeps this cheap on the receiver's line per webhook.
    """

    def __init__(self, secrets: Iterable[str] = ()) -> None:
        super().__init__()
        places = list(_SECRET_PLACES)
        known = sorted({secret for secret in secrets if secret}, key=len, reverse=True)
        if known:
            places.append("(?P<known>" + "|".join(map(re.escape, known)) + ")")
        self._pattern = re.compile("|".join(places), re.IGNORECASE)
        self._formatter = logging.Formatter()

    def redact(self, text: str) -> str:
        """The text with every secret found in it replaced by REDACTED."""
        return self._pattern.sub(_keep_prefix, text)

    def filter(self, record: logging.LogRecord) -> bool:
        """Redact the record in place (every handler then sees the redacted one); keep it."""
        try:
            message = record.getMessage()
        except Exception:  # noqa: BLE001 - arguments that do not fit: drop them, not the record
            message = str(record.msg)
        record.msg, record.args = self.redact(message), None
        exc_text = _exception_text(self._formatter, record)
        if exc_text:
            record.exc_text = self.redact(exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        return True


def secrets_of(settings: Settings) -> list[str]:
    """The configured tokens, to be redacted wherever they appear."""
    return [*settings.webhook_tokens, *(token for _, token in settings.shop_tokens)]


class JsonFormatter(logging.Formatter):
    """One JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        entry: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update(_extras(record))
        exc_text = _exception_text(self, record)
        if exc_text:
            entry["exc"] = exc_text
        return _encode(entry).decode()


class TextFormatter(logging.Formatter):
    """Readable lines for a terminal: time, level, message, then key=value fields."""

    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{k}={v}" for k, v in _extras(record).items())
        line = (
            f"{time.strftime('%H:%M:%S', time.localtime(record.created))} "
            f"{record.levelname:<7} {record.name}: {record.getMessage()}"
        )
        if fields:
            line = f"{line}  {fields}"
        exc_text = _exception_text(self, record)
        if exc_text:
            line = f"{line}\n{exc_text}"
        return line


def configure_logging(settings: Settings) -> None:
    """Send every logger to stdout in the configured format; called once by each entry point."""
    as_json = settings.log_format == "json" or (
        settings.log_format == "auto" and not sys.stdout.isatty()
    )
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JsonFormatter() if as_json else TextFormatter())
    handler.addFilter(RedactSecrets(secrets_of(settings)))
    # Nothing printed here says where a call came from or which thread or process made it: skip
    # looking those up for every record (the logging HOWTO's "Optimization"); the receiver logs a
    # line per webhook, thousands a second.
    logging._srcfile = None
    logging.logThreads = False
    logging.logProcesses = False
    logging.logMultiprocessing = False
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(settings.log_level.upper())
    # aiohttp's access log repeats our own request summary line, with the query string (token!).
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
