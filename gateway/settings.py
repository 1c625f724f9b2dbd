"""Configuration: a YAML file plus ``LOCKGATE_*`` environment overrides.

Environment variables win over the file; nested keys use ``__`` and list entries
their index (``LOCKGATE_SERVER__PORT=9000``, ``LOCKGATE_MODELS__0__MAX_SEQUENCES=4``
changes that key of the first model and keeps the rest of its entry; a JSON value
replaces a whole list or mapping). Unknown keys are errors, and every error names
the key it is about, and the variable when one set it::

    settings = load_settings(Path("configs/default.yaml"))
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, get_args

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    SecretStr,
    Tag,
    ValidationError,
    model_validator,
)

from backends.llama.templates import BuiltinTemplate
from gateway.tenancy.records import ConfiguredTenant
from gateway.validation import problems


class ConfigError(Exception):
    """The configuration is invalid; the message names the offending key."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ServerSettings(_Strict):
    host: str = "127.0.0.1"
    port: Annotated[int, Field(ge=1, le=65535)] = 8000
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    # One line per request on the `lockgate.access` logger (gateway/access.py), at info.
    # (YAML reads a bare `off` as false: that means off too.)
    access_log: Annotated[
        Literal["text", "json", "off"], BeforeValidator(lambda v: "off" if v is False else v)
    ] = "text"
    max_body_bytes: Annotated[int, Field(ge=1024)] = 16 * 1024 * 1024
    # Wire limits (gateway/http_server.py): past them 431, 414, 408 or 503, then closed.
    max_header_bytes: Annotated[int, Field(ge=1024, le=1 << 20)] = 32 * 1024
    max_headers: Annotated[int, Field(ge=8, le=1000)] = 100
    max_request_line: Annotated[int, Field(ge=256, le=1 << 20)] = 8 * 1024
    header_timeout: Annotated[float, Field(gt=0, le=600)] = 10.0  # the whole head
    body_timeout: Annotated[float, Field(gt=0, le=3600)] = 30.0  # between body reads
    keep_alive_timeout: Annotated[int, Field(ge=1, le=3600)] = 5  # s idle between requests
    max_connections: Annotated[int, Field(ge=1, le=1_000_000)] = 2048
    # SIGTERM: requests inside get this long to finish, then are cut (gateway/drain.py).
    drain_seconds: Annotated[float, Field(ge=0, le=3600)] = 30.0


