"""Embeddings for the engine thread: a second llama.cpp context with mean pooling.

Built on first use (most deployments never embed) and driven by the engine's own thread
between decode steps, so nothing else ever touches llama.cpp state.
"""

from __future__ import annotations

from collections.abc import Sequence

from backends.llama.native import Batch, ContextConfig, LlamaContext, LlamaModel


class Embedder:
    """Packs token lists into batches of at most ``max_sequences`` inputs and
    ``context_length`` tokens, and returns one unit vector per input, in order."""

    def __init__(
        self, model: LlamaModel, *, context_length: int, max_sequences: int, threads: int
    ) -> None:
        self._model = model
        self._context_length = context_length
        self._max_sequences = max_sequences
        self._threads = threads
        self._ctx: LlamaContext | None = None

    def embed(self, token_lists: Sequence[list[int]]) -> list[list[float]]:
        ctx = self._context()
        vectors: list[list[float]] = []
        group: list[list[int]] = []
        for tokens in token_lists:
            if group and (
                sum(map(len, group)) + len(tokens) > self._context_length
                or len(group) == self._max_sequences
            ):
                vectors.extend(_embed_group(ctx, group))
                group = []
            group.append(tokens)
        if group:
            vectors.extend(_embed_group(ctx, group))
        return vectors

    def close(self) -> None:
        if self._ctx is not None:
            self._ctx.close()
            self._ctx = None

    def _context(self) -> LlamaContext:
        if self._ctx is None:
            n = self._context_length
            self._ctx = LlamaContext(
                self._model,
                ContextConfig(
                    n_ctx=n,
                    n_seq_max=self._max_sequences,
                    n_batch=n,
                    threads=self._threads,
                    embeddings=True,
                ),
            )
        return self._ctx


def _embed_group(ctx: LlamaContext, group: Sequence[list[int]]) -> list[list[float]]:
    batch = Batch(sum(map(len, group)), len(group))
    try:
        for seq_id, tokens in enumerate(group):
            for pos, token in enumerate(tokens):
                batch.add(token, pos, seq_id, logits=True)
        ctx.decode(batch)
        return [ctx.pooled_embedding(seq_id) for seq_id in range(len(group))]
    finally:
        for seq_id in range(len(group)):
            ctx.forget(seq_id)
        batch.close()
