"""The continuous-batching loop: one thread owns the llama.cpp context.

Callers on the event loop never touch llama.cpp state. They send commands
(submit, cancel, embed, stop) through a queue; the engine thread drains it
between decode steps and hands results back with one
``call_soon_threadsafe`` per step, not one per token.

Each step decodes one token for every running sequence plus up to
``prefill_chunk`` tokens of pending prompts (chunked prefill), so a long
prompt delays the others by a bounded amount instead of stalling them. A new
request joins at the next step; a finished or cancelled one frees its KV cells
and its sequence slot at once.

Under a constraint (``response_format``, a forced tool call), tokens the grammar allows
no alternative to (``{"name": "``) are not sampled one step each: they are appended
after the sampled token and decoded with it in the same step (jump-forward decoding),
and a sequence whose grammar is complete finishes without a step to sample its end.
"""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from backends.base import (
    BackendError,
    BackendOverloaded,
    BackendUnavailable,
    FinishReason,
    GenerationChunk,
    SamplingParams,
    TokenLogprob,
)
from backends.llama.embedding import Embedder
from backends.llama.native import (
    Batch,
    Constraint,
    ContextConfig,
    LlamaContext,
    LlamaModel,
    Sampler,
)
from backends.llama.prefix_cache import Holder, PrefixCache, Share
from backends.llama.stop import StopMatcher

log = logging.getLogger(__name__)

Deliver = Callable[[object], None]
MAX_SEQUENCE_IDS = 256  # llama.cpp's LLAMA_MAX_SEQ


@dataclass(frozen=True, slots=True)
class EngineConfig:
    context_length: int  # per sequence
    max_sequences: int
    threads: int
    batch_tokens: int = 512  # llama_batch capacity per step
    prefill_chunk: int = 256  # prompt tokens admitted per step
    # Of those, at most this many for batch work: a step in flight when a chat request
    # arrives is one it must wait for, so batch prompts never make that step long.
    background_prefill: int = 64
    queue_timeout: float = 30.0  # seconds a request may wait for a slot
    max_waiting: int = 256
    default_top_k: int = 40  # when a request names none (llama.cpp's and Ollama's default)
    prefix_cache: bool = True  # share decoded prompt prefixes between sequences


def cache_ids(config: EngineConfig) -> int:
    """Sequence ids for cached prefixes: above the running ones' slots."""
    return min(config.max_sequences, MAX_SEQUENCE_IDS - config.max_sequences)


def context_config(config: EngineConfig, *, prefix_cache: bool) -> ContextConfig:
    """The llama.cpp context the engine makes: one KV pool of every sequence's context."""
    return ContextConfig(
        n_ctx=config.context_length * config.max_sequences,
        n_seq_max=config.max_sequences + (cache_ids(config) if prefix_cache else 0),
        n_batch=config.batch_tokens,
        threads=config.threads,
    )


@dataclass(eq=False, slots=True)
class _Sequence:
    prompt: list[int]
    max_tokens: int
    sampling: SamplingParams
    deliver: Deliver
    deadline: float
    slot: int = -1
    fed: int = 0  # prompt tokens already in the KV cache
    pending: list[int] = field(default_factory=list)  # sampled or forced, not yet decoded
    completion_tokens: int = 0
    sampler: Sampler | None = None
    stop: StopMatcher = field(default_factory=lambda: StopMatcher(()))
    utf8: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))
    done: bool = False
    constraint: Constraint | None = None  # what the output must match (response_format)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # not yet sent, when asked for
    scope: str = ""  # who may share its prefix (prefix_cache.Holder.scope)
    tenant: str = ""
    generated: list[int] = field(default_factory=list)  # sampled and forced tokens
    holder: Holder | None = None  # its cells, with the prefix cache on
    waits_for: Share | None = None  # a prefix another sequence is still prefilling
    cached_tokens: int = 0  # prompt tokens shared, not computed
    background: bool = False  # batch work: held back while an interactive prompt prefills


@dataclass(eq=False, slots=True)
class _EmbedJob:
    token_lists: list[list[int]]
    deliver: Deliver


class _Stop:
    pass


class Ticket:
    """Handle returned by :meth:`LlamaEngine.submit`, used to cancel."""

    __slots__ = ("_seq",)

    def __init__(self, seq: _Sequence) -> None:
        self._seq = seq


