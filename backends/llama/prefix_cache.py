"""Which KV cells a new sequence can share, and what shared and cached prefixes hold.

The engine keeps every sequence in one unified llama.cpp KV cache, where a cell can belong
to several sequence ids at once (``llama_memory_seq_cp`` adds an id to cells; nothing is
copied). A new prompt that starts with tokens another sequence has already decoded —
a running one, or a finished one kept here as a *cached prefix* — gets those cells and
prefills only the rest. A prompt that shares a prefix with a sequence still prefilling it
waits for that sequence instead of prefilling the same tokens a second time, so 16
requests that arrive together with one system prompt compute it once.

Bookkeeping only: no llama.cpp calls (the engine makes them). Used on the engine thread.

Memory. Each holder (a running sequence or a cached prefix) holds positions
``0..decoded-1``, as segments that each began in some sequence (an *origin*): a holder that
shared ``n`` tokens of another holds the other's segments clipped to ``n``, then its own.
Cells in use are, per origin, from its start to the furthest any holder reaches, so a
prefix shared by 16 sequences counts once. Cells only cached prefixes hold (*idle*) may be
1/8 of the cache at most, times the share of recent prompts found cached (idle cells slow
every step: traffic that does not repeat keeps almost none). Running sequences
reserve the cells they may still need (``max_len`` positions each); cached prefixes live
in what is left, and the least recently used is evicted whenever a new sequence's
reservation needs its room. As the engine's cache has room for every sequence's whole
context, evicting every cached prefix always makes room: cached prefixes never refuse a
request or take its room. (A sequence may wait for another that is computing its prefix,
never longer than computing the prefix itself would take.)
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field

# A prefix still being prefilled is worth waiting for when it is this much longer than
# what could be shared at once; shorter, the waiting step costs more than it saves.
FOLLOW_MIN_TOKENS = 16
# Shorter shares are not made: a chat template's opening saves little prefill, and the few
# cells it pins after their sequence ends, scattered, keep the range every step attends
# over wide (bench_prefix.py, "distinct").
MIN_SHARE_TOKENS = 64
# Cells that only cached prefixes hold (no running sequence shares them) may be at most
# this share of the cache, scaled by how much of recent prompts was found cached. Every
# cell in use widens the range each step attends over (llama.cpp attends over the used
# range, and scattered cached cells keep it wide): traffic that does not repeat itself
# keeps almost nothing idle (bench_prefix.py, "distinct"); cells a running sequence
# shares cost nothing more.
IDLE_SHARE = 8
REUSE_WINDOW = 16  # admissions the share found cached is averaged over (exponentially)


def common_prefix(a: list[int], b: list[int]) -> int:
    """The length of the longest common prefix of ``a`` and ``b``."""
    n = min(len(a), len(b))
    if a[:n] == b[:n]:
        return n
    lo, hi = 0, n  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


@dataclass(eq=False, slots=True)
class Holder:
    """The KV cells one sequence id holds: positions ``0..decoded-1`` of ``tokens``."""

    seq_id: int
    tokens: list[int]
    scope: str  # who may share: "" for everyone, or a tenant (prefix_cache: per_tenant)
    max_len: int = 0  # positions a running sequence may reach; 0 once cached
    decoded: int = 0  # 0 again once its cells are gone
    # (origin, start): segment i spans [start_i, start_i+1), the last one [start, decoded).
    segments: list[tuple[int, int]] = field(default_factory=list)
    running: bool = True
    tenant: str = ""  # whose sequence it was (what usage may tell of a share)


@dataclass(frozen=True, slots=True)
class Share:
    """Positions ``0..tokens-1`` of ``source``, which a new sequence can have."""

    source: Holder
    tokens: int

    @property
    def ready(self) -> bool:
        """Decoded (and still held): the sequence id can be copied now."""
        return self.source.decoded >= self.tokens


class PrefixCache:
    """Running sequences and cached prefixes of one engine, and the cells they hold.

    The engine, per new sequence: ``admit`` → ``best`` → ``begin`` (now, or once a
    pending share is ready) and copies the cells → ``make_room``; per decode step
    ``advance``; when it ends, ``release``. Every sequence id these return as evicted or
    dropped is the engine's to free.
    """

    def __init__(self, capacity: int, cache_ids: Iterable[int]) -> None:
        self.capacity = capacity  # KV cells (positions) in the engine's cache
        self._free_ids = sorted(cache_ids, reverse=True)
        self._cached: OrderedDict[int, Holder] = OrderedDict()  # least recently used first
        self._running: dict[int, Holder] = {}
        self._origins = itertools.count()
        # Read by metrics from other threads (single writer: the engine thread).
        self.hit_tokens = 0
        self.queried_tokens = 0
        self.cached_cells = 0  # cells cached prefixes hold (shared ones included)
        self._reuse = 1.0  # recent prompts' share found cached; optimistic when new

    def best(self, holder: Holder) -> Share | None:
        """The longest prefix of ``holder``'s prompt that another holder of its scope has
        decoded, or a running one will have once its prefill gets there (preferred only
        when clearly longer). One token at least is left to prefill: its logits are the
        first sample."""
        prompt, scope = holder.tokens, holder.scope
        limit = len(prompt) - 1
        ready: Share | None = None
        pending: Share | None = None
        for other in itertools.chain(self._running.values(), reversed(self._cached.values())):
            if other is holder or other.scope != scope or limit <= 0:
                continue
            n = min(common_prefix(prompt, other.tokens), limit)
            if n < MIN_SHARE_TOKENS:
                continue
            now = min(n, other.decoded)
            if now >= MIN_SHARE_TOKENS and (ready is None or now > ready.tokens):
                ready = Share(other, now)
            # Only one that has begun prefilling will get there: a sequence that waits
            # itself is no source (two could wait for each other).
            begun = other.running and bool(other.segments)
            if begun and n > now and (pending is None or n > pending.tokens):
                pending = Share(other, n)
        floor = (ready.tokens if ready else 0) + FOLLOW_MIN_TOKENS
        return pending if pending is not None and pending.tokens >= floor else ready

    def admit(
        self, seq_id: int, prompt: list[int], scope: str, max_len: int, tenant: str = ""
    ) -> Holder:
        """A new running sequence, holding nothing yet and reserving ``max_len`` cells."""
        self.queried_tokens += len(prompt)
        holder = Holder(seq_id, prompt, scope, max_len=max_len, tenant=tenant)
        self._running[seq_id] = holder
        return holder

    def begin(self, holder: Holder, share: Share | None) -> None:
        """``holder`` starts with ``share``'s cells (the engine copies the sequence id
        now) or none, and decodes the rest itself."""
        n = 0
        if share is not None:
            assert share.ready
            n = share.tokens
            holder.segments = [(o, s) for o, s in share.source.segments if s < n]
            self.hit_tokens += n
            if not share.source.running:
                self._cached.move_to_end(share.source.seq_id)
        holder.segments.append((next(self._origins), n))
        holder.decoded = n
        self._reuse += (n / max(1, len(holder.tokens)) - self._reuse) / REUSE_WINDOW

    def advance(self, holder: Holder, decoded: int) -> None:
        """``holder``'s positions up to ``decoded`` are in the cache."""
        holder.decoded = max(holder.decoded, decoded)

    def make_room(self) -> list[int]:
        """Evict cached prefixes, least recently used first, until what is held and what
        running sequences reserve fits; the evicted sequence ids. Always enough: running
        sequences' reservations alone fit the cache."""
        evicted: list[int] = []
        while self._cached and self._in_use() > self.capacity:
            evicted.append(self._drop(next(iter(self._cached))))
        return evicted

    def _in_use(self) -> int:
        reserved = sum(max(0, h.max_len - h.decoded) for h in self._running.values())
        held = cells_held(itertools.chain(self._running.values(), self._cached.values()))
        return held + reserved

    def release(self, holder: Holder, tokens: list[int]) -> tuple[int | None, list[int]]:
        """A running sequence ends; ``tokens`` are all it had (prompt, then output).
        Returns the id to keep its cells under as a cached prefix (None: free them) and
        the ids of cached prefixes dropped to make way (ones it makes redundant first)."""
        del self._running[holder.seq_id]
        holder.running, holder.max_len = False, 0
        holder.tokens = tokens[: holder.decoded]
        if holder.decoded == 0 or self._covered(holder):
            holder.decoded = 0
            return None, []
        dropped = [
            self._drop(seq_id)
            for seq_id, other in list(self._cached.items())
            if self._alike(other, holder) and other.tokens == holder.tokens[: len(other.tokens)]
        ]
        if not self._free_ids:
            if not self._cached:  # no id to keep anything under
                holder.decoded = 0
                return None, dropped
            dropped.append(self._drop(next(iter(self._cached))))
        holder.seq_id = self._free_ids.pop()
        self._cached[holder.seq_id] = holder
        dropped += self._limit_idle(holder)
        self.cached_cells = cells_held(self._cached.values())
        return (holder.seq_id if holder.seq_id in self._cached else None), dropped

    def _limit_idle(self, newest: Holder) -> list[int]:
        """Drop the least recently used prefixes while the cells only cached prefixes hold
        are over the limit; the newest, if over it alone, first."""
        limit = int(self.capacity / IDLE_SHARE * self._reuse)
        running = list(self._running.values())
        busy = cells_held(running)
        dropped: list[int] = []
        if cells_held([*running, newest]) - busy > limit:  # not at others' expense
            dropped.append(self._drop(newest.seq_id))
        while self._cached and cells_held([*running, *self._cached.values()]) - busy > limit:
            dropped.append(self._drop(next(iter(self._cached))))
        return dropped

    def _covered(self, holder: Holder) -> bool:
        """Another holder like it has decoded all of ``holder``'s tokens."""
        n = len(holder.tokens)
        return any(
            self._alike(other, holder) and other.decoded >= n and other.tokens[:n] == holder.tokens
            for other in itertools.chain(self._running.values(), self._cached.values())
        )

    @staticmethod
    def _alike(a: Holder, b: Holder) -> bool:
        """One can stand for the other: same scope, and same tenant (usage reports a share
        as cached only from the tenant's own tokens)."""
        return a.scope == b.scope and a.tenant == b.tenant

    def _drop(self, seq_id: int) -> int:
        holder = self._cached.pop(seq_id)
        holder.decoded = 0  # a sequence waiting on it now looks elsewhere
        self._free_ids.append(seq_id)
        self.cached_cells = cells_held(self._cached.values())
        return seq_id


def cells_held(holders: Iterable[Holder]) -> int:
    """Distinct cells the holders have between them: per origin, its furthest reach."""
    spans: dict[int, tuple[int, int]] = {}
    for holder in holders:
        segments = holder.segments
        for i, (origin, start) in enumerate(segments):
            end = segments[i + 1][1] if i + 1 < len(segments) else holder.decoded
            if end > start:
                known = spans.get(origin)
                if known is None or end > known[1]:
                    spans[origin] = (start, end)
    return sum(end - start for start, end in spans.values())