InstanceId = Annotated[str, Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")]


class _Instance(_Strict):
    """What the router needs of every entry (several entries may share a ``name``)."""

    name: Annotated[str, Field(min_length=1)]
    # In x-lockgate-backend, metrics and the admin API; default: the backend kind, numbered
    # among the name's instances of that kind (embedded, llamacpp-0...), never a URL.
    id: InstanceId | None = None
    tier: Annotated[int, Field(ge=0, le=9)] = 0  # 0: primary; higher tiers take spillover
    weight: Annotated[float, Field(ge=0, le=10_000)] = 100.0  # share among equals
    canary: bool = False  # compared with the tier's others; weight 0 when worse


class ModelSettings(_Instance):
    """A public model name served by the embedded llama.cpp engine."""

    backend: Literal["embedded"] = "embedded"
    path: str | None = None  # None: the packaged default (Gemma 3 270M Q4_K_M)
    n_ctx: Annotated[int, Field(ge=32, le=1 << 20)] = 2048  # per sequence
    max_sequences: Annotated[int, Field(ge=1, le=256)] = 16
    threads: Annotated[int, Field(ge=1, le=512)] | None = None
    template: BuiltinTemplate | None = None
    prefill_chunk: Annotated[int, Field(ge=16, le=8192)] = 256
    # Of prefill_chunk, the most batch-priority prompts may take in one step (README:
    # Offline batches): what a chat request arriving mid-step waits for stays short.
    background_prefill: Annotated[int, Field(ge=1, le=8192)] = 64
    max_n: Annotated[int, Field(ge=1, le=128)] = 1
    # top-k when a request sets none; 40 is llama.cpp's and Ollama's default. Sampling
    # the full 262k-token Gemma vocabulary costs ~25% of decode throughput; 0 disables.
    default_top_k: Annotated[int, Field(ge=0)] = 40
    # Prompt prefixes decoded once and shared: "shared" whoever sends them (identical
    # tokens only), "per_tenant" within a tenant, "off" (README: Prefix caching).
    # (YAML reads a bare off as false and on as true: "off" and "shared".)
    prefix_cache: Annotated[
        Literal["shared", "per_tenant", "off"],
        BeforeValidator(lambda v: "off" if v is False else "shared" if v is True else v),
    ] = "shared"


RemoteBackend = Literal["openai", "vllm", "llamacpp", "ollama"]
REMOTE_BACKENDS: tuple[str, ...] = get_args(RemoteBackend)


class RemoteModelSettings(_Instance):
    """A public model name served by an upstream server.

    ``openai``: any OpenAI-compatible server; ``vllm`` and ``llamacpp`` add their
    own health and load signals; ``ollama`` speaks Ollama's native API.
    """

    backend: RemoteBackend
    base_url: Annotated[str, Field(pattern=r"^https?://")]
    upstream_model: str | None = None  # the upstream's name for it; default: `name`
    # The *name* of an environment variable holding the upstream key, so that
    # configs can live in git; the key itself is never written to a file or a log.
    api_key_env: str | None = None
    concurrency: Annotated[int, Field(ge=1, le=4096)] = 8
    connect_timeout: Annotated[float, Field(gt=0)] = 5.0
    first_token_timeout: Annotated[float, Field(gt=0)] = 120.0
    chunk_timeout: Annotated[float, Field(gt=0)] = 60.0
    # A non-streamed request is one upstream call with no chunks to time: its whole answer.
    request_timeout: Annotated[float, Field(gt=0)] = 600.0
    health_interval: Annotated[float, Field(gt=0)] = 5.0
    # Ollama: the context to request on every call (it truncates silently without one)
    # and how long it keeps the model loaded.
    num_ctx: Annotated[int, Field(ge=256)] = 4096
    keep_alive: str | int = "5m"
    max_n: Annotated[int, Field(ge=1, le=128)] = 1

    @property
    def upstream(self) -> str:
        return self.upstream_model or self.name


class FakeModelSettings(_Instance):
    """A public model name served by the fake backend (``backends/fake.py``), for tests of
    everything above the engine in a real server: the name's prefix picks the behaviour
    (``echo``, ``slow``, ``fail_before_first``, ``fail_mid_stream``, ``overloaded``);
    ``behaviour`` sets it for any name (an instance of a shared name that fails)."""

    backend: Literal["fake"]
    behaviour: (
        Literal["echo", "slow", "fail_before_first", "fail_mid_stream", "overloaded"] | None
    ) = None
    delay: Annotated[float, Field(ge=0, le=60)] = 0.05  # per word, for ``slow``
    capacity: Annotated[int, Field(ge=1, le=4096)] = 8
    context_length: Annotated[int, Field(ge=2)] = 4096
    max_n: Annotated[int, Field(ge=1, le=128)] = 1


AnyModelSettings = ModelSettings | RemoteModelSettings | FakeModelSettings


def _state_dir() -> Path:
    base = os.environ.get("XDG_STATE_HOME") or str(Path.home() / ".local" / "state")
    return Path(base) / "lockgate"


class AuthSettings(_Strict):
    """API keys, limits and the usage ledger.

    Auth is on whenever tenants exist (here or in the store) or an admin key is set;
    with neither, the gateway serves only on a loopback address, without keys.
    """

    # Protects /admin/*; from LOCKGATE_AUTH__ADMIN_KEY (or the file). No default, ever.
    admin_key: Annotated[SecretStr, Field(min_length=32)] | None = None
    # The SQLite file for tenants, keys and usage when no redis_url is set.
    database: Path = Field(default_factory=lambda: _state_dir() / "lockgate.db")
    # How long a key lookup is trusted: the delay for a revocation made elsewhere.
    cache_ttl: Annotated[float, Field(ge=0, le=300)] = 2.0
    # With Redis down, keys seen within this long still authenticate; others get 503.
    outage_grace: Annotated[float, Field(ge=0, le=3600)] = 60.0
    # With Redis down: refuse (503), or enforce the same limits per replica.
    limits_on_redis_outage: Literal["fail_closed", "fail_open"] = "fail_closed"
    tenant_label_cap: Annotated[int, Field(ge=0, le=10_000)] = 100
    # Slot leases in Redis: a replica that dies frees its concurrency slots this fast.
    concurrency_lease: Annotated[float, Field(ge=3, le=3600)] = 30.0


class RoutingSettings(_Strict):
    """How a request picks among a model's instances (``gateway/routing.py``)."""

    # Expected wait (s) in tier 0 past which a request may go to a higher tier.
    spill_after: Annotated[float, Field(ge=0, le=3600)] = 2.0
    # Tries on another instance, before the first token only; at most retry_budget of the
    # requests in flight are retries, but always min_retry_concurrency (Envoy's defaults).
    retries: Annotated[int, Field(ge=0, le=5)] = 1
    retry_budget: Annotated[float, Field(ge=0, le=1)] = 0.2
    min_retry_concurrency: Annotated[int, Field(ge=0, le=1000)] = 3
    # Consecutive failures that eject an instance for eject_seconds times the times ejected.
    eject_after: Annotated[int, Field(ge=1, le=1000)] = 5
    eject_seconds: Annotated[float, Field(gt=0, le=3600)] = 30.0
    # prefix: a prompt's first affinity_chars pick its instance; session: `user` or
    # x-session-id; none: least wait only.
    affinity: Literal["prefix", "session", "none"] = "prefix"
    affinity_chars: Annotated[int, Field(ge=16, le=1 << 20)] = 1024
    load_bound: Annotated[float, Field(ge=1, le=10)] = 1.25
    # A canary is rolled back (weight 0) when, over the window, with at least min requests,
    # its error rate exceeds the others' by error_margin or its TTFT p95 by ttft_ratio.
    canary_window: Annotated[float, Field(gt=0, le=86400)] = 300.0
    canary_min_requests: Annotated[int, Field(ge=1)] = 50
    canary_error_margin: Annotated[float, Field(ge=0, le=1)] = 0.05
    canary_ttft_ratio: Annotated[float, Field(ge=1)] = 1.5


class SchedulerSettings(_Strict):
    """The queue in front of every backend's slots (``gateway/scheduler``).

    Each backend instance has slots (the embedded engine's ``max_sequences``,
    llama-server's slots, a remote model's ``concurrency``); requests beyond them
    wait here, interactive before batch, then by each tenant's weighted service.
    """

    # fair: priority, then the tenant with the least weighted service (VTC).
    # fcfs: arrival order, as llama-server and Ollama queue (for comparison).
    policy: Literal["fair", "fcfs"] = "fair"
    max_queue: Annotated[int, Field(ge=0, le=100_000)] = 256  # per model → then 503
    max_queue_per_tenant: Annotated[int, Field(ge=0, le=100_000)] = 64  # → then 429
    max_wait: Annotated[float, Field(gt=0, le=3600)] = 30.0  # seconds queued → then 503
    # With redis_url: a replica that dies gives its slots and queued requests back this fast.
    lease_ttl: Annotated[float, Field(ge=1, le=600)] = 10.0


class BatchSettings(_Strict):
    """Offline batches (``/v1/files``, ``/v1/batches``; ``gateway/batch``)."""

    # Uploaded and produced files. Replicas sharing Redis must share this directory too.
    files_dir: Path = Field(default_factory=lambda: _state_dir() / "files")
    # Batches, leases and finished lines when no redis_url is set.
    database: Path = Field(default_factory=lambda: _state_dir() / "batches.db")
    max_file_bytes: Annotated[int, Field(ge=1024, le=1 << 40)] = 200 * 1024 * 1024
    max_file_lines: Annotated[int, Field(ge=1, le=10_000_000)] = 50_000
    # A replica renews its claim on a batch every third of this; dead, it loses it after.
    lease_seconds: Annotated[float, Field(ge=1, le=3600)] = 30.0
    poll_seconds: Annotated[float, Field(gt=0, le=600)] = 1.0
    max_active: Annotated[int, Field(ge=1, le=1000)] = 4  # batches per replica at once
    # Slots per model that batch lines leave free, so interactive requests never wait.
    interactive_reserve: Annotated[int, Field(ge=0, le=10_000)] = 2
    enabled: bool = True  # off: this replica serves the APIs but runs no batch lines


def _compiles(patterns: list[str]) -> list[str]:
    for pattern in patterns:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"{pattern!r} is not a valid regular expression: {exc}") from None
    return patterns


