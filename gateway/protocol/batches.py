"""OpenAI's Files and Batch API objects: the create body in, file and batch objects out.

Errors use the OpenAI door's error body (:func:`gateway.protocol.openai.error_body`).
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from gateway.batch.records import BatchEndpoint, BatchRecord, FileRecord, Progress
from gateway.protocol.wire import WireModel


class CreateBatchRequest(WireModel):
    input_file_id: Annotated[str, Field(min_length=1, max_length=128)]
    endpoint: BatchEndpoint
    completion_window: Literal["24h"]
    # OpenAI's limits: 16 pairs, keys up to 64 characters, values up to 512.
    metadata: (
        Annotated[
            dict[Annotated[str, Field(max_length=64)], Annotated[str, Field(max_length=512)]],
            Field(max_length=16),
        ]
        | None
    ) = None
    output_expires_after: dict[str, Any] | None = None  # accepted; files here do not expire


def file_object(record: FileRecord) -> dict[str, Any]:
    return {  # no expires_at: files are kept until deleted
        "id": record.id,
        "object": "file",
        "bytes": record.bytes,
        "created_at": record.created_at,
        "filename": record.filename,
        "purpose": record.purpose,
        "status": "processed",
    }


def batch_object(record: BatchRecord, progress: Progress) -> dict[str, Any]:
    """OpenAI's batch object; fields not set yet (``failed_at``...) are left out, as
    OpenAI's schema has them as integers when present."""
    errors = None
    if record.errors:
        errors = {"object": "list", "data": [e.model_dump() for e in record.errors]}
    found = {
        "id": record.id,
        "object": "batch",
        "endpoint": record.endpoint,
        "model": record.model,
        "errors": errors,
        "input_file_id": record.input_file_id,
        "completion_window": record.completion_window,
        "status": record.status,
        "output_file_id": record.output_file_id,
        "error_file_id": record.error_file_id,
        "created_at": record.created_at,
        "in_progress_at": record.in_progress_at,
        "expires_at": record.expires_at,
        "finalizing_at": record.finalizing_at,
        "completed_at": record.completed_at,
        "failed_at": record.failed_at,
        "expired_at": record.expired_at,
        "cancelling_at": record.cancelling_at,
        "cancelled_at": record.cancelled_at,
        "request_counts": {
            "total": record.total,
            "completed": progress.completed,
            "failed": progress.failed,
        },
        "metadata": record.metadata,
        "usage": {
            "input_tokens": progress.input_tokens,
            "input_tokens_details": {"cached_tokens": progress.cached_tokens},
            "output_tokens": progress.output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": progress.input_tokens + progress.output_tokens,
        },
    }
    return {k: v for k, v in found.items() if v is not None}


def page(data: list[dict[str, Any]], *, has_more: bool) -> dict[str, Any]:
    """A list in OpenAI's cursor shape (``after`` is the last id of a page)."""
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }
