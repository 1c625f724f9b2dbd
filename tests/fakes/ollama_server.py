"""A fake Ollama server, faithful to Ollama's native HTTP API, for the adapter's tests.

This is a fake because no package registry reachable here ships Ollama. It follows
Ollama's API documentation and Go sources (api/types.go, server/routes.go) as of v0.33:

* ``/api/chat`` and ``/api/generate`` stream NDJSON (``application/x-ndjson``) by
  default: content deltas with ``done: false`` and no metrics, then one
  ``done: true`` object with ``done_reason`` and the six metric fields (ns).
  ``stream: false`` returns one joined JSON object.
* Tool calls come in a ``done: false`` chunk with ``arguments`` as a JSON
  *object*, ``function.index`` always present and an ``id`` like ``call_ab12cd34``;
  ``done_reason`` stays ``"stop"``.
* Errors are ``{"error": "..."}``: 400 ``model is required`` (chat) / invalid JSON,
  404 ``model 'x' not found`` (chat, generate) and ``model "x" not found, try
  pulling it first`` (embed), 503 ``server busy, please try again.  maximum
  pending requests exceeded``. After the first chunk an error is one more line
  ``{"error": "..."}`` with status 200.
* ``/api/embed``, ``/api/tags``, ``/api/ps``, ``/api/version`` as documented.

It "generates" by echoing the words of the prompt (or last message), one per
chunk, ``delay`` seconds apart, up to ``options.num_predict``; the context is
``options.num_ctx`` and, like Ollama, an over-long prompt is truncated
silently (which the adapter prevents by always sending ``num_ctx``).

Models: ``gemma3:270m`` (chat, generate, embed, tools); ``busy`` answers 503;
``crash`` fails after two chunks. Test hooks: ``GET /_fake/requests`` (every
request body seen) and ``GET /_fake/active`` (streams in progress), so tests
can check what the adapter sent and that a client disconnect closed the stream.

    python -m tests.fakes.ollama_server --port 11434
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

MODEL = "gemma3:270m"
BUSY = "server busy, please try again.  maximum pending requests exceeded"


def _now() -> str:
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


class FakeOllama:
    def __init__(self, *, delay: float = 0.01) -> None:
        self.delay = delay
        self.requests: list[dict[str, Any]] = []
        self.active = 0

    def app(self) -> Starlette:
        return Starlette(
            routes=[
                Route("/api/chat", self.chat, methods=["POST"]),
                Route("/api/generate", self.generate, methods=["POST"]),
                Route("/api/embed", self.embed, methods=["POST"]),
                Route("/api/tags", self.tags, methods=["GET"]),
                Route("/api/ps", self.ps, methods=["GET"]),
                Route("/api/version", self.version, methods=["GET"]),
                Route("/_fake/requests", self.seen, methods=["GET"]),
                Route("/_fake/active", self.in_progress, methods=["GET"]),
            ]
        )

    async def _body(self, request: Request) -> dict[str, Any] | Response:
        raw = await request.body()
        if not raw:
            return _error(400, "missing request body")
        try:
            body = json.loads(raw)
        except json.JSONDecodeError as exc:
            return _error(400, f"invalid character looking for beginning of value: {exc}")
        if not isinstance(body, dict):
            return _error(400, "json: cannot unmarshal array into Go value of type api.Request")
        self.requests.append({"path": request.url.path, **body})
        return body

    async def chat(self, request: Request) -> Response:
        body = await self._body(request)
        if isinstance(body, Response):
            return body
        model = body.get("model") or ""
        if not model:
            return _error(400, "model is required")
        rejected = self._check_model(model)
        if rejected is not None:
            return rejected
        messages = body.get("messages") or []
        last = messages[-1].get("content", "") if messages else ""
        calls = None
        if body.get("tools") and messages and messages[-1].get("role") == "user":
            name = body["tools"][0]["function"]["name"]
            calls = [
                {
                    "id": "call_ab12cd34",
                    "function": {"index": 0, "name": name, "arguments": {"query": last}},
                }
            ]
        return self._respond(body, model, last, chat=True, tool_calls=calls)

    async def generate(self, request: Request) -> Response:
        body = await self._body(request)
        if isinstance(body, Response):
            return body
        model = body.get("model") or ""
        rejected = self._check_model(model)
        if rejected is not None:
            return rejected
        return self._respond(body, model, body.get("prompt") or "", chat=False, tool_calls=None)

    def _check_model(self, model: str) -> Response | None:
        if model == "busy":
            return _error(503, BUSY)
        if model not in (MODEL, "crash"):
            return _error(404, f"model '{model}' not found")
        return None

    def _respond(
        self,
        body: dict[str, Any],
        model: str,
        source: str,
        *,
        chat: bool,
        tool_calls: list[dict[str, Any]] | None,
    ) -> Response:
        options = body.get("options") or {}
        num_ctx = int(options.get("num_ctx") or 2048)  # a small default, as old Ollama had
        prompt = source.split()
        prompt_eval = min(len(prompt) + 1, num_ctx)  # silently truncated, like Ollama
        limit = int(options.get("num_predict", -1))
        words = prompt[: limit if limit >= 0 else len(prompt)]
        reason = "length" if 0 <= limit < len(prompt) else "stop"
        started = time.monotonic_ns()

        def chunk(text: str, **extra: Any) -> dict[str, Any]:
            out: dict[str, Any] = {"model": model, "created_at": _now()}
            if chat:
                out["message"] = {"role": "assistant", "content": text}
            else:
                out["response"] = text
            out.update(extra)
            return out

        def final() -> dict[str, Any]:
            elapsed = time.monotonic_ns() - started
            return chunk(
                "",
                done=True,
                done_reason=reason,
                total_duration=elapsed,
                load_duration=1000,
                prompt_eval_count=prompt_eval,
                prompt_eval_duration=1000,
                eval_count=len(words) if tool_calls is None else 1,
                eval_duration=elapsed,
            )

        if body.get("stream", True) is False:
            whole = chunk(" ".join(words) if tool_calls is None else "")
            whole.update({k: v for k, v in final().items() if k not in whole})
            if tool_calls and chat:
                whole["message"]["tool_calls"] = tool_calls
            return JSONResponse(whole)

        async def lines() -> AsyncIterator[bytes]:
            self.active += 1
            try:
                if tool_calls is not None:
                    tool_chunk = chunk("", done=False)
                    tool_chunk["message"]["tool_calls"] = tool_calls
                    yield json.dumps(tool_chunk).encode() + b"\n"
                else:
                    for i, word in enumerate(words):
                        if model == "crash" and i == 2:
                            yield (
                                json.dumps(
                                    {"error": "model runner has unexpectedly stopped"}
                                ).encode()
                                + b"\n"
                            )
                            return
                        await asyncio.sleep(self.delay)
                        text = word if i == 0 else " " + word
                        yield json.dumps(chunk(text, done=False)).encode() + b"\n"
                yield json.dumps(final()).encode() + b"\n"
            finally:
                self.active -= 1

        return StreamingResponse(lines(), media_type="application/x-ndjson")

    async def embed(self, request: Request) -> Response:
        body = await self._body(request)
        if isinstance(body, Response):
            return body
        model = body.get("model") or ""
        if model != MODEL:
            return _error(404, f'model "{model}" not found, try pulling it first')
        inputs = body.get("input")
        texts = [inputs] if isinstance(inputs, str) else inputs or []
        if not all(isinstance(t, str) for t in texts):
            return _error(400, "invalid input type")
        vectors = []
        for text in texts:
            raw = [float(len(text)), float(len(text.split())), 1.0]
            norm = sum(x * x for x in raw) ** 0.5
            vectors.append([x / norm for x in raw])
        return JSONResponse(
            {
                "model": model,
                "embeddings": vectors,
                "total_duration": 1000,
                "load_duration": 10,
                "prompt_eval_count": sum(len(t.split()) for t in texts),
            }
        )

    async def tags(self, request: Request) -> Response:
        details = {
            "parent_model": "",
            "format": "gguf",
            "family": "gemma3",
            "families": ["gemma3"],
            "parameter_size": "268.10M",
            "quantization_level": "Q4_K_M",
        }
        return JSONResponse(
            {
                "models": [
                    {
                        "name": MODEL,
                        "model": MODEL,
                        "modified_at": "2026-11-01T10:00:00.0+00:00",
                        "size": 253000000,
                        "digest": "a5fd3b62",
                        "details": details,
                    }
                ]
            }
        )

    async def ps(self, request: Request) -> Response:
        return JSONResponse({"models": []})

    async def version(self, request: Request) -> Response:
        return JSONResponse({"version": "0.33.0"})

    async def seen(self, request: Request) -> Response:
        return JSONResponse(self.requests)

    async def in_progress(self, request: Request) -> Response:
        return JSONResponse({"active": self.active})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--delay", type=float, default=0.01)
    args = parser.parse_args()
    uvicorn.run(
        FakeOllama(delay=args.delay).app(), host="127.0.0.1", port=args.port, log_level="warning"
    )


if __name__ == "__main__":
    main()
