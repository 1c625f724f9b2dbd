"""The same chat in each front door's wire format, and how to spot its streamed text."""

from __future__ import annotations

import json

OLLAMA_CHAT = "/api/chat"
RESPONSES = "/v1/responses"


def body(*, stream: bool, max_tokens: int, door: str = "openai") -> bytes:
    """The same chat in each front door's wire format."""
    model = "mock-stream" if stream else "mock"
    messages = [{"role": "user", "content": "hi"}]
    request: dict[str, object]
    if door == "ollama":
        options = {"num_predict": max_tokens}
        request = {"model": model, "messages": messages, "options": options, "stream": stream}
    elif door == "responses":
        request = {"model": model, "input": "hi", "max_output_tokens": max_tokens, "stream": stream}
    else:
        request = {"model": model, "messages": messages, "max_tokens": max_tokens, "stream": stream}
    return json.dumps(request).encode()


def content_chunk(line: bytes, door: str) -> bool:
    """Whether one line of a streamed answer carries generated text, in ``door``'s format."""
    if door == "ollama":  # NDJSON: a message per line until the done line
        event = json.loads(line)
        return not event.get("done") and bool(event.get("message", {}).get("content"))
    if not line.startswith(b"data: ") or line == b"data: [DONE]":
        return False
    event = json.loads(line[6:])
    if door == "responses":
        return event.get("type") == "response.output_text.delta"
    choices = event.get("choices") or []
    return bool(choices and choices[0].get("delta", {}).get("content"))
