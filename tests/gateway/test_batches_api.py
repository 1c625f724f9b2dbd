"""The Files and Batch APIs in process, through the real OpenAI SDK.

The model is the fake backend (``echo``, ``slow``): these tests are about files,
batches, leases and the exactly-once output, not about generation, which
``tests/integration/test_batches.py`` runs on the real model.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from backends.fake import FakeBackend
from gateway.app import create_app
from gateway.batch.service import WINDOW_SECONDS
from gateway.settings import Settings
from gateway.tenancy.keys import key_hash, new_key
from tests.spec.openai import validate

KEY_A, KEY_B = new_key(), new_key()
ENDS = ("completed", "failed", "cancelled", "expired")


def chat_line(i: int, model: str = "echo", **extra: Any) -> dict[str, Any]:
    body = {"model": model, "messages": [{"role": "user", "content": f"hello {i}"}], **extra}
    return {"custom_id": f"r{i}", "method": "POST", "url": "/v1/chat/completions", "body": body}


def jsonl(lines: list[Any]) -> bytes:
    return "\n".join(x if isinstance(x, str) else json.dumps(x) for x in lines).encode()


def settings(tmp_path: Path, redis_url: str | None = None, **batches: Any) -> Settings:
    def tenant(tid: str, key: str, **fields: Any) -> dict[str, Any]:
        return {"id": tid, "keys": [{"id": f"{tid}-key", "hash": key_hash(key)}], **fields}

    return Settings(
        models=[{"name": "echo", "backend": "fake"}, {"name": "slow", "backend": "fake"}],
        auth={"database": str(tmp_path / "lockgate.db")},
        tenants=[tenant("a", KEY_A), tenant("b", KEY_B, models=["slow"])],
        batches={
            "database": str(tmp_path / "batches.db"),
            "files_dir": str(tmp_path / "files"),
            "poll_seconds": 0.1,
            "lease_seconds": 3,
            **batches,
        },
        redis_url=redis_url,
    )


Clients = Callable[[str], openai.AsyncOpenAI]


@pytest.fixture
def fakes() -> dict[str, FakeBackend]:
    return {
        "echo": FakeBackend("echo", context_length=64, capacity=4),
        "slow": FakeBackend("slow", delay=0.05, capacity=4),
    }


@pytest.fixture(params=["sqlite", "redis"])
async def gateway(
    tmp_path: Path, fakes: dict[str, FakeBackend], request: pytest.FixtureRequest
) -> AsyncIterator[Clients]:
    """``clients(key)``: an SDK client for that key, on a gateway whose batches are in
    SQLite or in a real Redis; its batch settings from the test's ``batch_settings``
    marker, if any."""
    marker = request.node.get_closest_marker("batch_settings")
    redis_url = request.getfixturevalue("redis_url") if request.param == "redis" else None
    s = settings(tmp_path, redis_url, **(marker.kwargs if marker else {}))
    app = create_app(s, backends=fakes)
    async with app.router.lifespan_context(app):
        for backend in fakes.values():
            await backend.start()
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test/v1") as http:

            def clients(key: str) -> openai.AsyncOpenAI:
                return openai.AsyncOpenAI(api_key=key, base_url="http://test/v1", http_client=http)

            yield clients


async def finished(client: openai.AsyncOpenAI, batch_id: str) -> Any:
    async with asyncio.timeout(20):
        while True:
            batch = await client.batches.retrieve(batch_id)
            if batch.status in ENDS:
                return batch
            await asyncio.sleep(0.05)


async def lines_of(client: openai.AsyncOpenAI, file_id: str | None) -> list[dict[str, Any]]:
    if file_id is None:
        return []
    text = (await client.files.content(file_id)).text
    return [json.loads(x) for x in text.splitlines()]


async def submit(client: openai.AsyncOpenAI, lines: list[Any], **create: Any) -> Any:
    uploaded = await client.files.create(file=("in.jsonl", jsonl(lines)), purpose="batch")
    return await client.batches.create(
        input_file_id=uploaded.id,
        endpoint=create.pop("endpoint", "/v1/chat/completions"),
        completion_window="24h",
        **create,
    )


async def test_files_round_trip_and_pages(gateway: Clients) -> None:
    client = gateway(KEY_A)
    made = [
        await client.files.create(file=(f"f{i}.jsonl", jsonl([chat_line(i)])), purpose="batch")
        for i in range(3)
    ]
    assert made[0].filename == "f0.jsonl" and made[0].bytes == len(jsonl([chat_line(0)]))
    assert (await client.files.retrieve(made[1].id)).id == made[1].id
    assert (await client.files.content(made[2].id)).content == jsonl([chat_line(2)])
    first = await client.files.list(limit=2)
    assert [f.id for f in first.data] == [made[2].id, made[1].id] and first.has_more
    rest = await client.files.list(limit=2, after=first.data[-1].id)
    assert [f.id for f in rest.data] == [made[0].id] and not rest.has_more
    deleted = await client.files.delete(made[0].id)
    assert deleted.deleted
    with pytest.raises(openai.NotFoundError):
        await client.files.retrieve(made[0].id)


async def test_a_tenants_files_and_batches_are_not_found_by_another(gateway: Clients) -> None:
    a, b = gateway(KEY_A), gateway(KEY_B)
    batch = await submit(a, [chat_line(0)])
    with pytest.raises(openai.NotFoundError):
        await b.files.retrieve(batch.input_file_id)
    with pytest.raises(openai.NotFoundError):
        await b.files.content(batch.input_file_id)
    with pytest.raises(openai.NotFoundError):
        await b.batches.retrieve(batch.id)
    with pytest.raises(openai.NotFoundError):
        await b.batches.cancel(batch.id)
    assert (await b.files.list()).data == [] and (await b.batches.list()).data == []


@pytest.mark.batch_settings(max_file_lines=3)
async def test_uploads_are_refused_with_a_clear_error(tmp_path: Path, gateway: Clients) -> None:
    client = gateway(KEY_A)
    with pytest.raises(openai.BadRequestError, match="purpose 'batch'"):
        await client.files.create(file=("x.jsonl", b"{}"), purpose="assistants")
    with pytest.raises(openai.BadRequestError, match="more than 3 lines"):
        await client.files.create(file=("x.jsonl", b"{}\n" * 4), purpose="batch")
    # Nothing is left behind by a refused upload.
    assert not list((tmp_path / "files").glob("*.partial"))
    assert (await client.files.list()).data == []


async def test_every_line_ends_once_and_a_bad_line_never_stops_the_batch(
    gateway: Clients,
) -> None:
    client = gateway(KEY_A)
    good = [chat_line(i, max_tokens=8) for i in range(5)]
    lines = [*good, "this is not json", chat_line(9, stream=True)]
    batch = await submit(client, lines, metadata={"job": "nightly"})
    assert batch.status == "validating" and batch.metadata == {"job": "nightly"}
    done = await finished(client, batch.id)
    assert done.status == "completed", done
    counts = done.request_counts
    assert (counts.total, counts.completed, counts.failed) == (7, 5, 2)
    outputs = await lines_of(client, done.output_file_id)
    errors = await lines_of(client, done.error_file_id)
    assert sorted(o["custom_id"] for o in outputs) == [f"r{i}" for i in range(5)]
    for o in outputs:
        body = o["response"]["body"]
        validate("CreateChatCompletionResponse", body)
        assert o["response"]["status_code"] == 200 and o["error"] is None
        assert body["choices"][0]["message"]["content"] == f"hello {o['custom_id'][1:]}"
    by_id = {e["custom_id"]: e for e in errors}
    assert by_id[None]["error"]["code"] == "invalid_json"
    assert by_id["r9"]["response"]["status_code"] == 400
    assert "Streaming" in by_id["r9"]["response"]["body"]["error"]["message"]
    assert done.usage.input_tokens > 0 and done.usage.output_tokens > 0
    assert done.usage.total_tokens == done.usage.input_tokens + done.usage.output_tokens
    raw = client.with_raw_response
    validate("Batch", (await raw.batches.retrieve(done.id)).http_response.json())
    validate("ListBatchesResponse", (await raw.batches.list()).http_response.json())
    validate("ListFilesResponse", (await raw.files.list()).http_response.json())
    output = await raw.files.retrieve(done.output_file_id)
    validate("OpenAIFile", output.http_response.json())
    assert output.http_response.json()["purpose"] == "batch_output"


async def test_a_file_that_names_another_endpoint_model_or_id_twice_is_refused(
    gateway: Clients,
) -> None:
    client = gateway(KEY_B)  # may use `slow` only
    lines = [
        {**chat_line(0, model="slow"), "url": "/v1/completions"},
        chat_line(1, model="echo"),
        chat_line(2, model="slow"),
        chat_line(2, model="slow"),
    ]
    done = await finished(client, (await submit(client, lines)).id)
    assert done.status == "failed" and done.failed_at is not None
    found = {(e.code, e.line) for e in done.errors.data}
    assert found == {
        ("mismatched_endpoint", 1),
        ("mismatched_model", 2),
        ("duplicate_custom_id", 4),
    }
    assert done.output_file_id is None and done.request_counts.completed == 0
    denied = await finished(client, (await submit(client, [chat_line(0, model="echo")])).id)
    assert [(e.code, e.line) for e in denied.errors.data] == [("model_not_found", 1)]


async def test_embeddings_and_completions_batches(gateway: Clients) -> None:
    client = gateway(KEY_A)
    text = [
        {"custom_id": "t", "method": "POST", "url": "/v1/completions",
         "body": {"model": "echo", "prompt": "one two three", "max_tokens": 5}},
    ]  # fmt: skip
    done = await finished(client, (await submit(client, text, endpoint="/v1/completions")).id)
    (out,) = await lines_of(client, done.output_file_id)
    validate("CreateCompletionResponse", out["response"]["body"])
    embed = [
        {"custom_id": "e", "method": "POST", "url": "/v1/embeddings",
         "body": {"model": "echo", "input": "one two three"}},
    ]  # fmt: skip
    done = await finished(client, (await submit(client, embed, endpoint="/v1/embeddings")).id)
    (out,) = await lines_of(client, done.output_file_id)
    validate("CreateEmbeddingResponse", out["response"]["body"])


async def test_cancel_ends_the_batch_and_every_line_appears_once(gateway: Clients) -> None:
    client = gateway(KEY_A)
    lines = [chat_line(i, model="slow", max_tokens=20) for i in range(40)]
    batch = await submit(client, lines)
    async with asyncio.timeout(20):
        while True:
            if (await client.batches.retrieve(batch.id)).request_counts.completed >= 2:
                break
            await asyncio.sleep(0.05)
    cancelling = await client.batches.cancel(batch.id)
    assert cancelling.status == "cancelling" and cancelling.cancelling_at is not None
    done = await finished(client, batch.id)
    assert done.status == "cancelled" and done.cancelled_at is not None
    outputs = await lines_of(client, done.output_file_id)
    errors = await lines_of(client, done.error_file_id)
    ids = [x["custom_id"] for x in outputs + errors]
    assert sorted(ids) == sorted(f"r{i}" for i in range(40))
    assert {e["error"]["code"] for e in errors} == {"batch_cancelled"}
    c = done.request_counts
    assert c.total == c.completed + c.failed == 40 and c.completed >= 2
    again = await client.batches.cancel(batch.id)  # cancelling a cancelled batch: as it is
    assert again.status == "cancelled"
    completed = await finished(client, (await submit(client, [chat_line(0)])).id)
    with pytest.raises(openai.ConflictError, match="completed cannot be cancelled"):
        await client.batches.cancel(completed.id)


async def test_idempotency_key_gives_the_same_batch(gateway: Clients) -> None:
    client = gateway(KEY_A)
    uploaded = await client.files.create(file=("in.jsonl", jsonl([chat_line(0)])), purpose="batch")
    create = {"input_file_id": uploaded.id, "endpoint": "/v1/chat/completions",
              "completion_window": "24h"}  # fmt: skip
    key = {"Idempotency-Key": "nightly-2026-12-02"}
    first = await client.batches.create(**create, extra_headers=key)  # type: ignore[arg-type]
    again = await client.batches.create(**create, extra_headers=key)  # type: ignore[arg-type]
    assert again.id == first.id
    with pytest.raises(openai.ConflictError, match="another body"):
        await client.batches.create(**create, metadata={"x": "y"}, extra_headers=key)  # type: ignore[arg-type]
    assert len((await client.batches.list()).data) == 1


@pytest.mark.batch_settings(interactive_reserve=2)
async def test_lines_leave_slots_for_interactive_requests(
    gateway: Clients, fakes: dict[str, FakeBackend]
) -> None:
    """4 slots, 2 reserved: batch lines never hold more than 2, and an interactive request
    meanwhile starts at once."""
    client = gateway(KEY_A)
    batch = await submit(client, [chat_line(i, model="slow", max_tokens=10) for i in range(12)])
    most = 0
    waited: list[float] = []
    while (b := await client.batches.retrieve(batch.id)).status not in ENDS:
        most = max(most, fakes["slow"].load().running)
        if b.status == "in_progress" and len(waited) < 3:
            began = time.perf_counter()
            stream = await client.chat.completions.create(
                model="slow", messages=[{"role": "user", "content": "hi"}], stream=True
            )
            async for _ in stream:
                waited.append(time.perf_counter() - began)
                break
            await stream.close()
        await asyncio.sleep(0.01)
    assert b.status == "completed" and b.request_counts.completed == 12
    assert 1 <= most <= 3  # two batch lines, and the interactive request
    assert waited and max(waited) < 0.5  # a slot was free: no wait for a batch line


@pytest.mark.batch_settings(lease_seconds=1)
async def test_a_batch_past_its_window_expires_its_remaining_lines(
    gateway: Clients, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = gateway(KEY_A)
    monkeypatch.setitem(WINDOW_SECONDS, "24h", 1)  # "24h" is one second long here
    batch = await submit(client, [chat_line(i, model="slow", max_tokens=40) for i in range(30)])
    done = await finished(client, batch.id)
    assert done.status == "expired" and done.expired_at is not None
    errors = await lines_of(client, done.error_file_id)
    outputs = await lines_of(client, done.output_file_id)
    assert {e["error"]["code"] for e in errors} == {"batch_expired"}
    assert len(errors) + len(outputs) == 30
    assert done.request_counts.total == done.request_counts.completed + done.request_counts.failed
