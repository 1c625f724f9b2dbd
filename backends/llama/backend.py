"""The embedded llama.cpp engine behind the Backend interface.

>>> backend = EmbeddedBackend(EmbeddedConfig(path=None, max_sequences=8))
>>> await backend.start()                 # assembles the default model if needed
>>> async for chunk in backend.generate(request): ...
"""

from __future__ import annotations

import asyncio
import json
import os
from collections.abc import AsyncIterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal

from backends.base import (
    BackendError,
    BackendLoad,
    BackendUnavailable,
    ChatMessage,
    ContextLengthExceeded,
    EmbeddingResult,
    GenerationChunk,
    GenerationRequest,
    InvalidRequestError,
    ModelInfo,
)
from backends.llama.constraints import Constraints, Matcher, check_schema
from backends.llama.engine import EngineConfig, LlamaEngine
from backends.llama.native import LlamaModel
from backends.llama.templates import BuiltinTemplate, ChatTemplate, architecture_family
from backends.llama.tools import (
    ToolCallParser,
    ToolFormat,
    call_grammar,
    forced_tools,
    tool_format,
    uses_tools,
)
from backends.model_store import resolve_model_path


@dataclass(frozen=True, slots=True)
class EmbeddedConfig:
    path: str | None = None  # None: the packaged default model
    context_length: int = 2048  # per sequence
    max_sequences: int = 8
    threads: int | None = None  # None: every core
    template: BuiltinTemplate | None = None  # None: the GGUF's own, else by architecture
    queue_timeout: float = 30.0
    max_waiting: int = 256
    prefill_chunk: int = 256
    background_prefill: int = 64
    batch_tokens: int = 512
    default_top_k: int = 40
    # "shared": identical prompt prefixes are computed once, whoever sends them;
    # "per_tenant": only within a tenant; "off": every prompt is prefilled whole.
    prefix_cache: Literal["shared", "per_tenant", "off"] = "shared"


def engine_config(cfg: EmbeddedConfig) -> EngineConfig:
    """The engine's settings for a configured model (the memory plan reads them too)."""
    return EngineConfig(
        context_length=cfg.context_length,
        max_sequences=cfg.max_sequences,
        threads=cfg.threads or os.cpu_count() or 1,
        # Room for one decode token per sequence plus a full prefill chunk.
        batch_tokens=max(cfg.batch_tokens, cfg.max_sequences + cfg.prefill_chunk),
        prefill_chunk=cfg.prefill_chunk,
        background_prefill=cfg.background_prefill,
        queue_timeout=cfg.queue_timeout,
        max_waiting=cfg.max_waiting,
        default_top_k=cfg.default_top_k,
        prefix_cache=cfg.prefix_cache != "off",
    )


# Past this many characters a prompt is tokenized (its template rendered too) in a worker
# thread: llama.cpp's tokenizer releases the GIL, so the event loop serves others meanwhile.
OFF_LOOP_CHARS = 16 * 1024


def text_chars(request: GenerationRequest) -> int:
    """The characters the prompt is made of (the template's own text aside)."""
    if request.messages is None:
        return len(request.prompt or "")
    chars = sum(
        len(m.content) + sum(len(c.arguments) + len(c.name) for c in m.tool_calls)
        for m in request.messages
    )
    return chars + sum(len(json.dumps(t)) for t in declared_tools(request))


def declared_tools(request: GenerationRequest) -> tuple[Mapping[str, object], ...]:
    """The tools the prompt declares: none with ``tool_choice: "none"``."""
    return () if request.tool_choice == "none" else request.tools


