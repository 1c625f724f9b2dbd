"""Ollama through its native API (``/api/chat``, ``/api/generate``, ``/api/embed``).

Why native rather than Ollama's OpenAI shim: only the native API takes
``options.num_ctx``. Without it Ollama silently truncates prompts to its
default context, and a request with a different ``num_ctx`` reloads the
model, so this adapter sends the configured ``num_ctx`` and ``keep_alive`` on
*every* call. Streaming is NDJSON: one JSON object per line, the last with
``done: true``, ``done_reason`` and the token counts (``prompt_eval_count``,
``eval_count``). A failure after the first line arrives as a line
``{"error": "..."}``.

Tool calls cross both ways: OpenAI's JSON-string ``arguments`` become
Ollama's JSON objects on the way in, and back on the way out. Ollama has no
``logit_bias``; such requests are refused rather than silently changed.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Any

from backends.base import (
    BackendUnavailable,
    ChatMessage,
    EmbeddingResult,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    InvalidRequestError,
    ToolCall,
)
from backends.remote import RemoteBackend, RemoteConfig, parse_event


@dataclass(frozen=True, slots=True)
class OllamaOptions:
    num_ctx: int = 4096
    keep_alive: str | int = "5m"


def _message(m: ChatMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        out["tool_calls"] = [
            {"function": {"name": c.name, "arguments": _arguments_object(c.arguments)}}
            for c in m.tool_calls
        ]
    if m.role == "tool":
        if m.name:
            out["tool_name"] = m.name
        if m.tool_call_id:
            out["tool_call_id"] = m.tool_call_id
    return out


def _arguments_object(arguments: str) -> Any:
    try:
        return json.loads(arguments) if arguments else {}
    except json.JSONDecodeError:
        raise InvalidRequestError(
            "tool call arguments must be a JSON object", param="messages"
        ) from None


def ollama_body(
    request: GenerationRequest, model: str, options: OllamaOptions
) -> tuple[str, dict[str, Any]]:
    """The native request for ``request``: (path, body)."""
    p = request.sampling
    if p.logit_bias:
        raise InvalidRequestError("logit_bias is not supported by Ollama", param="logit_bias")
    if p.logprobs is not None:
        raise InvalidRequestError("logprobs are not supported by Ollama", param="logprobs")
    if request.tool_choice not in (None, "auto", "none"):  # Ollama has no tool_choice
        raise InvalidRequestError(
            "Ollama cannot be made to call a tool; send tool_choice auto", param="tool_choice"
        )
    # Ollama's option names match OpenAI's, except max_tokens → num_predict.
    opts: dict[str, Any] = {"num_ctx": options.num_ctx, **p.explicit()}
    if p.max_tokens is not None:
        opts["num_predict"] = p.max_tokens
    if p.stop:
        opts["stop"] = list(p.stop)
    body: dict[str, Any] = {
        "model": model,
        "stream": True,
        "keep_alive": options.keep_alive,
        "options": opts,
    }
    fmt = request.response_format
    if fmt is not None:  # Ollama's own: "json", or the schema itself
        body["format"] = "json" if fmt.kind == "json_object" else dict(fmt.schema or {})
    if request.messages is None:
        # /v1/completions is raw text completion: no chat template, no system prompt.
        body.update(prompt=request.prompt or "", raw=True)
        return "/api/generate", body
    body["messages"] = [_message(m) for m in request.messages]
    if request.tools and request.tool_choice != "none":
        body["tools"] = list(request.tools)
    return "/api/chat", body


class OllamaBackend(RemoteBackend):
    def __init__(self, config: RemoteConfig, options: OllamaOptions) -> None:
        super().__init__(config)
        self.options = options

    @property
    def context_length(self) -> int:
        return self.options.num_ctx

    async def probe(self) -> bool:
        return (await self.get("/api/version"))[0] == 200

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        path, body = ollama_body(request, self.config.upstream_model, self.options)
        self.in_flight += 1
        try:
            # Closed with this generator, not later by the finalizer: that closes the
            # upstream connection, which is how Ollama learns to stop.
            async with contextlib.aclosing(self._stream(path, body)) as chunks:
                async for chunk in chunks:
                    yield chunk
        finally:
            self.in_flight -= 1

    async def _stream(
        self, path: str, body: dict[str, Any]
    ) -> AsyncGenerator[GenerationChunk, None]:
        async with self.streaming_response(path, body) as response:
            pieces = 0
            calls: list[ToolCall] = []
            async for line in self.lines(response):
                if not line.strip():
                    continue
                event = parse_event(line)
                if "error" in event:
                    raise BackendUnavailable(f"Ollama failed mid-stream: {event['error']}")
                message = event.get("message") or {}
                text = message.get("content") or event.get("response") or ""
                for call in message.get("tool_calls") or event.get("tool_calls") or ():
                    fn = call.get("function") or {}
                    calls.append(
                        ToolCall(
                            call.get("id") or f"call_{len(calls)}",
                            str(fn.get("name", "")),
                            json.dumps(fn.get("arguments") or {}),
                        )
                    )
                if event.get("done"):
                    reason: FinishReason = (
                        "length" if event.get("done_reason") == "length" else "stop"
                    )
                    if calls:
                        reason = "tool_calls"  # Ollama says "stop"; OpenAI clients expect this
                    yield GenerationChunk(
                        text,
                        int(event.get("prompt_eval_count") or 0),
                        int(event.get("eval_count") or pieces),
                        reason,
                        tool_calls=tuple(calls),
                    )
                    return
                if text:
                    pieces += 1
                    yield GenerationChunk(text, 0, pieces)
        raise BackendUnavailable("Ollama closed the stream before it was done")

    async def embed(self, texts: Sequence[str]) -> EmbeddingResult:
        body = {
            "model": self.config.upstream_model,
            "input": list(texts),
            "keep_alive": self.options.keep_alive,
            "options": {"num_ctx": self.options.num_ctx},
        }
        data = await self.post_json("/api/embed", body)
        return EmbeddingResult(
            vectors=data.get("embeddings") or [],
            prompt_tokens=int(data.get("prompt_eval_count") or 0),
        )
