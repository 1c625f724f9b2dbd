"""A thin, typed layer over llama-cpp-python's ctypes bindings.

Only the engine thread calls into these objects (llama.cpp contexts are not
thread-safe); tokenization only reads the vocabulary and is also used from the
event loop. Every C resource is owned by exactly one object with a ``close()``.
"""

from __future__ import annotations

import ctypes
import math
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import llama_cpp as C
import numpy as np

_LOG_LOCK = threading.Lock()
_META_BUF = 4096
# general.file_type (llama.cpp's llama_ftype) → the name quantized files go by.
_FILE_TYPES = {
    0: "F32", 1: "F16", 2: "Q4_0", 3: "Q4_1", 7: "Q8_0", 8: "Q5_0", 9: "Q5_1", 10: "Q2_K",
    11: "Q3_K_S", 12: "Q3_K_M", 13: "Q3_K_L", 14: "Q4_K_S", 15: "Q4_K_M", 16: "Q5_K_S",
    17: "Q5_K_M", 18: "Q6_K", 32: "BF16",
}  # fmt: skip


def _discard_log(level: int, text: bytes, user_data: Any) -> None:  # pragma: no cover - C callback
    return None


class _LogSilencer:
    """llama.cpp logs every tensor at load; route it nowhere, once per process.

    The ctypes callback must outlive every call into llama.cpp, so it is kept on
    this object, which the first :class:`LlamaModel` stores for the process.
    """

    def __init__(self) -> None:
        self.callback = C.llama_log_callback(_discard_log)
        C.llama_log_set(self.callback, ctypes.c_void_p(0))
        C.llama_backend_init()


