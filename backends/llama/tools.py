"""Tool calls in the embedded engine: how a prompt declares tools, how output is read back.

A family's *tool format* says how declared functions are put in the prompt, how a
call is written, and how a tool's answer comes back:

* ``hermes`` (Qwen 2/2.5/3 and other chatml models; also used for Gemma, which has no
  format of its own): a ``# Tools`` block with one JSON signature per line in the system
  turn; a call is ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>``; an
  answer is a user turn of ``<tool_response>`` blocks.
* ``llama3`` (Llama 3.1's JSON calls): the signatures in the system turn; a call is the
  whole assistant turn ``{"name": ..., "parameters": {...}}``; an answer is an
  ``ipython`` turn.

Tools, calls and answers are rendered as message *text* before the chat template runs,
so none of it is parsed for control tokens (a tool description cannot end a turn).

:class:`ToolCallParser` reads the model's text as it streams: prose passes through as
content; a call becomes OpenAI's stream of deltas (id and name first, then pieces of the
arguments). :func:`call_grammar` writes the Lark grammar (llguidance, JSON Schema inside)
that makes ``tool_choice: "required"`` or a named function a valid call every time.
"""

from __future__ import annotations

import json
import re
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from backends.base import ChatMessage, InvalidRequestError, ToolCall, ToolCallDelta

# Calls one forced turn may make: a base model, once calling, tends to call on and on.
MAX_PARALLEL_CALLS = 4
# The one JSON style of constrained output (as for response_format): standard spacing.
_JSON_STYLE = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclass(frozen=True, slots=True)
class ToolFormat:
    name: str
    open_parts: tuple[str, ...]  # before a call's JSON (none: the JSON opens the turn)
    close_parts: tuple[str, ...]  # after it
    separator: str  # between parallel calls
    arguments_key: str
    preamble: str  # the system text before the signatures
    postamble: str  # after them

    @property
    def open(self) -> str:
        return "".join(self.open_parts)

    @property
    def close(self) -> str:
        return "".join(self.close_parts)

    @property
    def markers(self) -> tuple[str, ...]:
        """The texts that may be one special token in a vocabulary (Qwen's <tool_call>)."""
        return tuple(p for p in self.open_parts + self.close_parts if p.strip())

    def declare(self, tools: Sequence[Mapping[str, Any]]) -> str:
        lines = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        return self.preamble + lines + self.postamble

    def call_text(self, call: ToolCall) -> str:
        try:
            arguments: Any = json.loads(call.arguments)
        except ValueError:
            arguments = call.arguments  # history is the client's; keep it as it was sent
        body = {"name": call.name, self.arguments_key: arguments}
        return self.open + json.dumps(body, ensure_ascii=False) + self.close

    def prepare(
        self, messages: Sequence[ChatMessage], tools: Sequence[Mapping[str, Any]]
    ) -> tuple[ChatMessage, ...]:
        """The conversation with tools declared, calls written out and answers wrapped,
        as plain messages any chat template renders."""
        out: list[ChatMessage] = []
        for m in messages:
            if m.role == "assistant" and m.tool_calls:
                calls = self.separator.join(self.call_text(c) for c in m.tool_calls)
                text = f"{m.content}\n{calls}" if m.content else calls
                out.append(ChatMessage("assistant", text))
            elif m.role == "tool":
                out.extend(self._answer(out, m.content))
            else:
                out.append(ChatMessage(m.role, m.content))
        if tools:
            block = self.declare(tools)
            if out and out[0].role == "system":
                out[0] = ChatMessage("system", f"{out[0].content}\n\n{block}")
            else:
                out.insert(0, ChatMessage("system", block))
        return tuple(out)

    def _answer(self, out: list[ChatMessage], content: str) -> list[ChatMessage]:
        if self.name == "llama3":
            return [ChatMessage("ipython", content)]
        wrapped = f"<tool_response>\n{content}\n</tool_response>"
        if out and out[-1].role == "user" and out[-1].content.startswith("<tool_response>"):
            # Answers to one turn's parallel calls share a user turn.
            out[-1] = ChatMessage("user", f"{out[-1].content}\n{wrapped}")
            return []
        return [ChatMessage("user", wrapped)]


