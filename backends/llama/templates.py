"""Chat templates: turn chat messages into one prompt string.

A GGUF may carry its own Jinja template (``tokenizer.chat_template``). It is
rendered in Jinja's *immutable sandbox*: templates come with downloaded model
files, and rendering one in a plain environment let a crafted GGUF run code in
llama-cpp-python (CVE-2024-34359). Models without a template (base models such
as the default Gemma 3 270M) use a built-in one for their family, chosen by
configuration or from ``general.architecture``.

    >>> t = ChatTemplate.builtin("chatml")
    >>> t.render([ChatMessage("user", "Hi")])
    '<|im_start|>user\\nHi<|im_end|>\\n<|im_start|>assistant\\n'
"""

from __future__ import annotations

import re
import secrets
from collections.abc import Sequence
from typing import Any, Literal, NoReturn

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

from backends.base import ChatMessage, InvalidRequestError

BuiltinTemplate = Literal["gemma", "llama3", "chatml"]

# Newlines are written as '\n' literals so whitespace control cannot eat them.
# Gemma has no system role: the system text is prepended to the first user turn,
# as Google's reference template does.
_GEMMA = (
    "{{ bos_token }}"
    "{%- set sys = namespace(text='') -%}"
    "{%- for m in messages if m.role == 'system' -%}"
    "{%- set sys.text = sys.text + m.content + '\n\n' -%}"
    "{%- endfor -%}"
    "{%- set turns = messages | rejectattr('role', 'equalto', 'system') | list -%}"
    "{%- if sys.text and not turns -%}"
    "{{ '<start_of_turn>user\n' + sys.text | trim + '<end_of_turn>\n' }}"
    "{%- endif -%}"
    "{%- for m in turns -%}"
    "{%- set role = 'model' if m.role == 'assistant' else 'user' -%}"
    "{{ '<start_of_turn>' + role + '\n' }}"
    "{%- if loop.first %}{{ sys.text }}{% endif -%}"
    "{{ m.content | trim }}{{ '<end_of_turn>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif -%}"
)

_LLAMA3 = (
    "{{ bos_token }}"
    "{%- for m in messages -%}"
    "{{ '<|start_header_id|>' + m.role + '<|end_header_id|>\n\n' }}"
    "{{- m.content | trim }}{{ '<|eot_id|>' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{%- endif -%}"
)

_CHATML = (
    "{%- for m in messages -%}"
    "{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif -%}"
)

# Where a message's content goes while the template renders: a per-call nonce and the
# message's index (one compiled pattern; the nonce is compared, not compiled in).
_PLACEHOLDER = re.compile("\ue000([0-9a-f]{12}):(\\d+)\ue001")

_BUILTINS: dict[str, str] = {"gemma": _GEMMA, "llama3": _LLAMA3, "chatml": _CHATML}

# general.architecture → built-in family, for GGUFs without their own template.
_ARCHITECTURE_FAMILY: dict[str, BuiltinTemplate] = {
    "gemma": "gemma",
    "gemma2": "gemma",
    "gemma3": "gemma",
    "gemma3n": "gemma",
    "llama": "llama3",
    "qwen": "chatml",
    "qwen2": "chatml",
    "qwen2moe": "chatml",
    "qwen3": "chatml",
    "qwen3moe": "chatml",
}


def architecture_family(architecture: str) -> BuiltinTemplate:
    """The built-in family of a ``general.architecture`` (chatml when unknown)."""
    return _ARCHITECTURE_FAMILY.get(architecture, "chatml")


def builtin_source(family: str) -> str:
    """The Jinja text of a built-in template (``quantization/vllm.sh`` gives it to vLLM)."""
    if family not in _BUILTINS:
        raise ValueError(f"unknown template {family!r}; choose one of {sorted(_BUILTINS)}")
    return _BUILTINS[family]


def _raise_exception(message: str) -> NoReturn:
    # Templates call raise_exception() to reject unsupported conversations.
    raise InvalidRequestError(f"chat template rejected the messages: {message}", param="messages")


class ChatTemplate:
    """A compiled, sandboxed chat template."""

    def __init__(self, source: str, *, name: str, bos_token: str = "", eos_token: str = "") -> None:
        env = ImmutableSandboxedEnvironment(
            trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
        )
        env.globals["raise_exception"] = _raise_exception
        self.name = name
        # The built-ins trim message contents; placeholders hide that, so render_parts does it.
        self._trims = name in ("gemma", "llama3")
        self._template = env.from_string(source)
        self._bos = bos_token
        self._eos = eos_token

    @classmethod
    def builtin(cls, family: str, *, bos_token: str = "", eos_token: str = "") -> ChatTemplate:
        return cls(builtin_source(family), name=family, bos_token=bos_token, eos_token=eos_token)

    @classmethod
    def select(
        cls,
        *,
        configured: str | None,
        embedded: str | None,
        architecture: str,
        bos_token: str = "",
        eos_token: str = "",
    ) -> ChatTemplate:
        """Configured built-in, else the GGUF's own, else the architecture's family."""
        if configured is not None:
            return cls.builtin(configured, bos_token=bos_token, eos_token=eos_token)
        if embedded:
            return cls(embedded, name="gguf", bos_token=bos_token, eos_token=eos_token)
        return cls.builtin(
            architecture_family(architecture), bos_token=bos_token, eos_token=eos_token
        )

    def render_parts(
        self, messages: Sequence[ChatMessage], *, add_generation_prompt: bool = True
    ) -> list[tuple[str, bool]]:
        """The rendering as ``(text, is_message_content)`` parts, in order.

        Contents are rendered as placeholders and put back as parts of their own, so
        the caller can tokenize them without parsing control tokens: a user who types
        ``<end_of_turn><start_of_turn>model`` must not be able to end their turn and
        speak as the model (llama-server and llama-cpp-python allow exactly that).
        """
        nonce = secrets.token_hex(6)
        placeholders = [
            ChatMessage(m.role, f"\ue000{nonce}:{i}\ue001", m.tool_calls, m.tool_call_id, m.name)
            for i, m in enumerate(messages)
        ]
        text = self.render(placeholders, add_generation_prompt=add_generation_prompt)
        parts: list[tuple[str, bool]] = []
        pos = 0
        for match in _PLACEHOLDER.finditer(text):
            if match.group(1) != nonce:
                continue
            if match.start() > pos:
                parts.append((text[pos : match.start()], False))
            content = messages[int(match.group(2))].content
            parts.append((content.strip() if self._trims else content, True))
            pos = match.end()
        if pos < len(text):
            parts.append((text[pos:], False))
        return parts

    def render(self, messages: Sequence[ChatMessage], *, add_generation_prompt: bool = True) -> str:
        context: dict[str, Any] = {
            "messages": [{"role": m.role, "content": m.content} for m in messages],
            "add_generation_prompt": add_generation_prompt,
            "bos_token": self._bos,
            "eos_token": self._eos,
        }
        try:
            return self._template.render(context)
        except InvalidRequestError:
            raise
        except TemplateError as exc:
            # A sandbox violation or a broken template: the client cannot fix
            # it, but it must not surface as a traceback either.
            raise InvalidRequestError(
                f"the model's chat template failed to render: {type(exc).__name__}",
                param="messages",
            ) from exc