class EmbeddedBackend:
    """Runs a GGUF in-process with continuous batching."""

    def __init__(self, config: EmbeddedConfig) -> None:
        self.config = config
        self._model: LlamaModel | None = None
        self._engine: LlamaEngine | None = None
        self._template: ChatTemplate | None = None
        self._longest_token = 1  # bytes; set at start
        self._constraints: Constraints | None = None  # built at the first constrained request
        self._tool_format: ToolFormat | None = None
        self._special_markers: dict[str, int] = {}  # tool markers that are one token
        self.model_path: Path | None = None

    @property
    def ready(self) -> bool:
        return self._engine is not None and self._engine.alive

    async def start(self) -> None:
        cfg = self.config
        self.model_path = await asyncio.to_thread(resolve_model_path, cfg.path)
        model = await asyncio.to_thread(LlamaModel, self.model_path)
        if cfg.context_length > model.n_ctx_train:
            model.close()
            raise ValueError(
                f"context_length {cfg.context_length} exceeds the model's training context "
                f"({model.n_ctx_train})"
            )
        self._model = model
        self._longest_token = await asyncio.to_thread(model.longest_token)
        self._template = ChatTemplate.select(
            configured=cfg.template,
            embedded=model.chat_template,
            architecture=model.architecture,
            bos_token=model.bos_text,
            eos_token=model.eos_text,
        )
        family = self._template.name
        self._tool_format = tool_format(
            architecture_family(model.architecture) if family == "gguf" else family
        )
        found = {m: model.special_token(m) for m in self._tool_format.markers}
        self._special_markers = {m: t for m, t in found.items() if t is not None}
        engine = LlamaEngine(model, engine_config(cfg))
        await asyncio.to_thread(engine.start, asyncio.get_running_loop())
        self._engine = engine

    async def close(self) -> None:
        engine, self._engine = self._engine, None
        if engine is not None:
            await asyncio.to_thread(engine.stop)
        if self._model is not None:
            self._model.close()
            self._model = None

    def load(self) -> BackendLoad:
        engine = self._engine
        if engine is None:
            return BackendLoad(
                running=0,
                waiting=0,
                capacity=self.config.max_sequences,
                last_batch_size=0,
                decode_steps=0,
                decoded_sequences=0,
            )
        cache = engine.prefix_cache
        return BackendLoad(
            running=engine.running_count,
            waiting=engine.waiting_count,
            capacity=self.config.max_sequences,
            last_batch_size=engine.last_batch_size,
            decode_steps=engine.decode_steps,
            decoded_sequences=engine.decoded_sequences,
            prefix_cache_hit_tokens=None if cache is None else cache.hit_tokens,
            prefix_cache_queried_tokens=None if cache is None else cache.queried_tokens,
            prefix_cache_cells=None if cache is None else cache.cached_cells,
        )

    def describe(self) -> ModelInfo:
        model, path = self._model, self.model_path
        if model is None or path is None:
            return ModelInfo(context_length=self.config.context_length)
        return ModelInfo(
            family=model.architecture or None,
            parameters=model.n_params,
            quantization=model.file_type,
            context_length=self.config.context_length,
            size_bytes=path.stat().st_size,
            chat_template=model.chat_template is not None,
        )

    def _constraints_of(self, model: LlamaModel) -> Constraints:
        if self._constraints is None:
            self._constraints = Constraints(model)
        return self._constraints

    def _require(self) -> tuple[LlamaEngine, LlamaModel]:
        if self._engine is None or self._model is None or not self._engine.alive:
            raise BackendUnavailable("the model is not loaded")
        return self._engine, self._model

    def prompt_tokens(self, request: GenerationRequest) -> list[int]:
        _, model = self._require()
        if request.messages is not None:
            assert self._template is not None
            # Template text may hold control tokens; message contents never do.
            tokens = []
            parts = self._template.render_parts(self._chat(request.messages, request))
            for i, (text, is_content) in enumerate(parts):
                tokens += model.tokenize(text, special=not is_content, add_bos=i == 0)
        else:
            # A raw completion prompt is the caller's own text, control tokens included.
            tokens = model.tokenize(request.prompt or "", special=True)
        if not tokens:
            raise InvalidRequestError("the prompt is empty", param="prompt")
        return tokens

    def _chat(
        self, messages: Sequence[ChatMessage], request: GenerationRequest
    ) -> Sequence[ChatMessage]:
        """The turns as the template renders them: tools declared, calls written out."""
        tools = declared_tools(request)
        if not tools and not uses_tools(messages):
            return messages
        assert self._tool_format is not None
        return self._tool_format.prepare(messages, tools)

    async def _constraint_of(self, request: GenerationRequest, model: LlamaModel) -> Matcher | None:
        """The matcher decoding must follow: a forced tool call's, else the format's."""
        forced = forced_tools(request.tools, request.tool_choice)
        if forced is not None:
            for tool in forced:
                parameters = tool["function"].get("parameters")
                if parameters is not None:
                    check_schema(parameters, param="tools")
            assert self._tool_format is not None
            # A named function is called once; "required" may call several in parallel.
            parallel = (
                request.tool_choice == "required" and request.parallel_tool_calls is not False
            )
            grammar = call_grammar(
                self._tool_format, forced, parallel=parallel, special=self._special_markers
            )
            return await self._constraints_of(model).grammar_matcher(grammar)
        if request.response_format is not None:
            return await self._constraints_of(model).matcher(request.response_format)
        return None

    async def validate(self, request: GenerationRequest) -> None:
        await self._prepare(request)

    async def _prepare(self, request: GenerationRequest) -> list[int]:
        """The prompt's tokens, once every check that needs no engine time has passed.

        What can be refused by arithmetic is refused before anything grows with the
        input (a 10 MB prompt is not tokenized to learn that it cannot fit); a large
        prompt that may fit is tokenized off the event loop.
        """
        _, model = self._require()
        await self._constraint_of(request, model)  # a bad schema or tool_choice is a 400 now
        bad = [t for t in request.sampling.logit_bias if not 0 <= t < model.n_vocab]
        if bad:
            raise InvalidRequestError(
                f"logit_bias token ids must be in [0, {model.n_vocab}); got {bad[0]}",
                param="logit_bias",
            )
        chars = text_chars(request)
        least = -(-chars // self._longest_token)  # no token stands for more characters
        self._within_context(request, least, at_least=True)
        if chars > OFF_LOOP_CHARS:
            prompt = await asyncio.to_thread(self.prompt_tokens, request)
        else:
            prompt = self.prompt_tokens(request)
        self._within_context(request, len(prompt))
        return prompt

    def _within_context(
        self, request: GenerationRequest, prompt: int, *, at_least: bool = False
    ) -> None:
        requested = request.sampling.max_tokens or 1
        if prompt + requested > self.config.context_length:
            raise ContextLengthExceeded(
                prompt_tokens=prompt,
                max_tokens=requested,
                context_length=self.config.context_length,
                param="messages" if request.messages is not None else "prompt",
                at_least=at_least,
            )

    async def generate(self, request: GenerationRequest) -> AsyncIterator[GenerationChunk]:
        engine, _ = self._require()
        # validate() ran this already; tokenizing again costs microseconds (or runs in a
        # thread) and keeps no per-request state for requests that never reach the engine.
        prompt = await self._prepare(request)
        n_ctx = self.config.context_length
        requested = request.sampling.max_tokens
        max_tokens = requested if requested is not None else n_ctx - len(prompt)
        inbox: asyncio.Queue[object] = asyncio.Queue()
        _, model = self._require()
        matcher = await self._constraint_of(request, model)
        constraint = None if matcher is None else self._constraints_of(model).constraint(matcher)
        parser = None
        if request.messages is not None and declared_tools(request):
            assert self._tool_format is not None
            parser = ToolCallParser(
                self._tool_format, parallel=request.parallel_tool_calls is not False
            )
        scope = (request.tenant or "") if self.config.prefix_cache == "per_tenant" else ""
        ticket = engine.submit(
            prompt,
            request.sampling,
            max_tokens,
            inbox.put_nowait,
            constraint=constraint,
            scope=scope,
            tenant=request.tenant or "",
            background=request.background,
        )
        finished = False
        try:
            while True:
                item = await inbox.get()
                if isinstance(item, BackendError):
                    finished = True
                    raise item
                assert isinstance(item, GenerationChunk)
                finished = item.finish_reason is not None
                if parser is not None:
                    item = _read_calls(parser, item)
                yield item
                if finished:
                    return
        finally:
            if not finished:
                # The consumer went away (disconnect, cancel): free the slot now.
                engine.cancel(ticket)

    async def embed(self, texts: Sequence[str]) -> EmbeddingResult:
        engine, model = self._require()
        n_ctx = self.config.context_length
        for i, text in enumerate(texts):  # refused by size alone, before tokenizing
            least = -(-len(text) // self._longest_token)
            if least > n_ctx:
                raise InvalidRequestError(
                    f"input[{i}] has at least {least} tokens; the maximum is {n_ctx}",
                    param="input",
                )

        def tokenize() -> list[list[int]]:
            return [model.tokenize(t, special=True) for t in texts]

        if sum(map(len, texts)) > OFF_LOOP_CHARS:
            token_lists = await asyncio.to_thread(tokenize)
        else:
            token_lists = tokenize()
        for i, tokens in enumerate(token_lists):
            if len(tokens) > self.config.context_length:
                raise InvalidRequestError(
                    f"input[{i}] has {len(tokens)} tokens; the maximum is "
                    f"{self.config.context_length}",
                    param="input",
                )
        done: asyncio.Future[object] = asyncio.get_running_loop().create_future()

        def resolve(result: object) -> None:
            if not done.done():
                done.set_result(result)

        engine.embed(token_lists, resolve)
        result = await done
        if isinstance(result, BackendError):
            raise result
        assert isinstance(result, list)
        return EmbeddingResult(vectors=result, prompt_tokens=sum(map(len, token_lists)))


def _read_calls(parser: ToolCallParser, chunk: GenerationChunk) -> GenerationChunk:
    """The chunk with tool-call text turned into deltas (and, at the end, whole calls)."""
    text, deltas = parser.feed(chunk.text)
    if chunk.finish_reason is None:
        return replace(chunk, text=text, tool_deltas=tuple(deltas))
    more, last = parser.finish()
    reason = chunk.finish_reason
    if parser.calls and reason == "stop":
        reason = "tool_calls"
    return replace(
        chunk,
        text=text + more,
        tool_deltas=tuple(deltas + last),
        tool_calls=tuple(parser.calls),
        finish_reason=reason,
    )
