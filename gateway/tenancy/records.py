"""What a tenant is: its models, limits, priority, and the keys that belong to it.

These models are the config file's ``tenants:`` entries, the admin API's bodies
and the stored JSON, all at once, so the three cannot drift apart.

    Tenant(id="team-a", models=["gemma-3-270m"], limits=Limits(requests_per_minute=60))
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field

# Ids become parts of storage keys and metric labels: keep them plain.
TenantId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]
Priority = Literal["interactive", "batch"]
PositiveInt = Annotated[int, Field(ge=1)]


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Limits(_Record):
    """Every limit is optional; ``None`` means unlimited.

    Rates are token buckets refilled evenly over the minute (a burst of the whole
    minute's allowance is allowed once). Budgets count prompt + completion tokens per
    UTC day and calendar month.
    """

    requests_per_minute: PositiveInt | None = None
    tokens_per_minute: PositiveInt | None = None
    max_concurrent: PositiveInt | None = None
    tokens_per_day: PositiveInt | None = None
    tokens_per_month: PositiveInt | None = None

    @property
    def empty(self) -> bool:
        return all(v is None for v in self.model_dump().values())


class Tenant(_Record):
    id: TenantId
    models: list[str] | None = None  # None: every model
    limits: Limits = Limits()
    # Limits on one model's traffic, checked in addition to the tenant-wide ones.
    model_limits: dict[str, Limits] = {}
    priority: Priority = "interactive"
    weight: Annotated[float, Field(gt=0, le=1000)] = 1.0
    log_requests: bool = False  # are its requests written to the request log (request_log)?
    spillover: bool = True  # may its requests go to a higher tier (a CPU twin) when tier 0 is busy?

    def allows(self, model: str) -> bool:
        return self.models is None or model in self.models


class KeyRecord(_Record):
    """A key as stored: never the key itself, only its hash."""

    id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    tenant: TenantId
    hash: Annotated[str, Field(pattern=r"^sha256:[0-9a-f]{64}$")]
    name: str | None = None
    prefix: str = ""  # the first characters, to recognise a key in listings
    created_at: float = 0.0
    expires_at: float | None = None  # Unix time
    revoked_at: float | None = None

    def usable(self, now: float) -> bool:
        return self.revoked_at is None and (self.expires_at is None or now < self.expires_at)


class ConfiguredKey(_Record):
    """A key declared in the config file (GitOps): its hash, from ``lockgate keys generate``."""

    id: Annotated[str, Field(pattern=r"^[A-Za-z0-9_.-]{1,64}$")]
    hash: Annotated[str, Field(pattern=r"^sha256:[0-9a-f]{64}$")]
    expires_at: datetime | None = None


class ConfiguredTenant(Tenant):
    keys: list[ConfiguredKey] = []

    def tenant(self) -> Tenant:
        return Tenant(**self.model_dump(exclude={"keys"}))

    def key_records(self) -> list[KeyRecord]:
        return [
            KeyRecord(
                id=k.id,
                tenant=self.id,
                hash=k.hash,
                name="config",
                expires_at=k.expires_at.timestamp() if k.expires_at else None,
            )
            for k in self.keys
        ]


class Principal(_Record):
    """Who is calling: the tenant and the key they used."""

    tenant: Tenant
    key_id: str


ANONYMOUS = Principal(tenant=Tenant(id="anonymous"), key_id="-")