class LlamaEngine:
    """Owns one model, one decoding context and the thread that drives them."""

    def __init__(self, model: LlamaModel, config: EngineConfig) -> None:
        self.model = model
        self.config = config
        self._commands: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._ctx: LlamaContext | None = None
        self._embedder = Embedder(
            model,
            context_length=config.context_length,
            max_sequences=config.max_sequences,
            threads=config.threads,
        )
        self._batch: Batch | None = None
        self._waiting: deque[_Sequence] = deque()
        self._running: dict[int, _Sequence] = {}
        self._free_slots: list[int] = list(range(config.max_sequences - 1, -1, -1))
        # Forced tokens a sequence may add to one step, so that a step of every sequence
        # decoding still leaves a whole prefill chunk of the batch.
        room = config.batch_tokens - config.prefill_chunk
        self._forced_per_step = max(0, room // config.max_sequences - 1)
        # Recurrent state cannot be shared by position: no prefix cache for such models.
        self._cache_enabled = config.prefix_cache and not model.recurrent
        self._cache_ids = cache_ids(config) if self._cache_enabled else 0
        self.prefix_cache: PrefixCache | None = None
        self._outbox: list[tuple[Deliver, object]] = []
        self._loop: asyncio.AbstractEventLoop | None = None
        self._failed: BaseException | None = None
        self._accepting = threading.Lock()
        self._closed = False
        # Read by metrics from other threads; each int has a single writer thread.
        self.running_count = 0
        self._submitted = 0  # written by the event loop only
        self._dequeued = 0  # written by the engine thread only
        self.last_batch_size = 0
        self.decode_steps = 0
        self.decoded_sequences = 0

    # -- lifecycle (event-loop side) -------------------------------------

    def start(self, loop: asyncio.AbstractEventLoop) -> None:
        cfg = self.config
        self._loop = loop
        context = context_config(cfg, prefix_cache=self._cache_enabled)
        if self._cache_enabled:
            ids = range(cfg.max_sequences, context.n_seq_max)
            self.prefix_cache = PrefixCache(context.n_ctx, ids)
        self._ctx = LlamaContext(self.model, context)
        self._batch = Batch(cfg.batch_tokens, cfg.max_sequences)
        self._thread = threading.Thread(target=self._run, name="lockgate-engine", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        if self._thread is None:
            return
        self._commands.put(_Stop())
        self._thread.join()
        self._thread = None
        for resource in (self._batch, self._ctx):
            if resource is not None:
                resource.close()
        self._batch = self._ctx = None
        self._embedder.close()

    @property
    def waiting_count(self) -> int:
        return self._submitted - self._dequeued

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self._failed is None

    # -- requests (event-loop side) --------------------------------------

    def submit(
        self,
        prompt: list[int],
        sampling: SamplingParams,
        max_tokens: int,
        deliver: Deliver,
        *,
        constraint: Constraint | None = None,
        scope: str = "",
        tenant: str = "",
        background: bool = False,
    ) -> Ticket:
        """Queue a sequence; ``deliver`` receives chunks or a BackendError."""
        if not self.alive:
            raise BackendUnavailable("the engine is not running")
        # Requests pass through the waiting queue even when a slot is free; count only
        # those that will really have to wait. (len() of a list is atomic under the GIL.)
        if self.waiting_count - len(self._free_slots) >= self.config.max_waiting:
            raise BackendOverloaded(
                "the engine's queue is full; retry shortly", retry_after=self._retry_after()
            )
        seq = _Sequence(
            prompt=prompt,
            max_tokens=max_tokens,
            sampling=sampling,
            deliver=deliver,
            deadline=time.monotonic() + self.config.queue_timeout,
            stop=StopMatcher(sampling.stop),
            constraint=constraint,
            scope=scope,
            tenant=tenant,
            background=background,
        )
        self._put(seq)
        self._submitted += 1
        return Ticket(seq)

    def cancel(self, ticket: Ticket) -> None:
        with self._accepting:
            if not self._closed:
                self._commands.put(ticket)

    def embed(self, token_lists: list[list[int]], deliver: Deliver) -> None:
        self._put(_EmbedJob(token_lists, deliver))

    def _put(self, command: object) -> None:
        # The lock pairs with _close_inbox: a command is either refused here or
        # answered there, never left in a queue nobody reads.
        with self._accepting:
            if self._closed:
                raise BackendUnavailable("the engine is not running")
            self._commands.put(command)

    # -- the engine thread -----------------------------------------------

    def _run(self) -> None:
        try:
            while True:
                idle = not self._running and not self._waiting
                if not self._drain(block=idle):
                    break
                self._expire_waiting()
                self._admit()
                if self._running:
                    self._step()
                self._flush()
        except BaseException as exc:  # the engine thread must never die silently
            self._failed = exc  # first, so that submit() refuses new work at once
            log.exception("engine loop failed")
            self._fail_all(BackendUnavailable("the engine failed; see the server log"))
        finally:
            self._close_inbox()
            self._release_all()

    def _close_inbox(self) -> None:
        """Refuse further commands and answer every one still queued."""
        with self._accepting:
            self._closed = True
        error = BackendUnavailable("the engine is not running")
        while True:
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                break
            if isinstance(command, _Sequence) and not command.done:
                command.done = True
                self._dequeued += 1
                self._send(command, error)
            elif isinstance(command, _EmbedJob):
                self._outbox.append((command.deliver, error))
        self._flush()

    def _drain(self, *, block: bool) -> bool:
        """Apply pending commands; False when told to stop."""
        timeout = self._next_deadline_in() if block else None
        try:
            command: object = (
                self._commands.get(timeout=timeout) if block else self._commands.get_nowait()
            )
        except queue.Empty:
            return True
        while True:
            if isinstance(command, _Stop):
                self._fail_all(BackendUnavailable("the server is shutting down"))
                return False
            if isinstance(command, _Sequence):
                self._waiting.append(command)
            elif isinstance(command, Ticket):
                self._cancel(command._seq)
            elif isinstance(command, _EmbedJob):
                self._run_embedding(command)
            try:
                command = self._commands.get_nowait()
            except queue.Empty:
                return True

    def _next_deadline_in(self) -> float | None:
        if not self._waiting:
            return None
        return max(0.0, min(s.deadline for s in self._waiting) - time.monotonic())

    def _cancel(self, seq: _Sequence) -> None:
        if seq.done:
            return
        seq.done = True
        if seq.slot < 0:
            try:
                self._waiting.remove(seq)
                self._dequeued += 1
            except ValueError:
                pass
        else:
            self._free(seq)

    def _expire_waiting(self) -> None:
        if not self._waiting:
            return
        now = time.monotonic()
        expired = [s for s in self._waiting if s.deadline <= now]
        for seq in expired:
            self._waiting.remove(seq)
            self._dequeued += 1
            seq.done = True
            self._send(
                seq,
                BackendOverloaded(
                    "no engine slot became free within the wait limit",
                    retry_after=self._retry_after(),
                ),
            )

    def _retry_after(self) -> float:
        return max(1.0, self.waiting_count / max(1, self.config.max_sequences))

    def _admit(self) -> None:
        while self._waiting and self._free_slots:
            seq = self._waiting.popleft()
            self._dequeued += 1
            p = seq.sampling
            seq.slot = self._free_slots.pop()
            # OpenAI's defaults where the request is silent; top-k is ours (see config).
            seq.sampler = Sampler(
                self.model,
                temperature=1.0 if p.temperature is None else p.temperature,
                top_k=self.config.default_top_k if p.top_k is None else p.top_k,
                top_p=1.0 if p.top_p is None else p.top_p,
                min_p=p.min_p or 0.0,
                seed=p.seed,
                presence_penalty=p.presence_penalty or 0.0,
                frequency_penalty=p.frequency_penalty or 0.0,
                repeat_penalty=p.repeat_penalty or 1.0,
                logit_bias=p.logit_bias,
                constraint=seq.constraint,
                logprobs=p.logprobs,
            )
            self._running[seq.slot] = seq
            if self.prefix_cache is not None:
                max_len = len(seq.prompt) + seq.max_tokens
                seq.holder = self.prefix_cache.admit(
                    seq.slot, seq.prompt, seq.scope, max_len, seq.tenant
                )
                self._place(seq)
        self.running_count = len(self._running)

    def _place(self, seq: _Sequence) -> None:
        """Start ``seq`` on the longest prefix it can share, or wait for one still being
        prefilled; evict cached prefixes if its reservation needs their cells."""
        cache, ctx, holder = self.prefix_cache, self._ctx, seq.holder
        assert cache is not None and ctx is not None and holder is not None
        share = cache.best(holder)
        if share is not None and not share.ready:
            seq.waits_for = share
            return
        seq.waits_for = None
        cache.begin(holder, share)
        if share is not None:
            ctx.share(share.source.seq_id, seq.slot, share.tokens)
            seq.fed = share.tokens
            # Usage tells a tenant only of its own tokens: another's shared system prompt
            # would otherwise be readable a token at a time by guessing (README: Security).
            seq.cached_tokens = share.tokens if share.source.tenant == seq.tenant else 0
        for seq_id in cache.make_room():
            ctx.forget(seq_id)

    def _waiting_for_prefix(self, seq: _Sequence) -> bool:
        """Whether ``seq`` still waits for another sequence to prefill its prefix."""
        share = seq.waits_for
        if share is None:
            return False
        if share.ready or not share.source.running:  # decoded, or it will not be: look again
            self._place(seq)
        return seq.waits_for is not None

    def _step(self) -> None:
        batch, ctx = self._batch, self._ctx
        assert batch is not None and ctx is not None
        batch.clear()
        outputs: list[tuple[_Sequence, int]] = []
        prefilling: list[_Sequence] = []
        advanced: list[tuple[Holder, int]] = []  # prefills not finished this step
        # An interactive prompt to prefill: this step is its alone with the other
        # interactive sequences, and batch work waits one step (a step of every batch
        # sequence would otherwise come first and delay that prompt's first token).
        urgent = any(
            not s.pending and not s.background and s.waits_for is None
            for s in self._running.values()
        )
        for seq in self._running.values():
            if urgent and seq.background:
                continue
            if seq.pending:
                pos = len(seq.prompt) + seq.completion_tokens - len(seq.pending)
                last = len(seq.pending) - 1
                for i, token in enumerate(seq.pending):
                    index = batch.add(token, pos + i, seq.slot, logits=i == last)
                outputs.append((seq, index))
            else:
                prefilling.append(seq)
        budget = min(self.config.prefill_chunk, batch.capacity - len(batch))
        background = self.config.background_prefill
        for seq in prefilling:
            if budget <= 0:
                break
            if (seq.background and background <= 0) or self._waiting_for_prefix(seq):
                continue
            take = min(budget, len(seq.prompt) - seq.fed)
            if seq.background:
                take = min(take, background)
                background -= take
            end = seq.fed + take
            for pos in range(seq.fed, end):
                last = pos == len(seq.prompt) - 1
                index = batch.add(seq.prompt[pos], pos, seq.slot, logits=last)
            seq.fed = end
            budget -= take
            if seq.fed == len(seq.prompt):
                outputs.append((seq, index))
            elif seq.holder is not None:
                advanced.append((seq.holder, end))
        if not len(batch):  # a guard: one waits only for a sequence that is prefilling
            log.warning("a decode step with nothing to decode")
            return
        ctx.decode(batch)
        if self.prefix_cache is not None:
            for holder, decoded in advanced:
                self.prefix_cache.advance(holder, decoded)
            for seq, _ in outputs:
                if seq.holder is not None:
                    self.prefix_cache.advance(seq.holder, len(seq.prompt) + seq.completion_tokens)
        self.decode_steps += 1
        self.last_batch_size = len(outputs)
        self.decoded_sequences += len(outputs)
        for seq, index in outputs:
            assert seq.sampler is not None
            self._on_token(seq, seq.sampler.sample(ctx, index))

    def _on_token(self, seq: _Sequence, token: int) -> None:
        if self.model.is_end_of_generation(token):
            self._finish(seq, seq.stop.flush() + seq.utf8.decode(b"", final=True), "stop")
            return
        sampler = seq.sampler
        assert sampler is not None
        tokens = [token]
        if sampler.last_logprobs is not None:
            seq.logprobs.append(self._logprob(token, *sampler.last_logprobs))
        else:  # jump forward over what a constraint forces: decoded with it, not sampled
            room = min(self._forced_per_step, seq.max_tokens - seq.completion_tokens - 1)
            tokens += sampler.forced(room)
        end = next((i for i, t in enumerate(tokens) if self.model.is_end_of_generation(t)), None)
        if end is not None:  # a grammar that forces the end of generation
            del tokens[end:]
        seq.completion_tokens += len(tokens)
        seq.pending = tokens
        seq.generated += tokens
        at_limit = seq.completion_tokens >= seq.max_tokens
        piece = b"".join(map(self.model.piece, tokens))
        text, stopped = seq.stop.feed(seq.utf8.decode(piece, final=at_limit))
        if stopped:
            self._finish(seq, text, "stop")
        elif at_limit:
            self._finish(seq, text + seq.stop.flush(), "length")
        elif end is not None or sampler.finished:  # only the end could be sampled next
            self._finish(seq, text + seq.stop.flush() + seq.utf8.decode(b"", final=True), "stop")
        elif text:
            self._send(seq, self._chunk(seq, text))

    def _chunk(
        self, seq: _Sequence, text: str, reason: FinishReason | None = None
    ) -> GenerationChunk:
        logprobs: tuple[TokenLogprob, ...] = ()
        if seq.logprobs:
            logprobs, seq.logprobs = tuple(seq.logprobs), []
        return GenerationChunk(
            text,
            len(seq.prompt),
            seq.completion_tokens,
            reason,
            logprobs=logprobs,
            cached_tokens=seq.cached_tokens,
        )

    def _logprob(self, token: int, logprob: float, top: list[tuple[int, float]]) -> TokenLogprob:
        piece = self.model.piece
        alternatives = tuple((p.decode("utf-8", "replace"), p, lp) for p, lp in
                             ((piece(t), lp) for t, lp in top))  # fmt: skip
        raw = piece(token)
        return TokenLogprob(raw.decode("utf-8", "replace"), raw, logprob, alternatives)

    def _finish(self, seq: _Sequence, text: str, reason: FinishReason) -> None:
        self._send(seq, self._chunk(seq, text, reason))
        seq.done = True
        self._free(seq)

    def _free(self, seq: _Sequence) -> None:
        ctx, cache = self._ctx, self.prefix_cache
        assert ctx is not None
        if cache is not None and seq.holder is not None:
            # Its cells stay as a cached prefix (under another id) unless redundant.
            keep, dropped = cache.release(seq.holder, seq.prompt + seq.generated)
            for seq_id in dropped:
                ctx.forget(seq_id)
            if keep is not None:
                ctx.share(seq.slot, keep, seq.holder.decoded)
            seq.holder = None
        ctx.forget(seq.slot)
        if seq.sampler is not None:
            seq.sampler.close()
            seq.sampler = None
        del self._running[seq.slot]
        self._free_slots.append(seq.slot)
        self.running_count = len(self._running)

    def _run_embedding(self, job: _EmbedJob) -> None:
        try:
            self._outbox.append((job.deliver, self._embedder.embed(job.token_lists)))
        except Exception:
            log.exception("embedding failed")
            self._outbox.append((job.deliver, BackendUnavailable("the embedding step failed")))

    # -- delivery ----------------------------------------------------------

    def _send(self, seq: _Sequence, item: GenerationChunk | BackendError) -> None:
        self._outbox.append((seq.deliver, item))

    def _flush(self) -> None:
        if not self._outbox or self._loop is None:
            return
        outbox, self._outbox = self._outbox, []
        # RuntimeError: the event loop is closed, so nobody is listening.
        with contextlib.suppress(RuntimeError):
            self._loop.call_soon_threadsafe(_deliver_all, outbox)

    def _fail_all(self, error: BackendError) -> None:
        for seq in list(self._running.values()) + list(self._waiting):
            if not seq.done:
                seq.done = True
                self._send(seq, error)
        self._dequeued += len(self._waiting)
        self._waiting.clear()

    def _release_all(self) -> None:
        for seq in list(self._running.values()):
            if seq.sampler is not None:
                seq.sampler.close()
        self._running.clear()
        self.running_count = 0


def _deliver_all(outbox: list[tuple[Deliver, object]]) -> None:
    for deliver, item in outbox:
        deliver(item)