# Linear: a match starts only where a run of address characters starts.
EMAIL = (
    r"(?<![A-Za-z0-9._%+-])[A-Za-z0-9._%+-]{1,64}"
    r"@[A-Za-z0-9-]{1,63}(?:\.[A-Za-z0-9-]{1,63}){1,8}"
)
CARD_NUMBER = r"\b(?:\d[ -]?){12,18}\d\b"  # 13 to 19 digits, spaces or dashes between


class RequestLogSettings(_Strict):
    """Per-request JSON lines for tenants with ``log_requests`` (gateway/request_log.py)."""

    path: str | None = None  # a file (rotated by size), "-" for stdout; None: off
    max_bytes: Annotated[int, Field(ge=1024)] = 100 * 1024 * 1024  # then rotated
    backups: Annotated[int, Field(ge=0, le=1000)] = 5  # rotated files kept
    bodies: bool = False  # the request as sent and the text generated, redacted
    max_body_chars: Annotated[int, Field(ge=0, le=10_000_000)] = 4096
    sample_rate: Annotated[float, Field(ge=0, le=1)] = 1.0
    # Replaced by [REDACTED] in every field (keys and bearer tokens always are).
    redact: Annotated[list[str], AfterValidator(_compiles)] = [EMAIL, CARD_NUMBER]


