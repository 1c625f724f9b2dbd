"""Placement policy, pure: no I/O, no backends."""

from __future__ import annotations

from gateway.routing import InstanceState, place


def test_the_first_ready_instance_in_configured_order_is_chosen() -> None:
    states = [InstanceState("a", ready=False), InstanceState("b", True), InstanceState("c", True)]
    assert place(states) == 1


def test_with_none_ready_the_first_is_chosen_so_its_backend_says_why() -> None:
    assert place([InstanceState("a", ready=False), InstanceState("b", ready=False)]) == 0


def test_a_lone_instance_is_chosen_whatever_its_load() -> None:
    assert place([InstanceState("a", True, running=4, capacity=4, waiting=9)]) == 0
