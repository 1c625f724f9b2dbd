"""Locust users of the OpenAI API, for any Lockgate (or any OpenAI-compatible server).

Each simulated user belongs to one tenant: keys come from ``LOCKGATE_KEYS``
(comma-separated; users take them in turn, so several tenants share the load) or
none at all (a gateway without auth). A user mixes non-streamed chats, streamed
chats and short completions, with a think time between them.

Besides locust's own request rows, streamed chats report custom rows of type
``METRIC``, whose "response time" columns hold the metric's value:

    ttft_ms        time from sending to the first content chunk (milliseconds)
    stream_ms      time from sending to the end of the stream (milliseconds)
    tokens_per_s   completion tokens per second after the first one, per stream

(The ``chat stream`` row itself is timed to the response headers, as locust times
every streamed response; the ``Aggregated`` row mixes in the METRIC rows.)

Run it headless against ``make serve`` (``make locust`` does this for 60 s)::

    locust -f loadtests/locustfile.py --headless -u 8 -r 2 -t 60s \\
        --host http://127.0.0.1:8000 --only-summary

Environment: ``LOCKGATE_KEYS``, ``LOCKGATE_MODEL`` (default ``gemma-3-270m``),
``LOCKGATE_MAX_TOKENS`` (default 32).
"""

from __future__ import annotations

import itertools
import json
import os
import time
from typing import Any

from locust import HttpUser, between, task

MODEL = os.environ.get("LOCKGATE_MODEL", "gemma-3-270m")
MAX_TOKENS = int(os.environ.get("LOCKGATE_MAX_TOKENS", "32"))
KEYS = [k.strip() for k in os.environ.get("LOCKGATE_KEYS", "").split(",") if k.strip()]
_NEXT_KEY = itertools.count()
QUESTIONS = (
    "Name three rivers in Europe.",
    "What is a hash table? Answer briefly.",
    "Write a haiku about load tests.",
    "Explain TCP slow start in two sentences.",
)


class OpenAIUser(HttpUser):
    wait_time = between(0.5, 2.0)

    def on_start(self) -> None:
        self.client.headers["Content-Type"] = "application/json"
        if KEYS:
            key = KEYS[next(_NEXT_KEY) % len(KEYS)]
            self.client.headers["Authorization"] = f"Bearer {key}"
        self._questions = itertools.cycle(QUESTIONS)

    def _chat(self, **extra: Any) -> dict[str, Any]:
        return {
            "model": MODEL,
            "messages": [{"role": "user", "content": next(self._questions)}],
            "max_tokens": MAX_TOKENS,
            **extra,
        }

    @task(3)
    def chat(self) -> None:
        with self.client.post(
            "/v1/chat/completions", json=self._chat(), name="chat", catch_response=True
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
            elif not response.json().get("choices"):
                response.failure("no choices in the answer")

    @task(3)
    def chat_stream(self) -> None:
        body = self._chat(stream=True, stream_options={"include_usage": True})
        sent = time.perf_counter()
        first: float | None = None
        tokens = 0
        with self.client.post(
            "/v1/chat/completions", json=body, name="chat stream", stream=True,
            catch_response=True,
        ) as response:  # fmt: skip
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
                return
            for line in response.iter_lines():
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    response.failure(event["error"].get("message", "error event"))
                    return
                if any(c.get("delta", {}).get("content") for c in event.get("choices", ())):
                    first = first or time.perf_counter()
                if event.get("usage"):
                    tokens = event["usage"]["completion_tokens"]
            done = time.perf_counter()
            if first is None:
                response.failure("the stream carried no content")
                return
        self._metric("ttft_ms", (first - sent) * 1000)
        self._metric("stream_ms", (done - sent) * 1000)
        if tokens > 1 and done > first:
            self._metric("tokens_per_s", (tokens - 1) / (done - first))

    @task(1)
    def completion(self) -> None:
        body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 8}
        with self.client.post(
            "/v1/completions", json=body, name="completion", catch_response=True
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")

    def _metric(self, name: str, value: float) -> None:
        self.environment.events.request.fire(
            request_type="METRIC",
            name=name,
            response_time=value,
            response_length=0,
            exception=None,
            context={},
        )
