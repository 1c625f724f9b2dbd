"""Any OpenAI-compatible upstream: vLLM, llama-server, SGLang, a cloud API.

    backend = OpenAICompatBackend(RemoteConfig(base_url="http://127.0.0.1:8080",
                                               upstream_model="gemma", concurrency=8))

A streamed request streams from the upstream, with ``stream_options.include_usage``
so the token counts are the upstream's own; the gateway re-frames the chunks
for its client (dropping the usage chunk if the client did not ask for it).
Each SSE line is parsed once with orjson, never through pydantic. A non-streamed
request is one non-streamed upstream call, answered as one final chunk: parsing
a stream of SSE lines only to join them again cost the gateway a third of its
CPU per request (loadtests/bench_overhead.py).

Errors are translated by :func:`backends.remote.upstream_error`.
Closing the generator closes the upstream connection, which is how llama-server,
vLLM and Ollama learn that a client has gone.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import Any, ClassVar

from backends.base import (
    BackendUnavailable,
    ChatMessage,
    EmbeddingResult,
    FinishReason,
    GenerationChunk,
    GenerationRequest,
    ResponseFormat,
    TokenLogprob,
    ToolCall,
    Unsupported,
)
from backends.remote import RemoteBackend, error_message, parse_event

_FINISH_REASONS: dict[str, FinishReason] = {
    "length": "length",
    "tool_calls": "tool_calls",
    "function_call": "tool_calls",
}


def _message_dict(m: ChatMessage) -> dict[str, Any]:
    out: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.tool_calls:
        out["tool_calls"] = [c.as_openai() for c in m.tool_calls]
        out["content"] = m.content or None
    if m.tool_call_id is not None:
        out["tool_call_id"] = m.tool_call_id
    if m.name is not None:
        out["name"] = m.name
    return out


def request_body(
    request: GenerationRequest, upstream_model: str, renames: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The upstream request: only what the client set, plus streaming with usage.

    ``renames`` maps a sampling knob to the upstream's own name for it.
    """
    p = request.sampling
    body: dict[str, Any] = {"model": upstream_model, "stream": request.stream}
    if request.stream:
        body["stream_options"] = {"include_usage": True}
    if request.messages is not None:
        body["messages"] = [_message_dict(m) for m in request.messages]
        if request.tools:
            body["tools"] = list(request.tools)
        if request.tool_choice is not None:
            body["tool_choice"] = request.tool_choice
        if request.tools and request.parallel_tool_calls is not None:
            body["parallel_tool_calls"] = request.parallel_tool_calls
    else:
        body["prompt"] = request.prompt or ""
    renames = renames or {}
    body.update({renames.get(k, k): v for k, v in p.explicit().items()})
    if p.max_tokens is not None:
        body["max_tokens"] = p.max_tokens
    if p.stop:
        body["stop"] = list(p.stop)
    if p.logit_bias:
        body["logit_bias"] = {str(k): v for k, v in p.logit_bias.items()}
    if p.logprobs is not None:  # chat: a flag and a count; legacy completions: the count
        if request.messages is not None:
            body.update(logprobs=True, top_logprobs=p.logprobs)
        else:
            body["logprobs"] = p.logprobs
    fmt = request.response_format
    if fmt is not None:  # vLLM and llama-server constrain decoding themselves
        body["response_format"] = response_format_body(fmt)
    return body


def response_format_body(fmt: ResponseFormat) -> dict[str, Any]:
    """OpenAI's ``response_format`` for ``fmt``."""
    if fmt.kind == "json_object":
        return {"type": "json_object"}
    spec: dict[str, Any] = {"name": fmt.name or "output", "schema": dict(fmt.schema or {})}
    if fmt.strict is not None:
        spec["strict"] = fmt.strict
    return {"type": "json_schema", "json_schema": spec}


