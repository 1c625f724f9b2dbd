"""Output constraints for the embedded engine: ``response_format`` → a token mask per step.

    constraints = Constraints(model)
    matcher = await constraints.matcher(ResponseFormat("json_schema", schema={...}))
    constraint = constraints.constraint(matcher)          # one per sequence
    constraint.mask(ctx, index); token = sample(...); constraint.consume(token)

llguidance (PyPI ``llguidance``) compiles the schema and computes, for each step, the set
of tokens that keep the output valid; the logits of every other token are set to -inf
before the sequence's own sampler runs, so sampling, penalties and seeds work as usual.
Chosen by measurement over llama.cpp's GBNF sampler (loadtests/bench_structured.py and
the README): one stream of the default model kept 99% of its unconstrained speed under
a 4-field schema (0.7-1 ms of masking a token) against 68% for GBNF, whose masks over a
262k-token vocabulary cost more than the decode whenever its first choice is refused.

What llguidance cannot enforce (``uniqueItems``, ``not``...) is a 400 naming it when the
request says ``strict: true``; otherwise it is ignored (OpenAI's best effort). A schema
nesting deeper than :data:`MAX_SCHEMA_DEPTH` or larger than :data:`MAX_SCHEMA_BYTES` is
refused before compiling (deep nesting crashed llama.cpp's converter: #18988, #26600).
Compiled grammars are cached by the schema's canonical JSON and copied per request.
"""

from __future__ import annotations

import asyncio
import json
import threading
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import llama_cpp as C
import llguidance
import numpy as np
from llguidance.llamacpp import lltokenizer_from_vocab

from backends.base import InvalidRequestError, ResponseFormat
from backends.llama.native import LlamaModel

Matcher = llguidance.LLMatcher  # one sequence's grammar state

MAX_SCHEMA_BYTES = 64 * 1024
MAX_SCHEMA_DEPTH = 24
_CACHE_SIZE = 128
# Standard JSON spacing and nothing else: a base model left free pads with newlines.
_JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


def _depth(node: Any, level: int = 0) -> int:
    if level > MAX_SCHEMA_DEPTH:
        return level
    if isinstance(node, Mapping):
        return max((_depth(v, level + 1) for v in node.values()), default=level)
    if isinstance(node, list):
        return max((_depth(v, level + 1) for v in node), default=level)
    return level


def _refuse(message: str, param: str = "response_format") -> InvalidRequestError:
    return InvalidRequestError(f"{param}: {message}", param=param)


def check_schema(schema: Any, *, param: str = "response_format") -> str:
    """The schema's canonical JSON, once it is known to be within the size and depth limits."""
    if not isinstance(schema, Mapping):
        raise _refuse("a JSON Schema must be an object", param)
    key = json.dumps(schema, sort_keys=True, separators=(",", ":"))
    if len(key) > MAX_SCHEMA_BYTES:
        raise _refuse(f"the schema is over {MAX_SCHEMA_BYTES // 1024} KiB", param)
    if _depth(schema) > MAX_SCHEMA_DEPTH:
        raise _refuse(f"the schema nests deeper than {MAX_SCHEMA_DEPTH} levels", param)
    return key


