"""The request log: one JSON line per request of the tenants that opt in, redacted.

A tenant with ``log_requests: true`` has its requests written (``request_log.path``,
a file rotated by size, or ``-`` for stdout), a ``sample_rate`` share of them: who
(tenant, key id — never the key), what (model, instance, endpoint, priority), how it
ended (status, finish reason, tokens) and how long it took (queued, first token,
total), and with ``bodies: true`` the request as sent and the text generated.

Every string is redacted before it is written, whatever its field: bearer tokens,
Lockgate and OpenAI-style keys, and the configured patterns (``redact``; by default
e-mail addresses and card numbers) become ``[REDACTED]``; then bodies are cut to
``max_body_chars``. Writing happens on a thread of its own (a queue in between), so
a slow disk never holds the event loop.

    log = RequestLog(settings.request_log)
    log.start()
    if log.wants(principal): log.write({...})
    log.stop()
"""

from __future__ import annotations

import logging
import logging.handlers
import queue
import random
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import orjson

from gateway.settings import RequestLogSettings
from gateway.tenancy.records import Principal

REDACTED = "[REDACTED]"
# Secrets, whatever the configuration says: they are never written.
SECRETS = (
    r"\b[Bb][Ee][Aa][Rr][Ee][Rr]\s+[A-Za-z0-9._~+/=-]+",
    r"\blg-[A-Za-z0-9_-]{8,}",  # Lockgate keys (gateway/tenancy/keys.py)
    r"\bsk-[A-Za-z0-9_-]{8,}",  # OpenAI-style keys
)


class Redactor:
    """Replaces every match of the secret and configured patterns in a string."""

    def __init__(self, patterns: Sequence[str]) -> None:
        self._pattern = re.compile("|".join(f"(?:{p})" for p in (*SECRETS, *patterns)))

    def __call__(self, text: str) -> str:
        return self._pattern.sub(REDACTED, text)

    def value(self, value: Any) -> Any:
        """``value`` with every string in it redacted (dicts, lists, nested)."""
        if isinstance(value, str):
            return self(value)
        if isinstance(value, dict):
            return {self(str(k)): self.value(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.value(v) for v in value]
        return value


class RequestLog:
    def __init__(
        self,
        settings: RequestLogSettings,
        *,
        sample: Callable[[], float] = random.random,
    ) -> None:
        self.settings = settings
        self.enabled = settings.path is not None
        self.bodies = settings.bodies
        self.redact = Redactor(settings.redact)
        self._sample = sample
        self._logger = logging.getLogger(f"lockgate.request_log.{id(self)}")
        self._logger.propagate = False  # its own file; never the application log
        self._logger.setLevel(logging.INFO)
        self._listener: logging.handlers.QueueListener | None = None

    def check(self) -> str | None:
        """Why the log file cannot be written, or None (``lockgate serve`` asks first)."""
        path = self.settings.path
        if path is None or path == "-":
            return None
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a", encoding="utf-8"):
                pass
        except OSError as exc:
            return f"request_log.path: cannot write {path}: {exc.strerror}"
        return None

    def start(self) -> None:
        if not self.enabled or self._listener is not None:
            return
        path = self.settings.path
        target: logging.Handler
        if path == "-":
            target = logging.StreamHandler(sys.stdout)
        else:
            assert path is not None
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            target = logging.handlers.RotatingFileHandler(
                path,
                maxBytes=self.settings.max_bytes,
                backupCount=self.settings.backups,
                encoding="utf-8",
            )
        target.setFormatter(logging.Formatter("%(message)s"))
        lines: queue.SimpleQueue[logging.LogRecord] = queue.SimpleQueue()
        self._logger.addHandler(logging.handlers.QueueHandler(lines))
        self._listener = logging.handlers.QueueListener(lines, target)
        self._listener.start()

    def stop(self) -> None:
        """Write what is queued, then close the file."""
        if self._listener is None:
            return
        self._listener.stop()
        for handler in (*self._logger.handlers, *self._listener.handlers):
            handler.close()
        self._logger.handlers.clear()
        self._listener = None

    def wants(self, principal: Principal) -> bool:
        """Is this request to be logged (its tenant opted in, and it is sampled)?"""
        if not self.enabled or not principal.tenant.log_requests:
            return False
        rate = self.settings.sample_rate
        return rate >= 1.0 or self._sample() < rate

    def body(self, text: str | bytes | None) -> str | None:
        """A body as written: redacted, then cut to ``max_body_chars``."""
        if text is None:
            return None
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        cut = self.redact(text)
        limit = self.settings.max_body_chars
        return cut if len(cut) <= limit else cut[:limit] + "…[truncated]"

    def write(self, entry: dict[str, Any]) -> None:
        """One line: ``entry`` with every string redacted, and a timestamp."""
        if self._listener is None:
            return
        line = {"ts": round(time.time(), 3), **self.redact.value(entry)}
        self._logger.info(orjson.dumps(line).decode())