class _ToolCallAssembler:
    """Joins OpenAI's streamed tool-call fragments (by index) into whole calls."""

    def __init__(self) -> None:
        self._calls: dict[int, dict[str, str]] = {}

    def add(self, deltas: list[dict[str, Any]]) -> None:
        for d in deltas:
            call = self._calls.setdefault(
                int(d.get("index", 0)), {"id": "", "name": "", "args": ""}
            )
            call["id"] = d.get("id") or call["id"]
            fn = d.get("function") or {}
            call["name"] = fn.get("name") or call["name"]
            call["args"] += fn.get("arguments") or ""

    def calls(self) -> tuple[ToolCall, ...]:
        return tuple(
            ToolCall(c["id"] or f"call_{i}", c["name"], c["args"])
            for i, c in sorted(self._calls.items())
        )


def _bytes_of(entry: Mapping[str, Any], token: str) -> bytes:
    raw = entry.get("bytes")
    if isinstance(raw, list):
        with contextlib.suppress(TypeError, ValueError):
            return bytes(raw)
    return token.encode()


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) else float("-inf")


def upstream_logprobs(choice: Mapping[str, Any]) -> tuple[TokenLogprob, ...]:
    """A choice's ``logprobs`` in either of OpenAI's shapes (chat's ``content`` list, or
    the legacy completions' parallel lists), as the gateway's records."""
    found = choice.get("logprobs")
    if not isinstance(found, dict):
        return ()
    content = found.get("content")
    if isinstance(content, list):
        out = []
        for e in content:
            if not isinstance(e, dict):
                continue
            token = str(e.get("token", ""))
            top = tuple(
                (str(t.get("token", "")), _bytes_of(t, str(t.get("token", ""))),
                 _number(t.get("logprob")))
                for t in e.get("top_logprobs") or ()
                if isinstance(t, dict)
            )  # fmt: skip
            out.append(TokenLogprob(token, _bytes_of(e, token), _number(e.get("logprob")), top))
        return tuple(out)
    tokens = found.get("tokens")
    if not isinstance(tokens, list):
        return ()
    values = found.get("token_logprobs") or []
    tops = found.get("top_logprobs") or []
    legacy = []
    for i, token in enumerate(map(str, tokens)):
        top = tops[i] if i < len(tops) and isinstance(tops[i], dict) else {}
        alternatives = tuple((str(t), str(t).encode(), _number(v)) for t, v in top.items())
        value = _number(values[i]) if i < len(values) else float("-inf")
        legacy.append(TokenLogprob(token, token.encode(), value, alternatives))
    return tuple(legacy)


def whole_answer(data: dict[str, Any], *, chat: bool) -> GenerationChunk:
    """The final chunk of a non-streamed answer: its first choice, whole."""
    choices = data.get("choices")
    if not choices or not isinstance(choices[0], dict):
        raise BackendUnavailable("the upstream answered without a choice")
    choice = choices[0]
    calls: tuple[ToolCall, ...] = ()
    if chat:
        message = choice.get("message") or {}
        text = message.get("content") or ""
        calls = tuple(
            ToolCall(
                c.get("id") or f"call_{i}",
                (c.get("function") or {}).get("name") or "",
                (c.get("function") or {}).get("arguments") or "",
            )
            for i, c in enumerate(message.get("tool_calls") or ())
        )
    else:
        text = choice.get("text") or ""
    usage = data.get("usage") or {}
    reason = choice.get("finish_reason") or "stop"
    return GenerationChunk(
        text,
        int(usage.get("prompt_tokens") or 0),
        int(usage.get("completion_tokens") or (1 if text else 0)),
        _FINISH_REASONS.get(reason, "stop"),
        tool_calls=calls,
        logprobs=upstream_logprobs(choice),
        cached_tokens=cached_tokens(usage),
    )