HERMES = ToolFormat(
    name="hermes",
    open_parts=("<tool_call>", "\n"),
    close_parts=("\n", "</tool_call>"),
    separator="\n",
    arguments_key="arguments",
    preamble=(
        "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    ),
    postamble=(
        "\n</tools>\n\nFor each function call, return a json object with function name and "
        "arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
    ),
)
LLAMA3 = ToolFormat(
    name="llama3",
    open_parts=(),
    close_parts=(),
    separator="\n",
    arguments_key="parameters",
    preamble=(
        "You have access to the functions below. To call one, answer only with JSON of the "
        'form {"name": function name, "parameters": dictionary of argument name and its '
        "value}. Do not use variables.\n\n"
    ),
    postamble="",
)
_BY_TEMPLATE = {"llama3": LLAMA3, "chatml": HERMES, "gemma": HERMES}


def tool_format(template_family: str) -> ToolFormat:
    """The tool format of a built-in template family (gemma, llama3, chatml)."""
    return _BY_TEMPLATE.get(template_family, HERMES)


def uses_tools(messages: Sequence[ChatMessage]) -> bool:
    """Whether the history holds calls or answers that need the tool format."""
    return any(m.tool_calls or m.role == "tool" for m in messages)


# -- choice and grammar -----------------------------------------------------------


def _bad(message: str, param: str = "tool_choice") -> InvalidRequestError:
    return InvalidRequestError(message, param=param)


def forced_tools(
    tools: Sequence[Mapping[str, Any]], choice: str | Mapping[str, Any] | None
) -> list[Mapping[str, Any]] | None:
    """The functions decoding must call (``required``: any; a named one: that one), or
    ``None`` when the model is free (``auto``, ``none``)."""
    if choice is None or choice in ("auto", "none"):
        return None
    if not tools:
        raise _bad("tool_choice needs tools to choose from")
    if choice == "required":
        return list(tools)
    if not isinstance(choice, Mapping):
        raise _bad("tool_choice must be none, auto, required or a named function")
    function = choice.get("function")
    name = function.get("name") if isinstance(function, Mapping) else None
    if choice.get("type") != "function" or not isinstance(name, str):
        raise _bad('a named tool_choice is {"type": "function", "function": {"name": ...}}')
    named = [t for t in tools if t["function"]["name"] == name]
    if not named:
        raise _bad(f"tool_choice names {name!r}, which is not among the tools")
    return named


def call_schema(tool: Mapping[str, Any], arguments_key: str = "arguments") -> dict[str, Any]:
    """The JSON Schema of one call to ``tool``: its name, then arguments of its schema."""
    function = tool["function"]
    parameters = dict(function.get("parameters") or {"type": "object"})
    # References are root-relative ("#/$defs/X"): the definitions move up to the new root.
    hoisted = {k: parameters.pop(k) for k in ("$defs", "definitions") if k in parameters}
    return {
        "type": "object",
        "properties": {"name": {"const": function["name"]}, arguments_key: parameters},
        "required": ["name", arguments_key],
        "additionalProperties": False,
        **hoisted,
    }


def read_forced_call(text: str) -> ToolCall | None:
    """A forced call answered as JSON text (``{"name", "arguments"}``), if it is one."""
    try:
        body = json.loads(text)
    except ValueError:
        return None
    if not isinstance(body, dict) or not isinstance(body.get("name"), str):
        return None
    arguments = body.get("arguments", body.get("parameters", {}))
    args = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return ToolCall(f"call_{secrets.token_hex(12)}", body["name"], args)


def call_grammar(
    fmt: ToolFormat,
    tools: Sequence[Mapping[str, Any]],
    *,
    parallel: bool,
    special: Mapping[str, int] | None = None,
) -> str:
    """A Lark grammar (llguidance's dialect) of one call, or of calls, to ``tools``.

    ``special`` maps the format's markers that are one special token of the vocabulary
    to that token: the grammar must then name the token, not spell its text."""
    special = special or {}

    def piece(text: str) -> str:
        return f"<[{special[text]}]>" if text in special else json.dumps(text)

    rules = []
    for i, tool in enumerate(tools):
        schema = {
            **call_schema(tool, fmt.arguments_key),
            "x-guidance": {**_JSON_STYLE, "lenient": not tool["function"].get("strict")},
        }
        rules.append(f"fn{i}: %json {json.dumps(schema)}")
    wrap = " ".join([*map(piece, fmt.open_parts), "body", *map(piece, fmt.close_parts)])
    more = f"{{0,{MAX_PARALLEL_CALLS - 1}}}"
    start = f"call ({json.dumps(fmt.separator)} call){more}" if parallel else "call"
    body = " | ".join(f"fn{i}" for i in range(len(tools)))
    return "\n".join([f"start: {start}", f"call: {wrap}", f"body: {body}", *rules])


# -- reading calls back -------------------------------------------------------------

_HEADER = re.compile(
    r'\s*\{\s*"name"\s*:\s*"((?:[^"\\]|\\.)*)"\s*,\s*"(?:arguments|parameters)"\s*:\s*'
)


class _ValueScanner:
    """Finds where a JSON value (object, array or string) ends, over text fed in pieces."""

    __slots__ = ("depth", "escaped", "in_string")

    def __init__(self) -> None:
        self.depth, self.in_string, self.escaped = 0, False, False

    def end(self, text: str, start: int = 0) -> int | None:
        """The end of the value in ``text`` (after ``start``), or None: it goes on."""
        for i in range(start, len(text)):
            ch = text[i]
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif ch == "\\":
                    self.escaped = True
                elif ch == '"':
                    self.in_string = False
                    if self.depth == 0:
                        return i + 1
            elif ch == '"':
                self.in_string = True
            elif ch in "{[":
                self.depth += 1
            elif ch in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return i + 1
                if self.depth < 0:  # a bare number or literal, ended by its object's "}"
                    return i
        return None


def _value_end(text: str, start: int = 0) -> int | None:
    return _ValueScanner().end(text, start)


def _held_prefix(text: str, marker: str) -> int:
    """How many trailing characters of ``text`` may be the start of ``marker``."""
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0


class ToolCallParser:
    """Splits a stream of model text into content and tool-call deltas.

    ``feed`` takes each new piece of text and returns the content to pass on and the
    deltas produced; ``finish`` flushes what is held. ``calls`` holds the whole calls.
    With ``parallel`` false, text after the first call is dropped.
    """

    def __init__(self, fmt: ToolFormat, *, parallel: bool = True) -> None:
        self._fmt = fmt
        self._parallel = parallel
        self._state = "text"  # text | call | args | tail | plain | done
        self._buf = ""
        self._said = False  # any content passed on yet
        self.calls: list[ToolCall] = []
        self._id = self._name = self._args = ""
        self._scanner = _ValueScanner()

    def feed(self, text: str) -> tuple[str, list[ToolCallDelta]]:
        self._buf += text
        content: list[str] = []
        deltas: list[ToolCallDelta] = []
        while self._step(content, deltas):
            pass
        said = "".join(content)
        self._said = self._said or bool(said.strip())
        return said, deltas

    def finish(self) -> tuple[str, list[ToolCallDelta]]:
        content, deltas = self.feed("")
        buf, self._buf = self._buf, ""
        if self._state == "call":
            whole = self._whole_call(buf.strip().removesuffix(self._fmt.close.strip()))
            if whole is not None:
                deltas += self._emit_whole(*whole)
                self._record()
            elif not self._fmt.open:  # bare JSON cut short: it may have been prose
                content += buf
            # else: text after a call marker is never content, even cut short.
        elif self._state in ("args", "tail"):
            if self._state == "args" and buf:
                self._args += buf
                deltas.append(ToolCallDelta(len(self.calls), buf))
            self._record()  # cut short (max_tokens): what was produced, as OpenAI does
        elif self._state == "plain" or buf.strip() or not self.calls:
            content += buf
        return content, deltas

    # One transition; True while progress is possible without more text.
    def _step(self, content: list[str], deltas: list[ToolCallDelta]) -> bool:
        state, fmt = self._state, self._fmt
        if state == "done":
            self._buf = ""
            return False
        if state == "plain":
            content.append(self._buf)
            self._buf = ""
            return False
        if state == "text":
            return self._in_text(content)
        if state == "call":
            return self._in_call(deltas)
        if state == "args":
            end = self._scanner.end(self._buf)
            piece = self._buf if end is None else self._buf[:end]
            stripped = piece if self._args else piece.lstrip()
            if stripped:
                self._args += stripped
                deltas.append(ToolCallDelta(len(self.calls), stripped))
            self._buf = "" if end is None else self._buf[end:]
            if end is None:
                return False
            self._state = "tail"
            return True
        # tail: the call object's "}" and the closing marker
        rest = self._buf.lstrip()
        if rest and not rest.startswith("}"):
            # More keys after the arguments: skipped, up to the "}" that closes the call.
            scanner = _ValueScanner()
            scanner.depth = 1
            end = scanner.end(rest)
            if end is None:
                return False
            rest = rest[end - 1 :]
        if not rest:
            return False
        after = rest[1:]
        close = fmt.close.strip()
        if close:
            trimmed = after.lstrip()
            if not trimmed or (close.startswith(trimmed) and trimmed != close):
                return False  # the marker may still be arriving
            if trimmed.startswith(close):
                after = trimmed[len(close) :]
        return self._end_call(after)

    def _end_call(self, rest: str) -> bool:
        self._record()
        self._buf = rest
        self._state = "text" if self._parallel else "done"
        return True

    def _in_text(self, content: list[str]) -> bool:
        fmt = self._fmt
        marker = fmt.open.strip()  # the call's JSON may follow it with or without a newline
        if marker:
            at = self._buf.find(marker)
            # Whitespace alone is held: it is dropped if a call follows it.
            if at < 0:
                keep = len(self._buf) - _held_prefix(self._buf, marker)
                if self._buf[:keep].strip():
                    content.append(self._buf[:keep])
                    self._buf = self._buf[keep:]
                return False
            if self._buf[:at].strip():
                content.append(self._buf[:at])
            self._buf = self._buf[at + len(marker) :]
            self._state = "call"
            return True
        # A bare-JSON format: a call is the turn itself, so only where nothing was said.
        stripped = self._buf.lstrip(" \n\t;")
        if not stripped:
            return False
        if self._said or not stripped.startswith("{"):
            self._state = "plain"
            return True
        self._buf = stripped
        self._state = "call"
        return True

    def _in_call(self, deltas: list[ToolCallDelta]) -> bool:
        header = _HEADER.match(self._buf)
        name = None
        if header is not None:
            try:
                name = json.loads(f'"{header.group(1)}"', strict=False)
            except ValueError:  # a broken escape: the whole value decides what it was
                header = None
        if header is not None and isinstance(name, str):
            self._start(name, deltas)
            self._buf = self._buf[header.end() :]
            self._scanner = _ValueScanner()
            self._state = "args"
            return True
        start = len(self._buf) - len(self._buf.lstrip())
        end = _value_end(self._buf, start) if self._buf[start:].startswith("{") else None
        if end is None:
            return False  # not whole yet (finish() decides what it was)
        whole = self._whole_call(self._buf[:end])
        if whole is None:  # JSON, but not a call: it was prose after all
            self._buf = self._fmt.open + self._buf
            self._state = "plain"
            return True
        deltas += self._emit_whole(*whole)
        self._buf = "}" + self._buf[end:]  # what is left of the call is its closing marker
        self._state = "tail"
        return True

    def _whole_call(self, text: str) -> tuple[str, str] | None:
        call = read_forced_call(text)
        return None if call is None else (call.name, call.arguments)

    def _start(self, name: str, deltas: list[ToolCallDelta]) -> None:
        self._id, self._name, self._args = f"call_{secrets.token_hex(12)}", name, ""
        deltas.append(ToolCallDelta(len(self.calls), "", id=self._id, name=name))

    def _emit_whole(self, name: str, arguments: str) -> list[ToolCallDelta]:
        deltas: list[ToolCallDelta] = []
        self._start(name, deltas)
        self._args = arguments
        deltas.append(ToolCallDelta(len(self.calls), arguments))
        return deltas

    def _record(self) -> None:
        self.calls.append(ToolCall(self._id, self._name, self._args))
