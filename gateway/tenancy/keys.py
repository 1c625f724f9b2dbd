"""API keys: ``lg-`` plus 256 random bits, stored and looked up only by their SHA-256.

A key is high-entropy, so a plain (unsalted) hash is enough to make a stolen
database useless, and it lets a key be found by an indexed lookup rather than
by comparing against every stored key. Anything that is not shaped like a key
is refused before it reaches a store, so no input of an attacker's choosing
becomes part of a query (CVE-2026-42208 in LiteLLM's key lookup).

    key = new_key()          # shown once
    digest = key_hash(key)   # kept
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets

PREFIX = "lg-"
_SECRET_CHARS = 43  # token_urlsafe(32)
KEY_LENGTH = len(PREFIX) + _SECRET_CHARS
_SHAPE = re.compile(r"lg-[A-Za-z0-9_-]{43}")


def new_key() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def new_key_id() -> str:
    return "key_" + secrets.token_hex(8)


def key_hash(key: str) -> str:
    return "sha256:" + hashlib.sha256(key.encode()).hexdigest()


def well_formed(key: str) -> bool:
    # The length check first: a 64 KB header costs nothing.
    return len(key) == KEY_LENGTH and _SHAPE.fullmatch(key) is not None


def same_hash(a: str, b: str) -> bool:
    """Constant-time comparison (vLLM CVE-2025-59425 was a timing oracle on ``==``)."""
    return hmac.compare_digest(a.encode(), b.encode())


def display_prefix(key: str) -> str:
    return key[: len(PREFIX) + 4]


def bearer_token(header: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, else None."""
    if not header:
        return None
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer":
        return None
    return token.strip() or None
