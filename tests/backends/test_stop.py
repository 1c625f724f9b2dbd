from __future__ import annotations

import pytest

from backends.llama.stop import StopMatcher


def run(stops: tuple[str, ...], pieces: list[str]) -> tuple[str, bool]:
    matcher = StopMatcher(stops)
    out = []
    for piece in pieces:
        text, stopped = matcher.feed(piece)
        out.append(text)
        if stopped:
            return "".join(out), True
    return "".join(out) + matcher.flush(), False


def test_stop_split_across_pieces_is_cut_and_never_leaked() -> None:
    matcher = StopMatcher(("</end>",))
    emitted = [matcher.feed(p) for p in ["hello <", "/e", "nd> tail"]]
    assert emitted == [("hello ", False), ("", False), ("", True)]


def test_text_that_only_looked_like_a_stop_is_released() -> None:
    assert run(("STOP",), ["a ST", "ART b"]) == ("a START b", False)


def test_earliest_of_several_stops_wins() -> None:
    assert run(("xyz", "b"), ["aaxy", "zb"]) == ("aa", True)


def test_stop_inside_one_piece() -> None:
    assert run(("\n\n",), ["one\n\ntwo"]) == ("one", True)


def test_held_tail_is_released_when_the_stream_ends() -> None:
    assert run(("END",), ["the E"]) == ("the E", False)


@pytest.mark.parametrize("stops", [(), ("",)])
def test_no_stops_passes_everything_through(stops: tuple[str, ...]) -> None:
    assert run(stops, ["a", "b"]) == ("ab", False)


def test_multibyte_stop() -> None:
    assert run(("日本",), ["こんにちは日", "本語"]) == ("こんにちは", True)
