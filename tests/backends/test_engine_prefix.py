"""The prefix cache in the embedded engine, on the real model (Gemma 3 270M): shared
prompts are computed once, give the same greedy tokens, and never cost a request room."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from backends.base import ChatMessage, GenerationChunk, GenerationRequest, SamplingParams
from backends.llama.backend import EmbeddedBackend, EmbeddedConfig

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="module")]

SYSTEM = (
    "You are the help desk of a lighthouse museum. Answer visitors briefly and kindly. "
    "The museum opens at nine, closes at five, and the tower may be climbed until four. "
) * 6  # ~230 tokens: a prefill of its own, longer than one 256-token chunk with a question
QUESTIONS = ["When do you open?", "Can I climb the tower?", "Is there a café?",
             "Are dogs allowed?", "Where do I park?", "How tall is it?"]  # fmt: skip


def chat(question: str, *, tenant: str | None = None, **sampling: object) -> GenerationRequest:
    return GenerationRequest(
        request_id="t",
        messages=(ChatMessage("system", SYSTEM), ChatMessage("user", question)),
        sampling=SamplingParams(**{"max_tokens": 24, "temperature": 0.0, **sampling}),  # type: ignore[arg-type]
        tenant=tenant,
    )


async def run(backend: EmbeddedBackend, req: GenerationRequest) -> list[GenerationChunk]:
    return [chunk async for chunk in backend.generate(req)]


def text(chunks: list[GenerationChunk]) -> str:
    return "".join(c.text for c in chunks)


async def started(**config: object) -> EmbeddedBackend:
    backend = EmbeddedBackend(EmbeddedConfig(**{"context_length": 512, "max_sequences": 8,
                                                **config}))  # type: ignore[arg-type]  # fmt: skip
    await backend.start()
    return backend


@pytest_asyncio.fixture(loop_scope="module", scope="module")
async def cached() -> AsyncIterator[EmbeddedBackend]:
    backend = await started()
    yield backend
    await backend.close()


async def test_greedy_tokens_are_the_same_with_and_without_the_cache(
    cached: EmbeddedBackend,
) -> None:
    plain = await started(prefix_cache="off")
    try:
        alone = [text(await run(plain, chat(q))) for q in QUESTIONS[:3]]
        assert plain.load().prefix_cache_hit_tokens is None
    finally:
        await plain.close()
    await run(cached, chat("Tell me about the museum."))  # the system prompt is now cached
    for question, expected in zip(QUESTIONS[:3], alone, strict=True):
        chunks = await run(cached, chat(question))
        assert chunks[-1].cached_tokens > 200  # the system prompt, not computed again
        assert text(chunks) == expected


async def test_requests_arriving_together_compute_the_shared_prompt_once(
    cached: EmbeddedBackend,
) -> None:
    before = cached.load()
    other = [dataclasses.replace(chat(q), sampling=SamplingParams(max_tokens=16, seed=i))
             for i, q in enumerate(QUESTIONS)]  # fmt: skip
    # A fresh system prompt: nobody has it yet, so the first prefills it and the rest wait.
    fresh = [dataclasses.replace(r, messages=(ChatMessage("system", "New. " + SYSTEM),
                                              *(r.messages or ())[1:])) for r in other]  # fmt: skip
    results = await asyncio.gather(*(run(cached, r) for r in fresh))
    after = cached.load()
    prompt = len(cached.prompt_tokens(fresh[0]))
    shared = [chunks[-1].cached_tokens for chunks in results]
    # The first computes it (sharing only the template's opening from earlier chats).
    assert sorted(shared)[0] < 10 and all(s > 200 for s in sorted(shared)[1:]), shared
    assert after.prefix_cache_hit_tokens is not None and before.prefix_cache_hit_tokens is not None
    assert after.prefix_cache_hit_tokens - before.prefix_cache_hit_tokens == sum(shared)
    assert after.prefix_cache_queried_tokens - before.prefix_cache_queried_tokens >= 6 * prompt  # type: ignore[operator]
    assert all(chunks[-1].finish_reason in ("stop", "length") for chunks in results)


async def test_per_tenant_caches_share_only_within_a_tenant() -> None:
    backend = await started(prefix_cache="per_tenant", context_length=2048)
    try:
        await run(backend, chat(QUESTIONS[0], tenant="team-a"))
        other = await run(backend, chat(QUESTIONS[1], tenant="team-b"))
        same = await run(backend, chat(QUESTIONS[1], tenant="team-a"))
        assert other[-1].cached_tokens == 0
        assert same[-1].cached_tokens > 200
    finally:
        await backend.close()


async def test_a_shared_cache_reports_only_a_tenants_own_tokens_as_cached(
    cached: EmbeddedBackend,
) -> None:
    secret = [ChatMessage("system", "Tenant A's own instructions. " + SYSTEM),
              ChatMessage("user", QUESTIONS[0])]  # fmt: skip
    await run(cached, dataclasses.replace(chat(""), messages=tuple(secret), tenant="team-a"))
    hits = cached.load().prefix_cache_hit_tokens or 0
    probe = dataclasses.replace(chat(""), messages=tuple(secret), tenant="team-b")
    other = await run(cached, probe)
    # The cells are shared (identical tokens), but usage does not tell team-b so.
    assert (cached.load().prefix_cache_hit_tokens or 0) - hits > 200
    assert other[-1].cached_tokens == 0
    again = await run(cached, probe)  # now team-b's own tokens too
    assert again[-1].cached_tokens > 200


async def test_cached_prefixes_give_way_to_requests_that_need_the_cells() -> None:
    # 4 sequences x 256 cells; each request below reserves a whole sequence's context.
    backend = await started(context_length=256, max_sequences=4)
    try:
        for i in range(4):  # distinct prompts: cached prefixes (on probation: 1/8 of cells)
            story = f"Story number {i}: once upon a"
            await run(backend, GenerationRequest("t", SamplingParams(max_tokens=40, seed=i),
                                                 prompt=story))  # fmt: skip
        held = backend.load().prefix_cache_cells
        assert held is not None and held > 40
        no_end = {1: -100.0, 106: -100.0}  # Gemma's <eos>, <end_of_turn>
        full = [GenerationRequest("t", SamplingParams(max_tokens=256 - 12, seed=i,
                                                      logit_bias=no_end),
                                  prompt=f"Another tale, number {i}, begins")
                for i in range(4)]  # fmt: skip
        results = await asyncio.gather(*(run(backend, r) for r in full))
        assert all(c[-1].finish_reason == "length" for c in results)
        assert all(c[-1].completion_tokens == 256 - 12 for c in results)
        cells = backend.load().prefix_cache_cells
        assert cells is not None and cells <= 4 * 256
    finally:
        await backend.close()