class Constraints:
    """Compiles formats into matchers for one model's vocabulary."""

    def __init__(self, model: LlamaModel) -> None:
        self._model = model
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._table = _spread_table()

    def constraint(self, matcher: llguidance.LLMatcher) -> Constraint:
        """The per-sequence constraint that applies ``matcher`` to the logits."""
        return Constraint(matcher, self._model.n_vocab, self._table)

    def _tokenizer_now(self) -> llguidance.LLTokenizer:
        with self._lock:  # built once, ~1.5 s over 262k tokens: in a thread, on first use
            if self._tokenizer is None:
                with warnings.catch_warnings():
                    # llguidance 1.9's bridge calls llama-cpp-python's deprecated
                    # llama_token_get_attr alias; the call itself is sound.
                    warnings.simplefilter("ignore", DeprecationWarning)
                    self._tokenizer = lltokenizer_from_vocab(
                        self._model.vocab, eos_token=C.llama_vocab_eos(self._model.vocab)
                    )
            return self._tokenizer

    @staticmethod
    def _key(fmt: ResponseFormat) -> str:
        if fmt.kind == "json_object":
            return '{"type":"object"}'
        if not isinstance(fmt.schema, Mapping):
            raise _refuse("json_schema.schema must be a JSON Schema object")
        return ("strict:" if fmt.strict else "") + check_schema(fmt.schema)

    def _grammar(self, key: str) -> tuple[str, str]:
        """(llguidance grammar, the request field it came from) for a cache key."""
        if key.startswith("lark:"):
            return llguidance.LLMatcher.grammar_from_lark(key.removeprefix("lark:")), "tools"
        strict = key.startswith("strict:")
        schema = key.removeprefix("strict:")
        options = {**_JSON_OPTIONS, "lenient": not strict}
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, overrides=options)  # type: ignore[arg-type]
        return grammar, "response_format"

    def _compile(self, key: str) -> llguidance.LLMatcher:
        grammar, param = self._grammar(key)
        failed, messages = llguidance.LLMatcher.validate_grammar_with_warnings(
            grammar, self._tokenizer_now()
        )
        if failed:
            said = "; ".join(messages)[:400]
            hint = " (send strict: false for best effort)" if "Unimplemented" in said else ""
            raise _refuse(f"this JSON Schema cannot be enforced: {said}{hint}", param)
        return llguidance.LLMatcher(self._tokenizer_now(), grammar, log_level=0)

    async def matcher(self, fmt: ResponseFormat) -> llguidance.LLMatcher:
        """A fresh matcher for one sequence; ``InvalidRequestError`` for what cannot be."""
        return await self._matcher(self._key(fmt))

    async def grammar_matcher(self, lark: str) -> llguidance.LLMatcher:
        """The same for a Lark grammar (forced tool calls), whose schemas came in ``tools``."""
        return await self._matcher("lark:" + lark)

    async def _matcher(self, key: str) -> llguidance.LLMatcher:
        found = self._cache.get(key)
        if found is None:
            found = await asyncio.to_thread(self._compile, key)  # never on the loop
            self._cache[key] = found
            if len(self._cache) > _CACHE_SIZE:
                self._cache.popitem(last=False)
        else:
            self._cache.move_to_end(key)
        return found.deep_copy()


def _spread_table() -> np.ndarray[Any, Any]:
    """Row ``b``: what to add to 8 logits whose allow-bits are byte ``b`` (0 or -inf)."""
    bits = np.unpackbits(np.arange(256, dtype=np.uint8)[:, None], axis=1, bitorder="little")
    return np.where(bits == 1, 0.0, -np.inf).astype(np.float32)


class Constraint:
    """One sequence's matcher and mask buffers; used on the engine thread only.

    The mask (one bit per token) becomes an addend of 0 or -inf per logit by a table
    lookup per mask byte, then one in-place add: 0.2 ms over Gemma's 262k tokens, where
    unpacking the bits and assigning through a boolean index took 1.1 ms.
    """

    def __init__(
        self, matcher: llguidance.LLMatcher, n_vocab: int, table: np.ndarray[Any, Any]
    ) -> None:
        self._matcher = matcher
        self._n_vocab = n_vocab
        self._mask = np.full(((n_vocab + 31) // 32,), -1, dtype=np.int32)
        self._spread = np.empty((self._mask.nbytes, 8), dtype=np.float32)
        self._table = table  # _spread_table(), shared

    def mask(self, ctx: Any, index: int) -> None:
        """Set the logits of every token the format forbids now to -inf."""
        self._matcher.unsafe_compute_mask_ptr(self._mask.ctypes.data, self._mask.nbytes)
        logits = np.ctypeslib.as_array(C.llama_get_logits_ith(ctx, index), (self._n_vocab,))
        np.take(self._table, self._mask.view(np.uint8), axis=0, out=self._spread)
        np.add(logits, self._spread.reshape(-1)[: self._n_vocab], out=logits)

    def consume(self, token: int) -> None:
        self._matcher.consume_token(token)

    def forced(self, limit: int) -> list[int]:
        """Up to ``limit`` tokens the format allows no alternative to, now consumed."""
        if limit <= 0:
            return []
        tokens = self._matcher.compute_ff_tokens()[:limit]
        if tokens:
            self._matcher.consume_tokens(tokens)
        return tokens

    @property
    def finished(self) -> bool:
        """The format is complete: nothing but the end of the output may follow."""
        return self._matcher.is_stopped()
