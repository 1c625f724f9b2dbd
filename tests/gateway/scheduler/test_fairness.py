from __future__ import annotations

from gateway.scheduler.fairness import FairQueue


def drain(queue: FairQueue) -> list[str]:
    out = []
    while (entry := queue.pop()) is not None:
        out.append(entry.id)
    return out


def test_interactive_goes_before_batch_whatever_the_counters() -> None:
    q = FairQueue()
    q.push("b1", tenant="heavy", weight=1, priority="batch")
    q.push("b2", tenant="light", weight=1, priority="batch")
    q.push("i1", tenant="heavy", weight=1, priority="interactive")
    q.charge("heavy", 10_000, weight=1)
    assert drain(q) == ["i1", "b2", "b1"]


def test_fifo_within_a_tenant() -> None:
    q = FairQueue()
    for i in range(5):
        q.push(f"a{i}", tenant="a", weight=1, priority="interactive")
    assert drain(q) == [f"a{i}" for i in range(5)]


def test_least_served_tenant_goes_first() -> None:
    q = FairQueue()
    q.push("a1", tenant="a", weight=1, priority="interactive")
    q.push("b1", tenant="b", weight=1, priority="interactive")
    q.charge("a", 500, weight=1)
    assert q.pop().id == "b1"  # type: ignore[union-attr]
    assert q.pop().id == "a1"  # type: ignore[union-attr]


def test_weights_scale_the_share() -> None:
    """Tenant b (weight 2) gets twice a's tokens while both stay backlogged."""
    q = FairQueue()
    served = {"a": 0, "b": 0}
    weights = {"a": 1.0, "b": 2.0}
    for i in range(300):
        q.push(f"a{i}", tenant="a", weight=1, priority="interactive")
        q.push(f"b{i}", tenant="b", weight=2, priority="interactive")
    for _ in range(300):
        entry = q.pop()
        assert entry is not None
        served[entry.tenant] += 10
        q.charge(entry.tenant, 10, weight=weights[entry.tenant])
    assert served["b"] / served["a"] == 2.0


def test_a_newly_active_tenant_is_lifted_to_the_waiting_minimum() -> None:
    q = FairQueue()
    q.push("a1", tenant="a", weight=1, priority="interactive")
    q.charge("a", 1000, weight=1)
    q.push("a2", tenant="a", weight=1, priority="interactive")
    # b was idle for all of that: it starts level with a, not 1000 tokens ahead of it
    q.push("b1", tenant="b", weight=1, priority="interactive")
    assert q.counter("b") == 1000
    assert q.pop().id == "a1"  # type: ignore[union-attr]  # a tie: the earlier arrival
    q.charge("a", 10, weight=1)
    assert drain(q) == ["b1", "a2"]


def test_idle_credit_is_not_banked_when_nobody_waits() -> None:
    q = FairQueue()
    q.push("a1", tenant="a", weight=1, priority="interactive")
    assert q.pop() is not None
    q.charge("a", 700, weight=1)
    q.push("b1", tenant="b", weight=1, priority="interactive")  # nobody waits: last served
    assert q.counter("b") == 700
    q.push("c1", tenant="c", weight=1, priority="interactive")
    assert q.counter("c") == 700


def test_remove_takes_an_entry_out_once() -> None:
    q = FairQueue()
    e1 = q.push("a1", tenant="a", weight=1, priority="interactive")
    q.push("a2", tenant="a", weight=1, priority="interactive")
    assert q.remove(e1)
    assert not q.remove(e1)
    assert len(q) == 1
    assert q.depth("interactive") == 1
    assert drain(q) == ["a2"]
    assert q.pop() is None
