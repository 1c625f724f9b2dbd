"""Outlier ejection on a fake clock: consecutive failures, growing ejections, half-open."""

from __future__ import annotations

from collections.abc import Mapping

from gateway.outliers import Outliers


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class SharedBoard:
    """Two replicas' boards over one dict, as Redis would hold it (tested for real in
    tests/integration/test_routing.py)."""

    def __init__(self, store: dict[str, tuple[float, int]]) -> None:
        self.store = store

    def publish(self, pool: str, until_wall: float, times: int) -> None:
        self.store[pool] = (until_wall, times)

    def ejections(self) -> Mapping[str, tuple[float, int]]:
        return self.store


TIER = ["m@a", "m@b"]


def outliers(clock: Clock, **kw: object) -> Outliers:
    return Outliers(eject_after=3, eject_seconds=30.0, clock=clock, wall=clock, **kw)  # type: ignore[arg-type]


def test_consecutive_failures_eject_and_a_success_resets_the_count() -> None:
    clock = Clock()
    o = outliers(clock)
    assert not o.failed("m@a", tier=TIER)
    assert not o.failed("m@a", tier=TIER)
    o.succeeded("m@a")
    assert not o.failed("m@a", tier=TIER) and not o.failed("m@a", tier=TIER)
    assert o.failed("m@a", tier=TIER)  # the third in a row
    assert o.state("m@a") == "ejected" and not o.takes_requests("m@a")


def test_ejection_grows_with_each_time_and_half_open_takes_one_trial() -> None:
    clock = Clock()
    o = outliers(clock)
    for _ in range(3):
        o.failed("m@a", tier=TIER)
    clock.now += 29.9
    assert o.state("m@a") == "ejected"
    clock.now += 0.2
    assert o.state("m@a") == "half_open" and o.takes_requests("m@a")
    o.placed("m@a")
    assert not o.takes_requests("m@a")  # one trial at a time
    assert o.failed("m@a", tier=TIER)  # the trial failed: out again, for longer
    clock.now += 59.9
    assert o.state("m@a") == "ejected"
    clock.now += 0.2
    o.placed("m@a")
    o.succeeded("m@a")
    assert o.state("m@a") == "healthy" and o.takes_requests("m@a")


def test_never_more_than_half_a_tier_and_never_a_lone_instance() -> None:
    clock = Clock()
    o = outliers(clock)
    tier = ["m@a", "m@b", "m@c", "m@d"]
    for pool in tier:
        for _ in range(3):
            o.failed(pool, tier=tier)
    assert [o.state(p) for p in tier].count("ejected") == 2
    alone = outliers(clock)
    for _ in range(10):
        assert not alone.failed("m@x", tier=["m@x"])


def test_failures_while_ejected_do_not_lengthen_it() -> None:
    clock = Clock()
    o = outliers(clock)
    for _ in range(3):
        o.failed("m@a", tier=TIER)
    for _ in range(10):  # requests placed before the ejection, failing late
        assert not o.failed("m@a", tier=TIER)
    clock.now += 30.1
    assert o.state("m@a") == "half_open"


def test_one_replicas_ejection_ejects_for_all() -> None:
    clock, store = Clock(), {}
    one = outliers(clock, board=SharedBoard(store))
    other = outliers(clock, board=SharedBoard(store))
    assert other.state("m@a") == "healthy"
    for _ in range(3):
        one.failed("m@a", tier=TIER)
    assert other.state("m@a") == "ejected"
    clock.now += 30.1
    assert other.state("m@a") == "half_open"


def test_a_trial_that_ends_saying_nothing_frees_the_next_request_to_be_one() -> None:
    clock = Clock()
    o = outliers(clock)
    for _ in range(3):
        o.failed("m@a", tier=TIER)
    clock.now += 30.1
    o.placed("m@a")
    assert not o.takes_requests("m@a")
    o.abandoned("m@a")  # a 4xx, a full queue, the client gone
    assert o.takes_requests("m@a")


def test_a_late_failure_does_not_re_eject_a_half_open_instance() -> None:
    clock = Clock()
    o = outliers(clock)
    for _ in range(3):
        o.failed("m@a", tier=TIER)
    clock.now += 30.1
    assert not o.failed("m@a", tier=TIER)  # placed before the ejection: no evidence
    assert o.state("m@a") == "half_open"


def test_a_shared_ejection_that_has_ended_is_not_applied_again() -> None:
    clock, store = Clock(), {}
    o = outliers(clock, board=SharedBoard(store))
    for _ in range(3):
        o.failed("m@a", tier=TIER)
    clock.now += 30.1  # the board still holds the ended entry (Redis unreachable, say)
    o.placed("m@a")
    o.succeeded("m@a")
    assert o.state("m@a") == "healthy"


def test_ejections_stop_growing_at_300_seconds() -> None:
    clock = Clock()
    o = outliers(clock)
    for _ in range(3):
        o.failed("m@a", tier=TIER)
    for _ in range(20):  # every trial fails
        clock.now += 301
        o.placed("m@a")
        o.failed("m@a", tier=TIER)
    clock.now += 299
    assert o.state("m@a") == "ejected"
    clock.now += 2
    assert o.state("m@a") == "half_open"
