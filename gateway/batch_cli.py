"""``lockgate batch``: offline batches from the command line, against a running gateway.

    lockgate batch submit questions.jsonl --endpoint /v1/chat/completions --wait
    lockgate batch status batch_...   |  list  |  cancel batch_...
    lockgate batch download batch_... -o answers.jsonl [--errors]

The gateway is ``--url`` (default ``$LOCKGATE_URL``, else http://127.0.0.1:8000) and the
tenant's key ``--key`` (default ``$LOCKGATE_API_KEY``). Only the standard library talks
HTTP here: the upload streams the file as multipart, whatever its size.
"""

from __future__ import annotations

import json
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer
from tqdm import tqdm

batch = typer.Typer(
    no_args_is_help=True,
    help="Submit, watch, cancel and download offline batches (OpenAI's Batch API)."
    " Talks to a running gateway (--url, or $LOCKGATE_URL) with a tenant key"
    " (--key, or $LOCKGATE_API_KEY).",
    context_settings={"help_option_names": ["-h", "--help"]},
)

Url = Annotated[str, typer.Option(envvar="LOCKGATE_URL", help="the gateway")]
Key = Annotated[str, typer.Option(envvar="LOCKGATE_API_KEY", help="a tenant's API key")]
DEFAULT_URL = "http://127.0.0.1:8000"
ENDED = ("completed", "failed", "expired", "cancelled")


def _fail(message: str) -> NoReturn:
    typer.echo(f"lockgate: {message}", err=True)
    raise typer.Exit(1)


def _request(
    url: str,
    key: str,
    method: str,
    path: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> urllib.request.Request:
    data = json.dumps(body).encode() if body is not None and not isinstance(body, bytes) else body
    if not url.startswith(("http://", "https://")):
        _fail(f"--url must be an http(s) URL, not {url!r}")
    heads = {"Authorization": f"Bearer {key}"} if key else {}
    if body is not None and not isinstance(body, bytes):
        heads["Content-Type"] = "application/json"
    return urllib.request.Request(  # noqa: S310 - checked: http(s) only
        url.rstrip("/") + path, data=data, method=method, headers={**heads, **(headers or {})}
    )


def _open(request: urllib.request.Request) -> Any:
    try:
        return urllib.request.urlopen(request, timeout=60)  # noqa: S310 - the user's gateway URL
    except urllib.error.HTTPError as exc:
        try:
            message = json.loads(exc.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = exc.reason
        _fail(f"{exc.code}: {message}")
    except urllib.error.URLError as exc:
        _fail(f"cannot reach {request.full_url}: {exc.reason}")


def _json(url: str, key: str, method: str, path: str, body: Any = None) -> Any:
    with _open(_request(url, key, method, path, body)) as response:
        return json.loads(response.read())


def _multipart(path: Path, boundary: str) -> tuple[Iterator[bytes], int]:
    head = (
        f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{path.name}"\r\n'
        "Content-Type: application/jsonl\r\n\r\n"
    ).encode()
    tail = f"\r\n--{boundary}--\r\n".encode()

    def chunks() -> Iterator[bytes]:
        yield head
        with path.open("rb") as f:
            while block := f.read(1 << 20):
                yield block
        yield tail

    return chunks(), len(head) + path.stat().st_size + len(tail)


@batch.command()
def submit(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="JSONL input")],
    endpoint: Annotated[
        str, typer.Option(help="/v1/chat/completions, /v1/completions or /v1/embeddings")
    ] = "/v1/chat/completions",
    wait: Annotated[bool, typer.Option(help="watch it to the end with a progress bar")] = False,
    url: Url = DEFAULT_URL,
    key: Key = "",
) -> None:
    """Upload FILE and start a batch on it."""
    boundary = uuid.uuid4().hex
    body, length = _multipart(file, boundary)
    request = _request(url, key, "POST", "/v1/files", None)
    request.data = body  # urllib sends an iterable as it comes
    request.add_header("Content-Type", f"multipart/form-data; boundary={boundary}")
    request.add_header("Content-Length", str(length))
    with _open(request) as response:
        uploaded = json.loads(response.read())
    created = _json(
        url,
        key,
        "POST",
        "/v1/batches",
        {"input_file_id": uploaded["id"], "endpoint": endpoint, "completion_window": "24h"},
    )
    typer.echo(created["id"])
    if wait:
        _watch(url, key, created["id"])


