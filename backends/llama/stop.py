"""Stop-string matching over a stream of text pieces.

Token boundaries do not respect stop strings: ``"END"`` may arrive as ``"E"``
then ``"ND"``. :class:`StopMatcher` holds back exactly the tail that could
still grow into a stop string, so no partial stop string ever reaches the
client, and releases it as soon as it cannot.

    >>> m = StopMatcher(("END",))
    >>> m.feed("hello E"), m.feed("ND more")
    (('hello ', False), ('', True))
"""

from __future__ import annotations


class StopMatcher:
    __slots__ = ("_held", "_longest", "_stops")

    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._longest = max((len(s) for s in self._stops), default=0)
        self._held = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """Add ``piece``; return ``(text safe to emit, stopped)``.

        Once stopped, the text after the stop string is dropped.
        """
        if not self._stops:
            return piece, False
        text = self._held + piece
        cut = min((i for s in self._stops if (i := text.find(s)) != -1), default=-1)
        if cut != -1:
            self._held = ""
            return text[:cut], True
        keep = self._partial_suffix(text)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """Release what was held back (the stream ended without a stop)."""
        held, self._held = self._held, ""
        return held

    def _partial_suffix(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a stop."""
        for n in range(min(len(text), self._longest - 1), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self._stops):
                return n
        return 0
