"""What the service tells the request log and the drift tracker about a finished request.

log_request(log, principal, plan, request, served, status, priority, body, text)
observe(drift, registry, plan, request, text)
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from gateway.drift import DriftTracker, features
from gateway.events import EmbedPlan, Plan
from gateway.registry import ModelRegistry, ServedModel
from gateway.request_log import RequestLog
from gateway.tenancy.records import Principal, Priority

if TYPE_CHECKING:
    from gateway.service import _Request


def log_request(
    log: RequestLog,
    principal: Principal,
    plan: Plan | EmbedPlan,
    request: _Request,
    served: ServedModel | None,
    status: int,
    priority: Priority,
    body: bytes | None,
    text: list[str] | None,
) -> None:
    """One line in the request log (gateway/request_log.py redacts it)."""
    prompt, completion = request.produced()
    t = request.timings()
    first = None if request.first_seen is None else request.first_seen - request.started
    log.record(
        {
            "request_id": plan.request_id,
            "tenant": principal.tenant.id,
            "key_id": principal.key_id,
            "model": request.model,
            "instance": None if served is None else served.public_id,
            "endpoint": plan.endpoint,
            "priority": priority,
            "stream": isinstance(plan, Plan) and plan.stream,
            "status": status,
            "finish_reason": [s.latest.finish_reason for s in request.streams] or None,
            "prompt_tokens": prompt,
            "completion_tokens": completion,
            "cached_tokens": request.cached(),
            "queued_ms": round(t.queued * 1000, 1),
            "ttft_ms": None if first is None else round(first * 1000, 1),
            "duration_ms": round(t.total * 1000, 1),
        },
        body=body,
        text=None if text is None else "".join(text),
    )


def observe(
    drift: DriftTracker, registry: ModelRegistry, plan: Plan, request: _Request, text: str
) -> None:
    """The drift features of a finished generation (its first choice)."""
    assert request.first_seen is not None
    first = request.streams[0].latest
    drift.observe(
        plan.model,
        drift.version(registry.instances_of(plan.model)),
        features(
            prompt_tokens=first.prompt_tokens,
            completion_tokens=first.completion_tokens,
            # The engine's (dispatch to first token): a queue's wait is load, not drift.
            ttft_seconds=request.first_seen - (request.dispatched or request.started),
            finish_reason=first.finish_reason,
            text=text,
            json_mode=plan.requests[0].response_format is not None,
            refusal=drift.refusal,
        ),
    )