def _watch(url: str, key: str, batch_id: str) -> None:
    bar = tqdm(desc=batch_id[:20], unit="line", file=sys.stderr, dynamic_ncols=True)
    started, tokens_at_start = time.monotonic(), None
    try:
        while True:
            b = _json(url, key, "GET", f"/v1/batches/{batch_id}")
            counts, usage = b["request_counts"], b.get("usage", {})
            tokens = usage.get("total_tokens", 0)
            tokens_at_start = tokens if tokens_at_start is None else tokens_at_start
            rate = (tokens - tokens_at_start) / max(1e-9, time.monotonic() - started)
            bar.total = counts["total"] or None
            bar.n = counts["completed"] + counts["failed"]
            bar.set_postfix_str(f"{b['status']}, {counts['failed']} failed, {rate:.0f} tok/s")
            bar.refresh()
            if b["status"] in ENDED:
                break
            time.sleep(1)
    finally:
        bar.close()
    typer.echo(f"{b['status']}: {counts['completed']} completed, {counts['failed']} failed")
    if b["status"] == "failed" and b.get("errors"):
        for e in b["errors"]["data"]:
            typer.echo(f"  line {e.get('line')}: {e['code']}: {e['message']}", err=True)
        raise typer.Exit(1)


@batch.command()
def status(
    batch_id: str,
    wait: Annotated[bool, typer.Option()] = False,
    url: Url = DEFAULT_URL,
    key: Key = "",
) -> None:
    """Print a batch (JSON); with --wait, watch it to the end."""
    if wait:
        _watch(url, key, batch_id)
    typer.echo(json.dumps(_json(url, key, "GET", f"/v1/batches/{batch_id}"), indent=2))


@batch.command("list")
def list_batches(
    limit: Annotated[int, typer.Option(min=1, max=100)] = 20, url: Url = DEFAULT_URL, key: Key = ""
) -> None:
    """List the tenant's batches, newest first."""
    page = _json(url, key, "GET", f"/v1/batches?limit={limit}")
    for b in page["data"]:
        c = b["request_counts"]
        typer.echo(
            f"{b['id']}  {b['status']:<11} {c['completed']}/{c['total']} done,"
            f" {c['failed']} failed  {b['endpoint']}"
        )


@batch.command()
def cancel(batch_id: str, url: Url = DEFAULT_URL, key: Key = "") -> None:
    """Cancel a batch: lines not run yet go to its error file."""
    typer.echo(_json(url, key, "POST", f"/v1/batches/{batch_id}/cancel")["status"])


@batch.command()
def download(
    batch_id: str,
    output: Annotated[Path | None, typer.Option("--output", "-o", help="default: stdout")] = None,
    errors: Annotated[bool, typer.Option(help="the error file instead")] = False,
    url: Url = DEFAULT_URL,
    key: Key = "",
) -> None:
    """Write a finished batch's output (or error) file."""
    b = _json(url, key, "GET", f"/v1/batches/{batch_id}")
    file_id = b.get("error_file_id" if errors else "output_file_id")
    if file_id is None:
        _fail(f"batch {batch_id} ({b['status']}) has no {'error' if errors else 'output'} file")
    with _open(_request(url, key, "GET", f"/v1/files/{file_id}/content")) as response:
        sink = output.open("wb") if output else sys.stdout.buffer
        try:
            while block := response.read(1 << 20):
                sink.write(block)
        finally:
            if output:
                sink.close()