class LlamaModel:
    """Loaded weights plus vocabulary. Safe to share across contexts."""

    _silencer: _LogSilencer | None = None

    def __init__(self, path: Path) -> None:
        with _LOG_LOCK:
            if LlamaModel._silencer is None:
                LlamaModel._silencer = _LogSilencer()
        params = C.llama_model_default_params()
        self._model = C.llama_model_load_from_file(str(path).encode(), params)
        if not self._model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self._vocab = C.llama_model_get_vocab(self._model)
        self.n_vocab: int = C.llama_vocab_n_tokens(self._vocab)
        self.n_embd: int = C.llama_model_n_embd(self._model)
        # State that is not per position (Mamba, RWKV): nothing to share by position.
        self.recurrent: bool = bool(C.llama_model_is_recurrent(self._model))
        self.n_ctx_train: int = C.llama_model_n_ctx_train(self._model)
        self.n_params: int = C.llama_model_n_params(self._model)
        self.bos: int = C.llama_vocab_bos(self._vocab)
        self.architecture = self.metadata("general.architecture") or ""
        self.chat_template = self.metadata("tokenizer.chat_template")
        self.bos_text = self.token_text(self.bos) if self.bos >= 0 else ""
        eos = C.llama_vocab_eos(self._vocab)
        self.eos_text = self.token_text(eos) if eos >= 0 else ""
        self._piece_buf = ctypes.create_string_buffer(256)

    @property
    def handle(self) -> Any:
        return self._model

    @property
    def vocab(self) -> Any:
        return self._vocab

    @property
    def file_type(self) -> str | None:
        """The quantization, e.g. ``Q4_K_M`` (``None`` if the file does not say)."""
        raw = self.metadata("general.file_type")
        return _FILE_TYPES.get(int(raw)) if raw and raw.isdigit() else None

    def metadata(self, key: str) -> str | None:
        buf = ctypes.create_string_buffer(_META_BUF)
        n = C.llama_model_meta_val_str(self._model, key.encode(), buf, _META_BUF)
        if n < 0:
            return None
        if n >= _META_BUF:  # chat templates can be long: retry with the exact size
            buf = ctypes.create_string_buffer(n + 1)
            C.llama_model_meta_val_str(self._model, key.encode(), buf, n + 1)
        return buf.value.decode("utf-8", errors="replace")

    def tokenize(self, text: str, *, special: bool, add_bos: bool | None = None) -> list[int]:
        """Tokens for ``text``.

        ``special`` parses control-token text (``<start_of_turn>``) as control tokens;
        ``add_bos`` (default: same as ``special``) adds the model's BOS if it uses one.
        """
        bos = special if add_bos is None else add_bos
        data = text.encode("utf-8")
        capacity = len(data) + 8
        out = (C.llama_token * capacity)()
        n = C.llama_tokenize(self._vocab, data, len(data), out, capacity, bos, special)
        if n < 0:  # buffer too small: -n is the size needed
            capacity = -n
            out = (C.llama_token * capacity)()
            n = C.llama_tokenize(self._vocab, data, len(data), out, capacity, bos, special)
        tokens = list(out[:n])
        # A template that writes {{ bos_token }} plus add_special would double it.
        if bos and len(tokens) > 1 and tokens[0] == tokens[1] == self.bos:
            del tokens[0]
        return tokens

    def piece(self, token: int) -> bytes:
        """The bytes of one token, control tokens rendered as nothing."""
        n = C.llama_token_to_piece(self._vocab, token, self._piece_buf, 256, 0, False)
        return self._piece_buf.raw[:n] if n > 0 else b""

    def longest_token(self) -> int:
        """The most bytes any token stands for, control tokens' text included: a text of
        N bytes (so of at most N characters) is at least N / this many tokens long."""
        buf = ctypes.create_string_buffer(256)
        longest = 1
        for token in range(self.n_vocab):
            n = C.llama_token_to_piece(self._vocab, token, buf, 256, 0, True)
            longest = max(longest, abs(n))  # -n: the piece needs n bytes (> 256)
        return longest

    def token_text(self, token: int) -> str:
        buf = ctypes.create_string_buffer(256)
        n = C.llama_token_to_piece(self._vocab, token, buf, 256, 0, True)
        return buf.raw[: max(n, 0)].decode("utf-8", errors="replace")

    def special_token(self, text: str) -> int | None:
        """The one user-defined token spelled ``text`` (Qwen's ``<tool_call>``), if there
        is one. Control tokens are not: their text is never in the output (``piece``)."""
        tokens = self.tokenize(text, special=True, add_bos=False)
        if len(tokens) != 1:
            return None
        attr = C.llama_vocab_get_attr(self._vocab, tokens[0])
        return tokens[0] if attr & C.LLAMA_TOKEN_ATTR_USER_DEFINED else None

    def is_end_of_generation(self, token: int) -> bool:
        return bool(C.llama_vocab_is_eog(self._vocab, token))

    def close(self) -> None:
        if self._model:
            C.llama_model_free(self._model)
            self._model = None


@dataclass(frozen=True, slots=True)
class ContextConfig:
    n_ctx: int
    n_seq_max: int
    n_batch: int
    threads: int
    embeddings: bool = False
    swa_full: bool = True


class Batch:
    """A reusable ``llama_batch`` filled token by token."""

    def __init__(self, capacity: int, n_seq_max: int) -> None:
        self.capacity = capacity
        self._batch = C.llama_batch_init(capacity, 0, n_seq_max)

    def clear(self) -> None:
        self._batch.n_tokens = 0

    def __len__(self) -> int:
        return int(self._batch.n_tokens)

    def add(self, token: int, pos: int, seq_id: int, *, logits: bool) -> int:
        """Append one token; return its index (the row of its logits)."""
        b = self._batch
        i = int(b.n_tokens)
        b.token[i] = token
        b.pos[i] = pos
        b.n_seq_id[i] = 1
        b.seq_id[i][0] = seq_id
        b.logits[i] = logits
        b.n_tokens = i + 1
        return i

    @property
    def raw(self) -> Any:
        return self._batch

    def close(self) -> None:
        C.llama_batch_free(self._batch)


def context_params(config: ContextConfig) -> Any:
    """llama.cpp's parameters for a context of this configuration."""
    params = C.llama_context_default_params()
    params.n_ctx = config.n_ctx
    params.n_batch = config.n_batch
    params.n_ubatch = config.n_batch
    params.n_seq_max = config.n_seq_max
    params.n_threads = config.threads
    params.n_threads_batch = config.threads
    # One KV pool shared by all sequences: short requests leave room for long ones,
    # and a cell can belong to several sequences (shared prefixes).
    params.kv_unified = True
    # Sliding-window layers keep every position too, so that any cached prefix can be
    # shared, not only one within a window of the sharer's end (README: prefix cache).
    params.swa_full = config.swa_full
    params.no_perf = True
    if config.embeddings:
        params.embeddings = True
        params.pooling_type = C.LLAMA_POOLING_TYPE_MEAN
    return params


class LlamaContext:
    """One llama.cpp context: KV cache for ``n_seq_max`` sequences."""

    def __init__(self, model: LlamaModel, config: ContextConfig) -> None:
        self._ctx = C.llama_init_from_model(model.handle, context_params(config))
        if not self._ctx:
            raise RuntimeError("llama.cpp could not create a context (out of memory?)")
        self._memory = C.llama_get_memory(self._ctx)
        self._n_embd = model.n_embd

    @property
    def handle(self) -> Any:
        return self._ctx

    def decode(self, batch: Batch) -> None:
        rc = C.llama_decode(self._ctx, batch.raw)
        if rc != 0:
            raise RuntimeError(f"llama_decode failed with status {rc}")

    def forget(self, seq_id: int) -> None:
        """Free every KV cell of ``seq_id``."""
        C.llama_memory_seq_rm(self._memory, seq_id, -1, -1)

    def share(self, source: int, target: int, positions: int) -> None:
        """Give ``target`` the cells of ``source``'s positions below ``positions`` (the
        unified cache adds the id to those cells; nothing is copied)."""
        C.llama_memory_seq_cp(self._memory, source, target, 0, positions)

    def pooled_embedding(self, seq_id: int) -> list[float]:
        ptr = C.llama_get_embeddings_seq(self._ctx, seq_id)
        if not ptr:
            raise RuntimeError("llama.cpp returned no pooled embedding")
        vector = np.ctypeslib.as_array(ptr, shape=(self._n_embd,)).astype(np.float64)
        norm = float(np.linalg.norm(vector))
        # OpenAI's embeddings are unit length; cosine similarity is then a dot product.
        return (vector / norm if norm > 0 else vector).tolist()  # type: ignore[no-any-return]

    def close(self) -> None:
        if self._ctx:
            C.llama_free(self._ctx)
            self._ctx = None


