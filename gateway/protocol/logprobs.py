"""OpenAI's two ``logprobs`` shapes: chat's list of entries, the legacy completions' lists."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from backends.base import TokenLogprob


def chat_logprobs(tokens: Sequence[TokenLogprob]) -> dict[str, Any]:
    """Chat's ``logprobs``: one entry per token, its alternatives likeliest first."""
    return {
        "content": [
            {
                "token": t.token,
                "logprob": t.logprob,
                "bytes": list(t.raw),
                "top_logprobs": [
                    {"token": a, "logprob": lp, "bytes": list(b)} for a, b, lp in t.top
                ],
            }
            for t in tokens
        ],
        "refusal": None,
    }


def text_logprobs(tokens: Sequence[TokenLogprob], offset: int = 0) -> dict[str, Any]:
    """The legacy completions' ``logprobs``: parallel lists; ``text_offset`` in characters
    from the start of the choice's text (``offset``: the characters before these tokens)."""
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t.token)
    return {
        "tokens": [t.token for t in tokens],
        "token_logprobs": [t.logprob for t in tokens],
        "top_logprobs": [{a: lp for a, _, lp in t.top} for t in tokens],
        "text_offset": offsets,
    }
