"""Tool formats: declaring tools, writing history, reading calls back as a stream."""

from __future__ import annotations

import json

import llguidance
import pytest

from backends.base import ChatMessage, InvalidRequestError, ToolCall
from backends.llama.tools import (
    HERMES,
    LLAMA3,
    MAX_PARALLEL_CALLS,
    ToolCallParser,
    ToolFormat,
    call_grammar,
    forced_tools,
    tool_format,
)

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
CLOCK = {"type": "function", "function": {"name": "get_time"}}


def read(fmt: ToolFormat, text: str, step: int, *, parallel: bool = True) -> tuple[str, list, list]:
    """Feed ``text`` in pieces of ``step`` characters; content, deltas and calls."""
    parser = ToolCallParser(fmt, parallel=parallel)
    content, deltas = [], []
    for i in range(0, len(text), step):
        said, more = parser.feed(text[i : i + step])
        content.append(said)
        deltas += more
    said, more = parser.finish()
    return "".join(content) + said, deltas + more, parser.calls


def joined(deltas: list) -> dict[int, tuple[str | None, str]]:
    """The deltas put back together, per call: (name, arguments)."""
    calls: dict[int, tuple[str | None, str]] = {}
    for d in deltas:
        name, args = calls.get(d.index, (None, ""))
        calls[d.index] = (d.name or name, args + d.arguments)
    return calls


HERMES_TWO = (
    'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Pa\\"ris}", '
    '"n": [1, {"a": 2}]}}\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}'
    "\n</tool_call>"
)


@pytest.mark.parametrize("step", [1, 2, 5, 1000])
def test_hermes_calls_stream_as_deltas_whatever_the_chunking(step: int) -> None:
    content, deltas, calls = read(HERMES, HERMES_TWO, step)
    assert content.strip() == "Let me look."
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [
        ("get_weather", {"city": 'Pa"ris}', "n": [1, {"a": 2}]}),
        ("get_time", {}),
    ]
    # OpenAI's order: the first delta of a call has its id and name, then arguments.
    firsts = [d for d in deltas if d.id is not None]
    assert [(d.index, d.name, d.arguments) for d in firsts] == [
        (0, "get_weather", ""),
        (1, "get_time", ""),
    ]
    assert [d.id for d in firsts] == [c.id for c in calls]
    assert joined(deltas) == {i: (c.name, c.arguments) for i, c in enumerate(calls)}


def test_only_the_first_call_without_parallel_calls() -> None:
    _, deltas, calls = read(HERMES, HERMES_TWO, 3, parallel=False)
    assert [c.name for c in calls] == ["get_weather"]
    assert {d.index for d in deltas} == {0}


def test_text_that_only_looks_like_a_marker_is_content() -> None:
    assert read(HERMES, "a <tool_ca", 1)[0] == "a <tool_ca"
    assert read(HERMES, "x < y and <tool>", 1)[0] == "x < y and <tool>"


def test_a_call_cut_by_max_tokens_keeps_what_was_produced() -> None:
    content, _, calls = read(HERMES, '<tool_call>\n{"name": "f", "arguments": {"a": 1', 1)
    assert content == ""
    assert [(c.name, c.arguments) for c in calls] == [("f", '{"a": 1')]


def test_arguments_before_the_name_are_still_read() -> None:
    text = '<tool_call>\n{"arguments": {"q": 1}, "name": "f"}\n</tool_call>'
    content, deltas, calls = read(HERMES, text, 4)
    assert content == ""
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("f", {"q": 1})]
    assert joined(deltas) == {0: ("f", '{"q": 1}')}


@pytest.mark.parametrize("step", [1, 7])
def test_llama3_a_call_is_the_whole_turn(step: int) -> None:
    content, _, calls = read(LLAMA3, ' {"name": "f", "parameters": {"q": "x"}}', step)
    assert content == ""
    assert [(c.name, json.loads(c.arguments)) for c in calls] == [("f", {"q": "x"})]
    # Prose, or JSON that is not a call, is content.
    assert read(LLAMA3, 'The answer is {"name": "f"}', step)[0] == 'The answer is {"name": "f"}'
    assert read(LLAMA3, '{"oops": 1} more', step) == ('{"oops": 1} more', [], [])


