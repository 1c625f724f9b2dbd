"""llama.cpp's ``llama-server``: the OpenAI-compatible client plus its own signals.

Forced tool calls (``tool_choice`` ``required`` or a named function) are sent as
llama-server's ``json_schema`` of a call too, since llama-server constrains them only
when the model's template declares tool support: the JSON it answers is read back into
``tool_calls`` (one call; where llama-server made the calls itself, they are kept).

``GET /health`` answers 503 while the model loads and 200 once it serves.
``GET /props`` gives ``total_slots``: the server's capacity. ``GET /slots``
(on by default; ``--no-slots`` turns it off) lists each slot with
``is_processing``. Where it is off, ``GET /metrics`` (with ``--metrics``)
gives ``llamacpp:requests_processing`` and ``llamacpp:requests_deferred``.
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Mapping, Sequence
from dataclasses import replace
from typing import Any

import orjson
from prometheus_client.parser import text_string_to_metric_families

from backends.base import BackendLoad, GenerationChunk, GenerationRequest, TokenLogprob
from backends.llama.tools import call_schema, forced_tools, read_forced_call
from backends.openai_compat import OpenAICompatBackend


def _json_or_none(reply: tuple[int, bytes]) -> object:
    status, body = reply
    return orjson.loads(body) if status == 200 else None


def busy_slots(slots: list[dict[str, Any]]) -> int:
    return sum(1 for slot in slots if slot.get("is_processing"))


def parse_llamacpp_metrics(text: str) -> tuple[int, int]:
    """(requests processing, requests deferred) from llama-server's /metrics."""
    values: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            values[sample.name] = sample.value
    return (
        int(values.get("llamacpp:requests_processing", 0)),
        int(values.get("llamacpp:requests_deferred", 0)),
    )


def _forced(request: GenerationRequest) -> Sequence[Mapping[str, Any]] | None:
    if request.messages is None or not request.tools:
        return None
    return forced_tools(request.tools, request.tool_choice)


class LlamaCppBackend(OpenAICompatBackend):
    _slots_total: int | None = None
    _busy = 0
    _deferred = 0

    def request_body(self, request: GenerationRequest) -> dict[str, Any]:
        body = super().request_body(request)
        forced = _forced(request)
        if forced:
            calls = [call_schema(t) for t in forced]
            body["json_schema"] = calls[0] if len(calls) == 1 else {"anyOf": calls}
        return body

    async def generate(self, request: GenerationRequest) -> AsyncGenerator[GenerationChunk, None]:
        if not _forced(request):
            async with contextlib.aclosing(super().generate(request)) as chunks:
                async for chunk in chunks:
                    yield chunk
            return
        # The answer is the call's JSON: held back, then given as the call.
        text: list[str] = []
        logprobs: list[TokenLogprob] = []
        async with contextlib.aclosing(super().generate(request)) as chunks:
            async for chunk in chunks:
                text.append(chunk.text)
                logprobs.extend(chunk.logprobs)
                if chunk.finish_reason is None:
                    continue
                whole = replace(chunk, logprobs=tuple(logprobs))
                call = None if chunk.tool_calls else read_forced_call("".join(text))
                if call is None:  # llama-server called natively, or the JSON was cut short
                    yield replace(whole, text="" if chunk.tool_calls else "".join(text))
                else:
                    yield replace(whole, text="", tool_calls=(call,), finish_reason="tool_calls")

    async def probe(self) -> bool:
        if (await self.get("/health"))[0] != 200:
            return False  # 503 while the model loads
        if self._slots_total is None:
            props = _json_or_none(await self.get("/props"))
            if isinstance(props, dict) and props.get("total_slots"):
                self._slots_total = int(props["total_slots"])
        slots = _json_or_none(await self.get("/slots"))
        if isinstance(slots, list):
            self._busy, self._deferred = busy_slots(slots), 0
        else:  # /slots is off (--no-slots): fall back to /metrics (needs --metrics)
            status, text = await self.get("/metrics")
            if status == 200:
                self._busy, self._deferred = parse_llamacpp_metrics(text.decode())
        return True

    def load(self) -> BackendLoad:
        return BackendLoad(
            running=max(self._busy, self.in_flight),
            waiting=self._deferred,
            capacity=self._slots_total or self.config.concurrency,
        )
