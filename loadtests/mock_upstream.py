"""A minimal OpenAI-compatible upstream for overhead benchmarks (not a test fake).

``POST /v1/chat/completions`` answers at once when ``stream`` is false, or with
``--chunks`` SSE chunks ``--gap-ms`` apart (then a usage chunk and ``[DONE]``).
With ``--hold-ms``, a non-streamed answer takes that long (a busy engine), and a
request's ``max_tokens`` sets its number of chunks. With ``--fail-status 500`` every
completion is answered with that status while the health checks pass (an instance that
is up but broken, for the router's ejection). ``GET /v1/models`` and
``GET /health`` answer 200. It is a bare ASGI callable on uvicorn with uvloop and
httptools, so that it is not the bottleneck.

``GET /stats`` reports what the upstream saw: requests in flight, the most at once
(``peak``), and the first word of each request's last message in arrival order
(``order``), which is how the scheduler's tests count from the backend side;
``POST /stats`` resets them.

    python loadtests/mock_upstream.py --port 9100 --chunks 64 --gap-ms 20
"""

from __future__ import annotations

import argparse
import asyncio
import json
from typing import Any

import uvicorn

_COMPLETION = json.dumps(
    {
        "id": "chatcmpl-mock",
        "object": "chat.completion",
        "created": 0,
        "model": "mock",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "hello"},
                "logprobs": None,
                "finish_reason": "stop",
            }
        ],
        "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
    }
).encode()


def _chunk(content: str | None, finish: str | None) -> bytes:
    delta = {} if content is None else {"content": content}
    event = {
        "id": "chatcmpl-mock",
        "object": "chat.completion.chunk",
        "created": 0,
        "model": "mock",
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(event).encode() + b"\n\n"


_USAGE = (
    b'data: {"id":"chatcmpl-mock","object":"chat.completion.chunk","created":0,'
    b'"model":"mock","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":%d,'
    b'"total_tokens":%d}}\n\n'
)


class MockUpstream:
    def __init__(self, chunks: int, gap: float, hold: float = 0.0, fail: int = 0) -> None:
        self.fail = fail
        self.chunks = chunks
        self.gap = gap
        self.hold = hold
        self.token = _chunk("tok", None)
        self.in_flight = 0
        self.peak = 0
        self.order: list[str] = []

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if not message.get("more_body"):
                break
        if scope["path"] == "/stats":
            if scope["method"] == "POST":
                self.peak, self.order = self.in_flight, []
            stats = {"in_flight": self.in_flight, "peak": self.peak, "order": self.order}
            await self._reply(send, 200, json.dumps(stats).encode())
            return
        if scope["path"] != "/v1/chat/completions":
            await self._reply(send, 200, b'{"object":"list","data":[{"id":"mock"}]}')
            return
        request = json.loads(body or b"{}")
        if self.fail:
            self.order.append("failed")
            await self._reply(send, self.fail, b'{"error":{"message":"broken on purpose"}}')
            return
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        try:
            self._record(request)
            await self._answer(request, send)
        finally:
            self.in_flight -= 1

    def _record(self, request: dict[str, Any]) -> None:
        messages = request.get("messages") or [{}]
        words = str(messages[-1].get("content", "")).split()
        self.order.append(words[0] if words else "")

    async def _answer(self, request: dict[str, Any], send: Any) -> None:
        chunks = int(request.get("max_tokens") or self.chunks)
        if not request.get("stream"):
            if self.hold:
                await asyncio.sleep(self.hold)
            await self._reply(send, 200, _COMPLETION)
            return
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"text/event-stream")],
            }
        )
        for _ in range(chunks):
            if self.gap:
                await asyncio.sleep(self.gap)
            await send({"type": "http.response.body", "body": self.token, "more_body": True})
        tail = _chunk(None, "stop") + _USAGE % (chunks, chunks + 5) + b"data: [DONE]\n\n"
        await send({"type": "http.response.body", "body": tail, "more_body": False})

    @staticmethod
    async def _reply(send: Any, status: int, body: bytes) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [(b"content-type", b"application/json")],
            }
        )
        await send({"type": "http.response.body", "body": body})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--chunks", type=int, default=64)
    parser.add_argument("--gap-ms", type=float, default=20.0)
    parser.add_argument("--hold-ms", type=float, default=0.0)
    parser.add_argument("--fail-status", type=int, default=0)
    args = parser.parse_args()
    uvicorn.run(
        MockUpstream(args.chunks, args.gap_ms / 1000, args.hold_ms / 1000, args.fail_status),
        host="127.0.0.1",
        port=args.port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
    )


if __name__ == "__main__":
    main()
