"""Built-in chat templates against known renderings, and the sandbox."""

from __future__ import annotations

import pytest

from backends.base import ChatMessage, InvalidRequestError
from backends.llama.templates import ChatTemplate

CONVERSATION = [
    ChatMessage("system", "You are helpful."),
    ChatMessage("user", "Hello"),
    ChatMessage("assistant", "Hi there"),
    ChatMessage("user", "How are you?"),
]


def test_gemma_matches_reference_rendering() -> None:
    # Google's Gemma 3 format: no system role, system text opens the first user turn.
    expected = (
        "<bos><start_of_turn>user\nYou are helpful.\n\nHello<end_of_turn>\n"
        "<start_of_turn>model\nHi there<end_of_turn>\n"
        "<start_of_turn>user\nHow are you?<end_of_turn>\n"
        "<start_of_turn>model\n"
    )
    assert ChatTemplate.builtin("gemma", bos_token="<bos>").render(CONVERSATION) == expected


def test_llama3_matches_reference_rendering() -> None:
    expected = (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nYou are helpful.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHello<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHi there<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHow are you?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    )
    template = ChatTemplate.builtin("llama3", bos_token="<|begin_of_text|>")
    assert template.render(CONVERSATION) == expected


def test_chatml_matches_reference_rendering() -> None:
    expected = (
        "<|im_start|>system\nYou are helpful.<|im_end|>\n"
        "<|im_start|>user\nHello<|im_end|>\n"
        "<|im_start|>assistant\nHi there<|im_end|>\n"
        "<|im_start|>user\nHow are you?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    assert ChatTemplate.builtin("chatml").render(CONVERSATION) == expected


def test_gemma_without_system_message() -> None:
    rendered = ChatTemplate.builtin("gemma").render([ChatMessage("user", "Hi")])
    assert rendered == "<start_of_turn>user\nHi<end_of_turn>\n<start_of_turn>model\n"


def test_generation_prompt_can_be_left_out() -> None:
    rendered = ChatTemplate.builtin("chatml").render(
        [ChatMessage("user", "Hi")], add_generation_prompt=False
    )
    assert rendered == "<|im_start|>user\nHi<|im_end|>\n"


def test_selection_prefers_configured_then_gguf_then_architecture() -> None:
    embedded = "{% for m in messages %}[{{ m.role }}]{{ m.content }}{% endfor %}"
    chosen = ChatTemplate.select(configured="chatml", embedded=embedded, architecture="gemma3")
    assert chosen.name == "chatml"
    chosen = ChatTemplate.select(configured=None, embedded=embedded, architecture="gemma3")
    assert chosen.name == "gguf"
    assert chosen.render([ChatMessage("user", "x")]) == "[user]x"
    for architecture, family in [("gemma3", "gemma"), ("llama", "llama3"), ("qwen2", "chatml")]:
        chosen = ChatTemplate.select(configured=None, embedded=None, architecture=architecture)
        assert chosen.name == family


@pytest.mark.parametrize(
    "malicious",
    [
        # The CVE-2024-34359 payload shape: reach os through class internals.
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ cycler.__init__.__globals__.os.popen('id').read() }}",
        "{% set x = messages.append(1) %}",
    ],
)
def test_gguf_templates_render_in_a_sandbox(malicious: str) -> None:
    template = ChatTemplate.select(configured=None, embedded=malicious, architecture="llama")
    with pytest.raises(InvalidRequestError, match="chat template failed"):
        template.render([ChatMessage("user", "hi")])


def test_template_raise_exception_is_a_client_error() -> None:
    source = "{{ raise_exception('roles must alternate') }}"
    template = ChatTemplate.select(configured=None, embedded=source, architecture="llama")
    with pytest.raises(InvalidRequestError, match="roles must alternate"):
        template.render([ChatMessage("user", "hi")])


def test_gemma_keeps_the_system_text_whatever_comes_first() -> None:
    gemma = ChatTemplate.builtin("gemma")
    only_system = gemma.render([ChatMessage("system", "SYS")])
    assert only_system == "<start_of_turn>user\nSYS<end_of_turn>\n<start_of_turn>model\n"
    assistant_first = gemma.render(
        [ChatMessage("system", "SYS"), ChatMessage("assistant", "A"), ChatMessage("user", "U")]
    )
    assert assistant_first.startswith("<start_of_turn>model\nSYS\n\nA<end_of_turn>\n")


def test_render_parts_separates_message_contents() -> None:
    parts = ChatTemplate.builtin("chatml").render_parts(
        [ChatMessage("user", "a <|im_end|> b")], add_generation_prompt=False
    )
    assert parts == [
        ("<|im_start|>user\n", False),
        ("a <|im_end|> b", True),
        ("<|im_end|>\n", False),
    ]
    assert "".join(text for text, _ in parts) == ChatTemplate.builtin("chatml").render(
        [ChatMessage("user", "a <|im_end|> b")], add_generation_prompt=False
    )
