"""The prefix cache's bookkeeping alone: which holder a prompt shares, how cells are
counted and when cached prefixes are evicted (no model: llama.cpp calls are the engine's,
tested on the real model in tests/backends/test_engine_prefix.py)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from backends.llama.prefix_cache import (
    FOLLOW_MIN_TOKENS,
    IDLE_SHARE,
    MIN_SHARE_TOKENS,
    PrefixCache,
    Share,
    cells_held,
    common_prefix,
)

SYSTEM = list(range(1000, 1100))  # a 100-token shared system prompt


def best(cache: PrefixCache, prompt: list[int], scope: str = "") -> Share | None:
    """What a new sequence of ``prompt`` would share (asked as the engine asks)."""
    holder = cache.admit(99, prompt, scope, len(prompt) + 1)
    try:
        return cache.best(holder)
    finally:
        cache.release(holder, [])  # nothing decoded: nothing kept


def run_to_end(cache: PrefixCache, slot: int, prompt: list[int], out: list[int]) -> int | None:
    """Admit, prefill and finish one sequence; the id its cells are kept under."""
    holder = cache.admit(slot, prompt, "", len(prompt) + len(out))
    share = cache.best(holder)
    cache.begin(holder, share if share is not None and share.ready else None)
    cache.advance(holder, len(prompt) + len(out))
    keep, _ = cache.release(holder, prompt + out)
    return keep


@given(st.lists(st.integers(0, 3), max_size=40), st.lists(st.integers(0, 3), max_size=40))
def test_common_prefix_is_the_longest(a: list[int], b: list[int]) -> None:
    n = common_prefix(a, b)
    assert a[:n] == b[:n]
    assert n == min(len(a), len(b)) or a[n] != b[n]


def test_a_finished_sequence_is_shared_by_the_next_and_counted_once() -> None:
    cache = PrefixCache(capacity=10_000, cache_ids=range(16, 32))
    kept = run_to_end(cache, 0, [*SYSTEM, 1, 2], [7, 8])
    assert kept in range(16, 32) and cache.cached_cells == 104
    new = cache.admit(1, [*SYSTEM, 3, 4], "", 200)
    share = cache.best(new)
    assert share is not None and share.ready and share.tokens == 100
    cache.begin(new, share)
    cache.advance(new, 102)
    # The 100 shared cells once, the cached tail (2 prompt + 2 output), the new tail.
    assert cells_held([new, share.source]) == 100 + 4 + 2
    assert cache.hit_tokens == 100 and cache.queried_tokens == 102 + 102


def test_the_last_prompt_token_is_always_prefilled() -> None:
    cache = PrefixCache(capacity=10_000, cache_ids=range(16, 32))
    run_to_end(cache, 0, SYSTEM, [5])
    share = best(cache, list(SYSTEM), "")  # the very same prompt again
    assert share is not None and share.tokens == len(SYSTEM) - 1


def test_a_prompt_being_prefilled_is_waited_for_not_computed_twice() -> None:
    cache = PrefixCache(capacity=10_000, cache_ids=range(16, 32))
    first = cache.admit(0, [*SYSTEM, 1], "", 300)
    cache.begin(first, None)
    cache.advance(first, 10)  # one chunk in
    share = best(cache, [*SYSTEM, 2], "")
    assert share is not None and not share.ready and share.tokens == 100
    cache.advance(first, 100)
    assert share.ready
    # Barely longer than what is there now: not worth a wait.
    other = PrefixCache(capacity=10_000, cache_ids=range(16, 32))
    run_to_end(other, 0, SYSTEM[:70], [9])
    head = SYSTEM[: 70 + FOLLOW_MIN_TOKENS - 1]
    going = other.admit(1, [*head, 1], "", 300)
    other.begin(going, None)
    later = best(other, [*head, 2], "")
    assert later is not None and later.ready and later.tokens == 70


def test_scopes_never_share() -> None:
    cache = PrefixCache(capacity=10_000, cache_ids=range(16, 32))
    holder = cache.admit(0, [*SYSTEM, 1], "team-a", 200)
    cache.begin(holder, None)
    cache.advance(holder, 101)
    cache.release(holder, [*SYSTEM, 1])
    assert best(cache, [*SYSTEM, 2], "team-b") is None
    assert best(cache, [*SYSTEM, 2], "team-a") is not None


def test_reservations_evict_cached_prefixes_least_recently_used_first() -> None:
    cache = PrefixCache(capacity=8000, cache_ids=range(16, 32))
    a = run_to_end(cache, 0, [1] * 300, [])
    b = run_to_end(cache, 0, [2] * 300, [])
    assert cache.cached_cells == 600  # idle, within 8000 / 8
    # 7500 reserved + 600 cached > 8000: the older prefix goes, the newer fits.
    cache.admit(1, [3] * 400, "", 7500)
    assert cache.make_room() == [a]
    assert cache.cached_cells == 300
    cache.admit(2, [4] * 400, "", 500)  # 8000 reserved: nothing cached can stay
    assert cache.make_room() == [b]
    assert cache.cached_cells == 0


def test_a_prefix_of_a_newer_prefix_is_dropped_and_an_identical_one_not_kept() -> None:
    cache = PrefixCache(capacity=10_000, cache_ids=range(16, 32))
    turn1 = run_to_end(cache, 0, [*SYSTEM, 1], [2])
    turn2 = cache.admit(0, [*SYSTEM, 1, 2, 3], "", 300)
    share = cache.best(turn2)
    assert share is not None
    cache.begin(turn2, share)
    cache.advance(turn2, 105)
    kept, dropped = cache.release(turn2, [*SYSTEM, 1, 2, 3, 4, 5])
    assert dropped == [turn1] and kept is not None
    again = cache.admit(1, [*SYSTEM, 1, 2], "", 300)
    cache.begin(again, None)
    cache.advance(again, 102)
    assert cache.release(again, [*SYSTEM, 1, 2]) == (None, [])  # the cached one covers it


def test_when_ids_run_out_the_least_recently_used_is_replaced() -> None:
    cache = PrefixCache(capacity=10_000, cache_ids=range(16, 18))
    first = run_to_end(cache, 0, [1] * 100, [])
    run_to_end(cache, 0, [2] * 100, [])
    share = best(cache, [1] * 100 + [9])  # touching the first makes the second the oldest
    assert share is not None
    touched = cache.admit(1, [1] * 100 + [9], "", 200)
    cache.begin(touched, share)
    third = run_to_end(cache, 0, [3] * 100, [])
    assert third is not None and best(cache, [2] * 100 + [9]) is None
    assert best(cache, [1] * 100 + [8]) is not None and first is not None


def test_cells_only_cached_prefixes_hold_are_a_small_part_of_the_cache() -> None:
    cache = PrefixCache(capacity=8000, cache_ids=range(16, 48))
    for i in range(3):  # distinct prompts: nothing repeats
        run_to_end(cache, 0, [i] * 300, [])
    assert cache.cached_cells <= 8000 // IDLE_SHARE
    assert best(cache, [2] * 300 + [1]) is not None  # the newest stay
    for i in range(3, 40):  # ...and as nothing ever does, ever less stays idle
        run_to_end(cache, 0, [i] * 300, [])
    assert cache.cached_cells == 0
    # Cells a running sequence shares are not idle: a long shared prompt stays cached.
    running = cache.admit(1, [*SYSTEM * 12, 1], "", 1300)
    cache.begin(running, None)
    cache.advance(running, 1201)
    assert run_to_end(cache, 2, [*SYSTEM * 12, 2], []) is not None
    assert cache.cached_cells > 8000 // IDLE_SHARE


def test_a_sequence_that_waits_is_no_source_so_two_never_wait_for_each_other() -> None:
    cache = PrefixCache(capacity=10_000, cache_ids=range(16, 32))
    a = cache.admit(0, [*SYSTEM, 7], "", 300)
    cache.begin(a, None)
    cache.advance(a, 10)  # prefilling
    b = cache.admit(1, [*SYSTEM, *SYSTEM, 1], "", 300)
    waits = cache.best(b)
    assert waits is not None and waits.source is a and not waits.ready
    c = cache.admit(2, [*SYSTEM, *SYSTEM, 1, 2], "", 300)
    # b has the longer prefix in its prompt, but it has not begun: c waits for a too.
    share = cache.best(c)
    assert share is not None and share.source is a and share.tokens == 100


def test_without_ids_to_spare_nothing_is_kept_and_nothing_fails() -> None:
    cache = PrefixCache(capacity=10_000, cache_ids=range(0))  # max_sequences 256
    assert run_to_end(cache, 0, [*SYSTEM, 1], [2]) is None
    assert cache.cached_cells == 0


def test_one_prefix_too_large_to_keep_idle_leaves_the_others() -> None:
    cache = PrefixCache(capacity=8000, cache_ids=range(16, 48))
    small = [run_to_end(cache, 0, [i] * 100, []) for i in range(3)]
    assert None not in small
    assert run_to_end(cache, 0, [7] * 2000, []) is None  # idle, over 8000 / 8 on its own
    assert cache.cached_cells == 300


def test_a_few_common_tokens_are_not_shared() -> None:
    cache = PrefixCache(capacity=10_000, cache_ids=range(16, 32))
    run_to_end(cache, 0, [*SYSTEM[: MIN_SHARE_TOKENS - 1], 1], [2])
    assert best(cache, [*SYSTEM[: MIN_SHARE_TOKENS - 1], 3]) is None