REFUSAL = (
    r"(?i)\b(?:I can(?:no|')t (?:help|assist|do|provide)|I'm (?:sorry|unable)|"
    r"I am (?:sorry|unable)|as an AI\b)"
)


class DriftSettings(_Strict):
    """Drift signals per model (gateway/drift.py; README: Drift)."""

    enabled: bool = True
    reference: Annotated[int, Field(ge=10, le=100_000)] = 500  # first requests of a version
    window: Annotated[int, Field(ge=10, le=100_000)] = 500  # the latest requests
    min_requests: Annotated[int, Field(ge=10, le=100_000)] = 100  # in both, before any score
    # An answer whose first 200 characters match counts as a refusal.
    refusal_pattern: Annotated[str, AfterValidator(lambda p: _compiles([p])[0])] = REFUSAL

    @model_validator(mode="after")
    def _windows_hold_enough(self) -> DriftSettings:
        if self.min_requests > min(self.reference, self.window):
            raise ValueError(
                f"min_requests ({self.min_requests}) must be at most reference and window"
                f" ({self.reference}, {self.window}): no score could ever be computed"
            )
        return self


def _redis_scheme(url: SecretStr) -> SecretStr:
    # A secret (it may hold a password), so the message never repeats it.
    value = url.get_secret_value()
    if not value.startswith(("redis://", "rediss://", "unix://")):
        raise ValueError("must start with redis://, rediss:// or unix://")
    if "?" in value:  # both clients must reach the same database: the number goes in the path
        raise ValueError("query parameters are not supported; put the db in the path (/1)")
    return url


def _entry_kind(value: Any) -> str | None:
    backend = value.get("backend", "embedded") if isinstance(value, dict) else value.backend
    if backend in ("embedded", "fake"):
        return str(backend)
    return "remote" if backend in REMOTE_BACKENDS else None


# `backend` may be left out for the embedded engine, hence a callable discriminator.
_ENTRY_TAGS = ("embedded", "remote", "fake")
BACKENDS = ("embedded", *REMOTE_BACKENDS, "fake")
ModelEntry = Annotated[
    Annotated[ModelSettings, Tag("embedded")]
    | Annotated[RemoteModelSettings, Tag("remote")]
    | Annotated[FakeModelSettings, Tag("fake")],
    Discriminator(
        _entry_kind,
        custom_error_type="invalid_backend",
        custom_error_message=f"backend must be one of: {', '.join(BACKENDS)}",
    ),
]


class Settings(_Strict):
    server: ServerSettings = ServerSettings()
    # The same as configs/default.yaml, so `lockgate serve` without --config matches it.
    # Several entries may share a name: requests go to the first healthy one.
    models: Annotated[list[ModelEntry], Field(min_length=1)] = [
        ModelSettings(name="gemma-3-270m", max_n=4)
    ]
    auth: AuthSettings = AuthSettings()
    scheduler: SchedulerSettings = SchedulerSettings()
    routing: RoutingSettings = RoutingSettings()
    batches: BatchSettings = BatchSettings()
    request_log: RequestLogSettings = RequestLogSettings()
    drift: DriftSettings = DriftSettings()
    tenants: list[ConfiguredTenant] = []
    # Shared state for several replicas: tenants, keys, usage, counters, remote models' queues.
    redis_url: Annotated[SecretStr, AfterValidator(_redis_scheme)] | None = None
    redis_timeout: Annotated[float, Field(gt=0, le=10)] = 0.25

    @model_validator(mode="after")
    def _unique_tenants(self) -> Settings:
        ids = [t.id for t in self.tenants]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise ValueError(f"tenant ids must be unique: {', '.join(dupes)}")
        key_ids = [k.id for t in self.tenants for k in t.keys]
        if len(key_ids) != len(set(key_ids)):
            raise ValueError("key ids must be unique across tenants")
        return self

    @model_validator(mode="after")
    def _unique_instance_ids(self) -> Settings:
        seen: set[tuple[str, str]] = set()
        for m in self.models:
            if m.id is not None:
                if (m.name, m.id) in seen:
                    raise ValueError(f"model '{m.name}': instance id '{m.id}' is used twice")
                seen.add((m.name, m.id))
        return self

    @model_validator(mode="after")
    def _api_keys_exist(self) -> Settings:
        for m in self.models:
            key_env = m.api_key_env if isinstance(m, RemoteModelSettings) else None
            if key_env and not os.environ.get(key_env):
                raise ValueError(
                    f"model '{m.name}': environment variable {key_env} (api_key_env) is not set"
                )
        return self


