"""What never reaches a log: keys and bearer tokens, and patterns a deployment names.

    redact = Redactor(settings.request_log.redact)
    redact("my key is lg-...")        # "my key is [REDACTED]"
    SECRETS.sub(REDACTED, path)      # the secrets alone (the access log)

The key patterns have no leading word boundary: in raw JSON a key after an escape
(``\\nlg-...``, ``\\u00e9lg-...``) or glued to a word must be caught too; redacting a
little more than a key is harmless. Every pattern is linear: a long text costs in
proportion to its length (the default e-mail pattern only starts where a run of
address characters starts, and bounds each part).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

REDACTED = "[REDACTED]"
_SECRET_PATTERNS = (
    r"[Bb][Ee][Aa][Rr][Ee][Rr]\s+[A-Za-z0-9._~+/=-]+",
    r"lg-[A-Za-z0-9_-]{8,}",  # Lockgate keys (gateway/tenancy/keys.py)
    r"sk-[A-Za-z0-9_-]{8,}",  # OpenAI-style keys
)
SECRETS = re.compile("|".join(f"(?:{p})" for p in _SECRET_PATTERNS))
# The longest secret worth catching whole when a text is cut (a bearer token, a key).
LONGEST_SECRET = 512


class Redactor:
    """Replaces every match of the secret and configured patterns in a string."""

    def __init__(self, patterns: Sequence[str] = ()) -> None:
        self._pattern = re.compile("|".join(f"(?:{p})" for p in (*_SECRET_PATTERNS, *patterns)))

    def __call__(self, text: str) -> str:
        return self._pattern.sub(REDACTED, text)

    def value(self, value: Any) -> Any:
        """``value`` with every string in it redacted (dicts, lists, nested)."""
        if isinstance(value, str):
            return self(value)
        if isinstance(value, dict):
            return {self(str(k)): self.value(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [self.value(v) for v in value]
        return value
