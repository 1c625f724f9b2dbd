from __future__ import annotations

import pytest

from gateway.tenancy.keys import (
    KEY_LENGTH,
    bearer_token,
    display_prefix,
    key_hash,
    new_key,
    new_key_id,
    same_hash,
    well_formed,
)


def test_new_keys_are_random_prefixed_and_well_formed() -> None:
    keys = {new_key() for _ in range(100)}
    assert len(keys) == 100
    for key in keys:
        assert key.startswith("lg-")
        assert len(key) == KEY_LENGTH
        assert well_formed(key)
    assert new_key_id() != new_key_id()


def test_hash_is_stable_and_never_the_key() -> None:
    key = new_key()
    assert key_hash(key) == key_hash(key)
    assert key_hash(key).startswith("sha256:")
    assert key not in key_hash(key)
    assert key_hash(key) != key_hash(new_key())
    assert same_hash(key_hash(key), key_hash(key))
    assert not same_hash(key_hash(key), key_hash(new_key()))


@pytest.mark.parametrize(
    "candidate",
    [
        "",
        "lg-",
        "sk-" + "a" * 43,
        "lg-" + "a" * 42,
        "lg-" + "a" * 44,
        "lg-' OR '1'='1' --" + "a" * 26,  # SQL-shaped
        "lg-*\r\nFLUSHALL\r\n" + "a" * 30,  # Redis-protocol-shaped
        "lg-" + "a" * 42 + "\x00",
        "lg-" + "a" * (64 * 1024),
        "lg-" + "é" * 43,
    ],
)
def test_anything_not_shaped_like_a_key_is_refused(candidate: str) -> None:
    assert not well_formed(candidate)


@pytest.mark.parametrize(
    ("header", "token"),
    [
        (None, None),
        ("", None),
        ("Bearer", None),
        ("Bearer ", None),
        ("Basic abc", None),
        ("Bearer abc", "abc"),
        ("bearer  abc ", "abc"),
    ],
)
def test_bearer_token(header: str | None, token: str | None) -> None:
    assert bearer_token(header) == token


def test_display_prefix_is_short() -> None:
    key = new_key()
    assert key.startswith(display_prefix(key))
    assert len(display_prefix(key)) == 7
