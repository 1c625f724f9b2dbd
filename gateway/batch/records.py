"""What the Files and Batch APIs store: a file's metadata, a batch, a finished line.

Stored as JSON (SQLite rows, Redis strings) and rendered to OpenAI's objects by
:mod:`gateway.protocol.batches`. A file's bytes live on disk (:mod:`gateway.batch.files`).
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict

FilePurpose = Literal["batch", "batch_output"]
BatchStatus = Literal[
    "validating",
    "failed",
    "in_progress",
    "finalizing",
    "completed",
    "expired",
    "cancelling",
    "cancelled",
]
BatchEndpoint = Literal["/v1/chat/completions", "/v1/completions", "/v1/embeddings"]
# A batch in one of these is somebody's work until it ends.
ACTIVE: frozenset[str] = frozenset({"validating", "in_progress", "finalizing", "cancelling"})


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FileRecord(_Record):
    id: str
    tenant: str
    filename: str
    purpose: FilePurpose
    bytes: int
    lines: int
    created_at: int


class BatchError(_Record):
    code: str
    message: str
    line: int | None = None  # 1-based, as OpenAI numbers them
    param: str | None = None


class BatchRecord(_Record):
    id: str
    tenant: str
    key_id: str
    endpoint: BatchEndpoint
    input_file_id: str
    completion_window: str
    status: BatchStatus
    created_at: int
    expires_at: int
    metadata: dict[str, str] | None = None
    model: str | None = None  # named by the lines; known once validated
    total: int = 0
    errors: list[BatchError] | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None

    @property
    def active(self) -> bool:
        return self.status in ACTIVE


class LineResult(_Record):
    """One input line's end, recorded once it is written to an output part."""

    line: int  # 0-based index in the input file
    ok: bool
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0


class Progress(_Record):
    """What the finished lines of a batch add up to."""

    completed: int = 0
    failed: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    cached_tokens: int = 0


class Claim(_Record):
    """A replica's lease on a batch: it alone works on it while it renews the lease."""

    batch_id: str
    owner: str
    generation: int  # raised by every claim; names the claim's output parts
