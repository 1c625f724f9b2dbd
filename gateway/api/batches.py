"""``/v1/files`` and ``/v1/batches``: OpenAI's Files and Batch APIs — parse, call, encode.

The work is :class:`gateway.batch.service.BatchService`'s (what is stored) and the
runner's (what runs); errors render in the OpenAI door's shape.
"""

from __future__ import annotations

from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException
from starlette.formparsers import MultiPartException
from starlette.requests import Request
from starlette.responses import FileResponse
from starlette.routing import Route
from starlette.types import ASGIApp

from gateway.api.endpoint import Handler, route
from gateway.api.openai import OPENAI_ERRORS
from gateway.api.serving import json_response
from gateway.batch.service import BatchService
from gateway.errors import InvalidRequest
from gateway.protocol.batches import CreateBatchRequest, batch_object, file_object, page
from gateway.protocol.wire import parse
from gateway.tenancy.records import Principal

MAX_PAGE = 10_000  # OpenAI's largest files page; batches allow 100


def _batches(request: Request) -> BatchService:
    service: BatchService = request.app.state.batches
    return service


def _limit(request: Request, *, default: int, most: int) -> int:
    raw = request.query_params.get("limit")
    if raw is None:
        return default
    if not (raw.isascii() and raw.isdigit()) or not 1 <= int(raw) <= most:
        raise InvalidRequest(f"limit must be an integer from 1 to {most}.", param="limit")
    return int(raw)


async def create_file(request: Request, principal: Principal) -> ASGIApp:
    """Upload a file (multipart: ``file`` and ``purpose``, which must be ``batch``)."""
    if not request.headers.get("content-type", "").startswith("multipart/form-data"):
        raise InvalidRequest("Upload the file as multipart/form-data.", param="file")
    try:
        form = await request.form(max_files=1, max_fields=8)
    except (HTTPException, MultiPartException) as exc:  # Starlette's words for a bad form
        raise InvalidRequest(
            f"The multipart body could not be read: {getattr(exc, 'detail', exc)}", param="file"
        ) from None
    try:
        upload, purpose = form.get("file"), form.get("purpose")
        if not isinstance(upload, UploadFile):
            raise InvalidRequest("The form has no 'file' part.", param="file")
        if not isinstance(purpose, str):
            raise InvalidRequest("The form has no 'purpose' field.", param="purpose")
        record = await _batches(request).upload(
            principal, upload, filename=upload.filename or "", purpose=purpose
        )
    finally:
        await form.close()  # the spooled temporary file
    return json_response(file_object(record))


async def list_files(request: Request, principal: Principal) -> ASGIApp:
    """List this key's tenant's files, newest first (``after``, ``limit``, ``purpose``)."""
    q = request.query_params
    records, more = await _batches(request).list_files(
        principal,
        purpose=q.get("purpose"),
        after=q.get("after"),
        limit=_limit(request, default=MAX_PAGE, most=MAX_PAGE),
    )
    return json_response(page([file_object(r) for r in records], has_more=more))


async def get_file(request: Request, principal: Principal) -> ASGIApp:
    """Describe one file."""
    record = await _batches(request).file(principal, request.path_params["file_id"])
    return json_response(file_object(record))


async def file_content(request: Request, principal: Principal) -> ASGIApp:
    """A file's bytes (JSON lines)."""
    service = _batches(request)
    record = await service.file(principal, request.path_params["file_id"])
    return FileResponse(service.content(record), media_type="application/jsonl")


async def delete_file(request: Request, principal: Principal) -> ASGIApp:
    """Delete a file."""
    file_id = request.path_params["file_id"]
    await _batches(request).delete_file(principal, file_id)
    return json_response({"id": file_id, "object": "file", "deleted": True})


async def create_batch(request: Request, principal: Principal) -> ASGIApp:
    """Create a batch from an uploaded file; ``Idempotency-Key`` returns the same batch."""
    body = parse(CreateBatchRequest, await request.body())
    record, progress = await _batches(request).create(
        principal, body, idempotency_key=request.headers.get("idempotency-key")
    )
    return json_response(batch_object(record, progress))


async def list_batches(request: Request, principal: Principal) -> ASGIApp:
    """List this key's tenant's batches, newest first (``after``, ``limit``)."""
    found, more = await _batches(request).list_batches(
        principal,
        after=request.query_params.get("after"),
        limit=_limit(request, default=20, most=100),
    )
    return json_response(page([batch_object(r, p) for r, p in found], has_more=more))


async def get_batch(request: Request, principal: Principal) -> ASGIApp:
    """Describe one batch, with its progress."""
    record, progress = await _batches(request).batch(principal, request.path_params["batch_id"])
    return json_response(batch_object(record, progress))


async def cancel_batch(request: Request, principal: Principal) -> ASGIApp:
    """Cancel a batch: lines not yet run go to its error file as ``batch_cancelled``."""
    record, progress = await _batches(request).cancel(principal, request.path_params["batch_id"])
    return json_response(batch_object(record, progress))


def _route(path: str, method: str, handler: Handler, name: str) -> Route:
    return route(path, method, handler, name=name, errors=OPENAI_ERRORS)


ROUTES = (
    _route("/v1/files", "POST", create_file, "files"),
    _route("/v1/files", "GET", list_files, "files"),
    _route("/v1/files/{file_id}", "GET", get_file, "files"),
    _route("/v1/files/{file_id}", "DELETE", delete_file, "files"),
    _route("/v1/files/{file_id}/content", "GET", file_content, "files"),
    _route("/v1/batches", "POST", create_batch, "batches"),
    _route("/v1/batches", "GET", list_batches, "batches"),
    _route("/v1/batches/{batch_id}", "GET", get_batch, "batches"),
    _route("/v1/batches/{batch_id}/cancel", "POST", cancel_batch, "batches"),
)
