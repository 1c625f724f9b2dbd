"""Locust users of the OpenAI API, for any Lockgate (or any OpenAI-compatible server).

Each simulated user belongs to one tenant: keys come from ``LOCKGATE_KEYS``
(comma-separated; users take them in turn, so several tenants share the load) or
none at all (a gateway without auth). A user mixes non-streamed chats, streamed
chats and short completions, with a think time between them.

Locust's table has one row per kind of request, each timed to its end: ``chat``,
``completion`` and ``chat stream (whole stream)`` — a stream's row is timed to its last
event, not to its response headers as locust would time it — and ``Aggregated`` sums
only those. What a stream's row cannot say is printed in a table of its own at the end
and written to ``LOCKGATE_STREAM_CSV`` (default ``locust_streams.csv``), never mixed
into locust's rows:

    ttft_ms        time from sending to the first content chunk (milliseconds)
    tokens_per_s   completion tokens per second after the first one, per stream

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

from locust import HttpUser, between, events, task
from locust.env import Environment

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


class StreamFigures:
    """Per-stream TTFT and decode rate, kept apart from locust's request statistics."""

    def __init__(self) -> None:
        self.values: dict[str, list[float]] = {"ttft_ms": [], "tokens_per_s": []}

    def add(self, name: str, value: float) -> None:
        self.values[name].append(value)

    def rows(self) -> list[tuple[str, int, float, float, float, float]]:
        out = []
        for name, values in self.values.items():
            if not values:
                continue
            ordered = sorted(values)

            def pct(q: float, ordered: list[float] = ordered) -> float:
                return ordered[min(len(ordered) - 1, int(q * len(ordered)))]

            mean = sum(ordered) / len(ordered)
            out.append((name, len(ordered), mean, pct(0.5), pct(0.9), pct(0.99)))
        return out


@events.init.add_listener
def _on_init(environment: Environment, **_: Any) -> None:
    environment.stream_figures = StreamFigures()  # type: ignore[attr-defined]


@events.quitting.add_listener
def _on_quit(environment: Environment, **_: Any) -> None:
    figures: StreamFigures = environment.stream_figures  # type: ignore[attr-defined]
    rows = figures.rows()
    print(f"\n{'stream figure':<14} {'n':>6} {'mean':>9} {'p50':>9} {'p90':>9} {'p99':>9}")
    for name, n, mean, p50, p90, p99 in rows:
        print(f"{name:<14} {n:>6} {mean:>9.1f} {p50:>9.1f} {p90:>9.1f} {p99:>9.1f}")
    path = os.environ.get("LOCKGATE_STREAM_CSV", "locust_streams.csv")
    with open(path, "w") as out:
        out.write("figure,count,mean,p50,p90,p99\n")
        for row in rows:
            out.write(",".join(str(round(v, 3)) if isinstance(v, float) else str(v) for v in row))
            out.write("\n")


class OpenAIUser(HttpUser):
    wait_time = between(0.5, 2.0)

    def on_start(self) -> None:
        self.client.headers["Content-Type"] = "application/json"
        if KEYS:
            key = KEYS[next(_NEXT_KEY) % len(KEYS)]
            self.client.headers["Authorization"] = f"Bearer {key}"
        self._questions = itertools.cycle(QUESTIONS)
        # One completion first, so that even a short run has a row for every request kind.
        self.completion()

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
            "/v1/chat/completions", json=body, name="chat stream (whole stream)", stream=True,
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
            # Locust timed this request to its headers; the row is about the whole stream.
            response.request_meta["response_time"] = (done - sent) * 1000
            if first is None:
                response.failure("the stream carried no content")
                return
        figures: StreamFigures = self.environment.stream_figures  # type: ignore[attr-defined]
        figures.add("ttft_ms", (first - sent) * 1000)
        if tokens > 1 and done > first:
            figures.add("tokens_per_s", (tokens - 1) / (done - first))

    @task(1)
    def completion(self) -> None:
        body = {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 8}
        with self.client.post(
            "/v1/completions", json=body, name="completion", catch_response=True
        ) as response:
            if response.status_code != 200:
                response.failure(f"HTTP {response.status_code}: {response.text[:200]}")