def environment_overrides(
    data: dict[str, Any], environ: Mapping[str, str]
) -> tuple[dict[str, Any], dict[str, str]]:
    """``data`` with every ``LOCKGATE_<FIELD>__...`` variable applied, and which variable
    set which dotted key. Variables that name no top-level field (``LOCKGATE_URL``, for
    the admin CLI) are not configuration and are left alone."""
    out: dict[str, Any] = json.loads(json.dumps(data, default=str))  # a deep copy
    origins: dict[str, str] = {}
    for name in sorted(environ):
        if not name.startswith(_ENV_PREFIX):
            continue
        path = name[len(_ENV_PREFIX) :].lower().split("__")
        if path[0] not in Settings.model_fields or "" in path:
            continue
        raw = environ[name]
        value: Any = raw
        if raw.lstrip().startswith(("[", "{")):  # a whole list or mapping, as JSON
            try:
                value = json.loads(raw)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{name} is not valid JSON: {exc.msg} at {exc.pos}") from None
        _put(out, path, value, name)
        origins[".".join(path)] = name
    return out, origins


def _put(data: dict[str, Any], path: list[str], value: Any, name: str) -> None:
    node: Any = data
    for depth, part in enumerate(path[:-1]):
        following = path[depth + 1]
        if isinstance(node, list):
            node = node[_index(node, part, name, path[:depth])]
            if not isinstance(node, dict | list):
                where = ".".join(path[: depth + 1])
                raise ConfigError(f"{name}: {where} is not a mapping, so it has no {following}")
            continue
        child = node.get(part)
        if child is None and following.isdigit():
            child = node[part] = _default_list(path[: depth + 1])
        elif not isinstance(child, dict | list):
            child = node[part] = {}
        node = child
    last = path[-1]
    if isinstance(node, list):
        node[_index(node, last, name, path[:-1])] = value
    else:
        node[last] = value


def _index(entries: list[Any], part: str, name: str, where: list[str]) -> int:
    key = ".".join(where)
    if not (part.isascii() and part.isdigit()):
        raise ConfigError(f"{name}: {key} is a list; use an index ({key.upper()}__0__...)")
    if int(part) >= len(entries):
        raise ConfigError(f"{name}: {key} has no entry {part} (it has {len(entries)})")
    return int(part)


def _default_list(path: list[str]) -> list[Any]:
    """The built-in value of a top-level list, as plain data, for an indexed override."""
    if len(path) != 1:
        return []
    default = Settings.model_fields[path[0]].default
    if not isinstance(default, list):
        return []
    return [d.model_dump(exclude_unset=True) if isinstance(d, BaseModel) else d for d in default]


_ENV_PREFIX = "LOCKGATE_"


def load_settings(path: Path | None, environ: Mapping[str, str] | None = None) -> Settings:
    """Read ``path`` (if any), apply the environment, validate everything."""
    data: Any = {}
    source = str(path) if path else "the built-in defaults"
    if path is not None:
        try:
            text = path.read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read config {path}: {exc.strerror}") from None
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as exc:
            mark = getattr(exc, "problem_mark", None)
            where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
            what = getattr(exc, "problem", None) or str(exc)
            raise ConfigError(f"{where}: not valid YAML: {what}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a mapping")
    data, origins = environment_overrides(data, os.environ if environ is None else environ)
    try:
        return Settings(**data)
    except ValidationError as exc:
        # The union's tag is an implementation detail: models.0.remote.port → models.0.port
        lines = []
        for key, message in problems(exc, drop=_ENTRY_TAGS):
            variable = _origin(key, origins)
            where = f"{key} (from {variable})" if variable else key or "(top level)"
            lines.append(f"  {where}: {message}")
        if origins:
            source += " and the environment"
        raise ConfigError(f"invalid configuration in {source}:\n" + "\n".join(lines)) from None


def _origin(key: str, origins: Mapping[str, str]) -> str | None:
    """The variable that set ``key`` or a key above it."""
    parts = key.split(".")
    for n in range(len(parts), 0, -1):
        found = origins.get(".".join(parts[:n]))
        if found:
            return found
    return None
