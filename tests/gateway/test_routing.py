"""Placement policy, pure: no I/O, no backends."""

from __future__ import annotations

from collections import Counter

import pytest

from gateway.routing import InstanceState, expected_wait, place


def S(id: str, **kw: object) -> InstanceState:
    return InstanceState(id, **{"ready": True, "capacity": 4, **kw})  # type: ignore[arg-type]


def test_free_slots_start_at_once_and_a_queue_waits_for_the_drain() -> None:
    assert expected_wait(S("a", running=3)) == 0
    assert expected_wait(S("a", running=4, waiting=1, drain_per_second=2.0)) == 1.0
    assert expected_wait(S("a", running=4, engine_waiting=3, drain_per_second=2.0)) == 2.0
    # Before the pool has drained anything: a slot is assumed to take a second.
    assert expected_wait(S("a", running=4, waiting=3)) == 1.0


def test_least_expected_wait_wins() -> None:
    slow = S("slow", running=4, waiting=4, drain_per_second=1.0)  # 5 s
    fast = S("fast", running=4, waiting=4, drain_per_second=10.0)  # 0.5 s
    assert place([slow, fast]).index == 1
    assert place([fast, slow]).index == 0


def test_weights_split_requests_among_equals() -> None:
    stable, canary = S("stable", weight=90), S("canary", weight=10)
    picks = Counter(place([stable, canary], draw=d / 1000).index for d in range(1000))
    assert picks == {0: 900, 1: 100}
    assert place([stable, S("off", weight=0)], draw=0.99).index == 0  # weight 0 takes none


def test_not_ready_ejected_and_tried_instances_are_left_out() -> None:
    states = [S("a", ready=False), S("b", ejected=True), S("c", tried=True), S("d"), S("e")]
    assert {place(states, draw=d / 10).index for d in range(10)} == {3, 4}


def test_panic_a_tier_mostly_ejected_ignores_ejection() -> None:
    states = [S("a", ejected=True), S("b", ejected=True), S("c")]
    assert {place(states, draw=d / 10).index for d in range(10)} == {0, 1, 2}


def test_nothing_live_returns_the_first_ready_so_its_backend_says_why() -> None:
    assert place([S("a", ready=False), S("b", ready=False)]).index == 0
    assert place([S("a", ready=False), S("b", tried=True), S("c", ejected=True)]).index == 2


def test_spillover_when_the_primary_tier_waits_too_long() -> None:
    busy = S("gpu", running=4, waiting=8, drain_per_second=2.0)  # 4.5 s
    twin = S("cpu", tier=1)
    assert place([busy, twin], spill_after=2.0) == place([busy, twin], spill_after=2.0)
    spilled = place([busy, twin], spill_after=2.0)
    assert (spilled.index, spilled.spilled) == (1, True)
    assert place([busy, twin], spill_after=10.0).index == 0  # within the bound: stay
    assert place([S("gpu", running=1), twin], spill_after=0.0).index == 0  # no wait at all
    # A higher tier that is no sooner is no way out.
    slower = S("cpu", tier=1, running=4, waiting=40, drain_per_second=1.0)
    assert place([busy, slower], spill_after=2.0).index == 0


def test_a_primary_tier_with_nothing_healthy_spills_unless_the_tenant_forbids_it() -> None:
    states = [S("gpu", ready=False), S("cpu", tier=1)]
    assert (place(states).index, place(states).spilled) == (1, True)
    kept = place(states, spill=False)
    assert (kept.index, kept.spilled) == (0, False)  # its backend answers the 503
    busy = S("gpu", running=4, waiting=8, drain_per_second=2.0)
    assert place([busy, S("cpu", tier=1)], spill_after=1.0, spill=False).index == 0


@pytest.mark.parametrize("key", range(20))
def test_affinity_keeps_a_key_on_one_instance_while_its_load_is_bounded(key: int) -> None:
    states = [S("a"), S("b"), S("c")]
    home = place(states, key=key).index
    assert all(place(states, key=key, draw=d / 7).index == home for d in range(7))
    # Loaded well past the tier's mean, the key moves to its next choice, not anywhere.
    loaded = [S(s.id, running=4, waiting=12) if i == home else s for i, s in enumerate(states)]
    moved = place(loaded, key=key).index
    assert moved != home
    assert all(place(loaded, key=key, draw=d / 7).index == moved for d in range(7))


def test_affinity_spreads_keys_over_the_instances() -> None:
    states = [S("a"), S("b"), S("c")]
    spread = Counter(place(states, key=k).index for k in range(3000))
    assert all(800 < n < 1200 for n in spread.values()), spread