def cached_tokens(usage: Mapping[str, Any]) -> int:
    """What the upstream's own prefix cache had: OpenAI's ``prompt_tokens_details``
    (vLLM, recent llama-server); 0 when it does not say."""
    details = usage.get("prompt_tokens_details")
    value = details.get("cached_tokens") if isinstance(details, Mapping) else None
    if type(value) is not int or value < 0:  # bool is an int too: not a count
        return 0
    return min(value, int(usage.get("prompt_tokens") or 0))


class OpenAICompatBackend(RemoteBackend):
    """Streams from an OpenAI-compatible server."""

    # Sampling knobs this dialect names otherwise (vLLM: repetition_penalty).
    renames: ClassVar[Mapping[str, str]] = {}

    # -- requests ----------------------------------------------------------

    def request_body(self, request: GenerationRequest) -> dict[str, Any]:
        """The upstream's request body; a dialect adds its own fields."""
        return request_body(request, self.config.upstream_model, self.renames)

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        chat = request.messages is not None
        path = "/v1/chat/completions" if chat else "/v1/completions"
        body = self.request_body(request)
        self.in_flight += 1
        try:
            if request.stream:
                # Closed with this generator, not later by the finalizer: that closes the
                # upstream connection, which is how the engine learns to stop.
                async with contextlib.aclosing(self._stream(path, body, chat=chat)) as chunks:
                    async for chunk in chunks:
                        yield chunk
            else:
                timeout = self.config.request_timeout
                yield whole_answer(await self.post_json(path, body, within=timeout), chat=chat)
        finally:
            self.in_flight -= 1

    async def _stream(
        self, path: str, body: dict[str, Any], *, chat: bool
    ) -> AsyncGenerator[GenerationChunk, None]:
        tools = _ToolCallAssembler()
        prompt_tokens = completion_tokens = cached = 0
        finish: FinishReason | None = None
        pieces = 0
        async with self.streaming_response(path, body) as response:
            async for line in self.lines(response):
                if not line.startswith("data:"):
                    continue
                payload = line[5:].strip()
                if payload == "[DONE]":
                    break
                event = parse_event(payload)
                if "error" in event:
                    message, code = error_message(payload.encode())
                    raise BackendUnavailable(
                        f"the upstream failed mid-stream: {message}", code=code
                    )
                usage = event.get("usage")
                if usage:
                    prompt_tokens = int(usage.get("prompt_tokens") or 0)
                    completion_tokens = int(usage.get("completion_tokens") or 0)
                    cached = cached_tokens(usage)
                for choice in event.get("choices") or ():
                    if chat:
                        delta = choice.get("delta") or {}
                        text = delta.get("content") or ""
                        if delta.get("tool_calls"):
                            tools.add(delta["tool_calls"])
                    else:
                        text = choice.get("text") or ""
                    reason = choice.get("finish_reason")
                    if reason:
                        finish = _FINISH_REASONS.get(reason, "stop")
                    logprobs = upstream_logprobs(choice)
                    if text or logprobs:
                        pieces += 1
                        yield GenerationChunk(text, prompt_tokens, pieces, logprobs=logprobs)
        if finish is None:  # no finish_reason: the upstream died or cut the stream
            raise BackendUnavailable("the upstream ended the stream before it finished")
        # Usage arrives after the finish chunk, so the final chunk is sent last.
        yield GenerationChunk(
            "",
            prompt_tokens,
            completion_tokens or pieces,
            finish,
            tool_calls=tools.calls(),
            cached_tokens=cached,
        )

    async def embed(self, texts: Sequence[str]) -> EmbeddingResult:
        body = {
            "model": self.config.upstream_model,
            "input": list(texts),
            "encoding_format": "float",
        }
        try:
            data = await self.post_json("/v1/embeddings", body)
        except Unsupported:
            raise Unsupported("This model does not support embeddings.", param="model") from None
        rows = sorted(data["data"], key=lambda d: d["index"])
        usage = data.get("usage") or {}
        return EmbeddingResult(
            vectors=[row["embedding"] for row in rows],
            prompt_tokens=int(usage.get("prompt_tokens") or 0),
        )