def test_prepare_declares_tools_and_writes_history() -> None:
    history = (
        ChatMessage("system", "Be brief."),
        ChatMessage("user", "Weather in Paris and Lima?"),
        ChatMessage(
            "assistant",
            "",
            tool_calls=(
                ToolCall("a", "get_weather", '{"city": "Paris"}'),
                ToolCall("b", "get_weather", '{"city": "Lima"}'),
            ),
        ),
        ChatMessage("tool", "18C", tool_call_id="a"),
        ChatMessage("tool", "25C", tool_call_id="b"),
    )
    turns = HERMES.prepare(history, [WEATHER])
    assert [m.role for m in turns] == ["system", "user", "assistant", "user"]
    assert turns[0].content.startswith("Be brief.\n\n# Tools")
    assert json.dumps(WEATHER) in turns[0].content
    assert turns[2].content == (
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>\n'
        '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Lima"}}\n</tool_call>'
    )
    # Answers to one turn's parallel calls share one user turn.
    assert turns[3].content == (
        "<tool_response>\n18C\n</tool_response>\n<tool_response>\n25C\n</tool_response>"
    )
    llama = LLAMA3.prepare(history, [])
    assert [m.role for m in llama] == ["system", "user", "assistant", "ipython", "ipython"]
    assert json.loads(llama[2].content.split("\n")[0]) == {
        "name": "get_weather",
        "parameters": {"city": "Paris"},
    }


def test_families_choose_their_format() -> None:
    assert tool_format("llama3") is LLAMA3
    assert tool_format("chatml") is HERMES
    assert tool_format("gemma") is HERMES


def test_forced_tools() -> None:
    assert forced_tools([WEATHER], "auto") is None
    assert forced_tools([WEATHER], None) is None
    assert forced_tools([WEATHER, CLOCK], "required") == [WEATHER, CLOCK]
    named = {"type": "function", "function": {"name": "get_time"}}
    assert forced_tools([WEATHER, CLOCK], named) == [CLOCK]
    for bad in ({"type": "function", "function": {"name": "nope"}}, {"type": "x"}):
        with pytest.raises(InvalidRequestError) as caught:
            forced_tools([WEATHER], bad)
        assert caught.value.param == "tool_choice"
    with pytest.raises(InvalidRequestError):
        forced_tools([], "required")


def _accepts(grammar: str, text: str) -> bool:
    """Whether the grammar derives exactly ``text`` (checked byte by byte, no tokenizer)."""
    tokenizer = llguidance.LLTokenizer("byte")  # llguidance's built-in byte tokenizer
    matcher = llguidance.LLMatcher(tokenizer, grammar, log_level=0)
    tokens = tokenizer.tokenize_str(text)
    return matcher.try_consume_tokens(tokens) == len(tokens) and matcher.is_accepting()


def test_the_call_grammar_admits_valid_calls_only() -> None:
    lark = call_grammar(HERMES, [WEATHER, CLOCK], parallel=True)
    grammar = llguidance.LLMatcher.grammar_from_lark(lark)
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'
    clock = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    assert _accepts(grammar, call)
    assert _accepts(grammar, call + "\n" + clock)
    assert not _accepts(grammar, "\n".join([call] * (MAX_PARALLEL_CALLS + 1)))
    assert not _accepts(grammar, call.replace("get_weather", "get_wether"))
    assert not _accepts(grammar, call.replace('{"city": "Oslo"}', "{}"))  # city is required
    single = llguidance.LLMatcher.grammar_from_lark(call_grammar(LLAMA3, [WEATHER], parallel=False))
    assert _accepts(single, '{"name": "get_weather", "parameters": {"city": "Oslo"}}')
    assert not _accepts(single, '{"name": "get_weather", "arguments": {"city": "Oslo"}}')


def test_calls_the_model_writes_loosely_are_still_read() -> None:
    # No newline after the marker; arguments that are not an object; a broken escape.
    tight = '<tool_call>{"name": "f", "arguments": {}}</tool_call>'
    assert [(c.name, c.arguments) for c in read(HERMES, tight, 3)[2]] == [("f", "{}")]
    _, _, calls = read(HERMES, '<tool_call>\n{"name": "f", "arguments": null}\n</tool_call>', 1)
    assert [(c.name, c.arguments) for c in calls] == [("f", "null")]
    content, _, calls = read(HERMES, '<tool_call>\n{"name": "f\\u12", "arguments": {}}', 1)
    assert calls == [] and "f\\u12" in content  # not a call (it is given as text), no crash


def test_a_reference_in_the_parameters_still_resolves() -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"u": {"$ref": "#/$defs/U"}}, "required": ["u"],
        "$defs": {"U": {"type": "string", "enum": ["a", "b"]}}}}}  # fmt: skip
    grammar = llguidance.LLMatcher.grammar_from_lark(call_grammar(LLAMA3, [tool], parallel=False))
    assert _accepts(grammar, '{"name": "f", "parameters": {"u": "a"}}')
    assert not _accepts(grammar, '{"name": "f", "parameters": {"u": "c"}}')


@pytest.mark.parametrize("step", [1, 4, 1000])
def test_keys_after_the_arguments_are_not_content(step: int) -> None:
    text = '<tool_call>\n{"name": "f", "arguments": {"a": 1}, "id": {"x": "}"}}\n</tool_call> ok'
    content, _, calls = read(HERMES, text, step)
    assert content.strip() == "ok"
    assert [(c.name, c.arguments) for c in calls] == [("f", '{"a": 1}')]
