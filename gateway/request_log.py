"""The request log: one JSON line per request of the tenants that opt in, redacted.

A tenant with ``log_requests: true`` has its requests written (``request_log.path``,
a file rotated by size, or ``-`` for stdout), a ``sample_rate`` share of them: who
(tenant, key id — never the key), what (model, instance, endpoint, priority), how it
ended (status, finish reason, tokens) and how long it took (queued, first token,
total), and with ``bodies: true`` the request as sent and the text generated.

Every string is redacted before it is written, whatever its field: bearer tokens,
Lockgate and OpenAI-style keys, and the configured patterns (``redact``; by default
e-mail addresses and card numbers) become ``[REDACTED]`` (gateway/redaction.py);
bodies are cut to ``max_body_chars``, so a 16 MiB body costs no more than a short one.
Writing happens on a thread of its own (a queue in between), so
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
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import orjson

from gateway.redaction import LONGEST_SECRET, Redactor
from gateway.settings import RequestLogSettings
from gateway.tenancy.records import Principal


class RequestLog:
    def __init__(
        self,
        settings: RequestLogSettings,
        *,
        sample: Callable[[], float] = random.random,
    ) -> None:
        self._settings(settings)
        self._sample = sample
        self._logger = logging.getLogger(f"lockgate.request_log.{id(self)}")
        self._logger.propagate = False  # its own file; never the application log
        self._logger.setLevel(logging.INFO)
        self._listener: logging.handlers.QueueListener | None = None
        self._running = False  # between start() and stop(), whether or not it writes

    def _settings(self, settings: RequestLogSettings) -> None:
        self.settings = settings
        self.enabled = settings.path is not None
        self.bodies = settings.bodies
        self.redact = Redactor(settings.redact)

    def configure(self, settings: RequestLogSettings) -> None:
        """A reload: what is queued is written with the old settings, then the new apply
        (a new path, rotation, redaction...). It runs on the event loop, between two
        requests' lines, so none is lost."""
        if settings == self.settings:
            return
        running = self._running
        self.stop()
        self._settings(settings)
        if running:
            self.start()

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
        self._running = True
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
        self._running = False
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
        """A body as written: cut to ``max_body_chars``, redacted.

        Cut first, with a margin that holds any secret straddling the limit whole, so
        the cost is bounded whatever the body's size; redacted; then cut to the limit
        (what remained of a straddling secret is ``[REDACTED]``, never a prefix of it).
        """
        if text is None:
            return None
        limit = self.settings.max_body_chars
        margin = limit + LONGEST_SECRET
        if isinstance(text, bytes):
            text = text[: margin * 4].decode("utf-8", errors="ignore")  # ≤ 4 bytes a char
        clean = self.redact(text[:margin])
        return clean if len(text) <= limit else clean[:limit] + "…[truncated]"

    def record(self, entry: dict[str, Any], *, body: bytes | None, text: str | None) -> None:
        """A request's line; with ``bodies``, the request as sent and the text generated."""
        if self.bodies:
            entry["request"] = self.body(body)
            entry["response"] = self.body(text)
        self.write(entry)

    def write(self, entry: dict[str, Any]) -> None:
        """One line: ``entry`` with every string redacted, and a timestamp."""
        if self._listener is None:
            return
        line = {"ts": round(time.time(), 3), **self.redact.value(entry)}
        self._logger.info(orjson.dumps(line).decode())