class Sampler:
    """A per-sequence llama.cpp sampler chain.

    Order follows llama.cpp's common sampler: logit bias, penalties, then the
    truncations (top-k, top-p, min-p), temperature, and a seeded draw; a
    temperature of 0 means greedy.
    """

    def __init__(
        self,
        model: LlamaModel,
        *,
        temperature: float,
        top_k: int,
        top_p: float,
        min_p: float,
        seed: int | None,
        presence_penalty: float,
        frequency_penalty: float,
        repeat_penalty: float = 1.0,
        logit_bias: Mapping[int, float],
        constraint: Constraint | None = None,
        logprobs: int | None = None,
    ) -> None:
        chain = C.llama_sampler_chain_init(C.llama_sampler_chain_default_params())
        self._chain = chain
        self._constraint = constraint
        self._logprobs = logprobs
        self._n_vocab = model.n_vocab
        # After sample(), when logprobs were asked for: the token's and the top ones.
        self.last_logprobs: tuple[float, list[tuple[int, float]]] | None = None
        if logit_bias:
            arr = (C.llama_logit_bias * len(logit_bias))()
            for i, (token, bias) in enumerate(logit_bias.items()):
                arr[i] = C.llama_logit_bias(token, bias)
            C.llama_sampler_chain_add(
                chain, C.llama_sampler_init_logit_bias(model.n_vocab, len(logit_bias), arr)
            )
        if presence_penalty or frequency_penalty or repeat_penalty != 1.0:
            C.llama_sampler_chain_add(
                chain,
                C.llama_sampler_init_penalties(
                    model.n_vocab, 256, repeat_penalty, frequency_penalty, presence_penalty
                ),
            )
        if temperature <= 0.0:
            C.llama_sampler_chain_add(chain, C.llama_sampler_init_greedy())
            return
        if top_k > 0:
            C.llama_sampler_chain_add(chain, C.llama_sampler_init_top_k(top_k))
        if top_p < 1.0:
            C.llama_sampler_chain_add(chain, C.llama_sampler_init_top_p(top_p, 1))
        if min_p > 0.0:
            C.llama_sampler_chain_add(chain, C.llama_sampler_init_min_p(min_p, 1))
        C.llama_sampler_chain_add(chain, C.llama_sampler_init_temp(temperature))
        C.llama_sampler_chain_add(
            chain,
            C.llama_sampler_init_dist(C.LLAMA_DEFAULT_SEED if seed is None else seed % 2**32),
        )

    def sample(self, ctx: LlamaContext, index: int) -> int:
        """Sample from the logits at batch row ``index`` and record the choice."""
        constraint = self._constraint
        raw = None
        if self._logprobs is not None:  # the model's own distribution, before any mask
            logits = C.llama_get_logits_ith(ctx.handle, index)
            raw = np.ctypeslib.as_array(logits, (self._n_vocab,)).copy()
        if constraint is not None:  # forbidden tokens' logits to -inf, then as usual
            constraint.mask(ctx.handle, index)
        # llama_sampler_sample also calls accept(), which feeds the penalties.
        token = int(C.llama_sampler_sample(self._chain, ctx.handle, index))
        if constraint is not None:
            constraint.consume(token)
        if raw is not None:
            self.last_logprobs = log_probabilities(raw, token, self._logprobs or 0)
        return token

    def forced(self, limit: int) -> list[int]:
        """Up to ``limit`` tokens that must come next (a constraint allows nothing else),
        recorded as if sampled; none when logprobs are asked for, as those need logits."""
        if self._constraint is None or self._logprobs is not None:
            return []
        tokens = self._constraint.forced(limit)
        for token in tokens:
            C.llama_sampler_accept(self._chain, token)  # the penalties see them
        return tokens

    @property
    def finished(self) -> bool:
        """The constraint is complete, so only the end of generation could be sampled."""
        return self._constraint is not None and self._constraint.finished

    def close(self) -> None:
        if self._chain:
            C.llama_sampler_free(self._chain)
            self._chain = None


def log_probabilities(
    logits: np.ndarray[Any, Any], token: int, top: int
) -> tuple[float, list[tuple[int, float]]]:
    """``token``'s log probability under softmax(``logits``) and the ``top`` likeliest
    tokens' (likeliest first), computed in float64."""
    peak = float(logits.max())
    log_total = peak + math.log(float(np.exp(logits - peak, dtype=np.float64).sum()))
    best: list[tuple[int, float]] = []
    if top > 0:
        ids = np.argpartition(logits, -top)[-top:]
        ids = ids[np.argsort(-logits[ids], kind="stable")]
        best = [(int(i), float(logits[i]) - log_total) for i in ids]
    return float(logits[token]) - log_total, best


class Constraint(Protocol):
    """What limits a sequence's tokens (backends.llama.constraints.Constraint)."""

    def mask(self, ctx: Any, index: int) -> None: ...
    def consume(self, token: int) -> None: ...
    def forced(self, limit: int) -> list[int]: ...
    @property
    def finished(self) -> bool: ...
