"""``lockgate tenants|keys|usage``: the admin API from the command line.

They talk to a running gateway (``--url``, default ``$LOCKGATE_URL`` or
http://127.0.0.1:8000) with the admin key from ``$LOCKGATE_AUTH__ADMIN_KEY``, the
same variable the server reads. ``lockgate keys generate`` works offline: it
prints a new key and the hash to put in a config file.

    lockgate tenants create team-a --models gemma-3-270m --rpm 60 --with-key
"""

from __future__ import annotations

import json
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from typing import Annotated, Any, Literal, NoReturn

import typer

from gateway.tenancy.keys import key_hash, new_key

_ADMIN_HELP = (
    " Talks to a running gateway (--url, or $LOCKGATE_URL) with the admin key in"
    " $LOCKGATE_AUTH__ADMIN_KEY, the same variable the server reads."
)
_HELP = {"help_option_names": ["-h", "--help"]}
tenants = typer.Typer(
    no_args_is_help=True,
    help="Create, list, change and delete tenants." + _ADMIN_HELP,
    context_settings=_HELP,
)
models = typer.Typer(
    no_args_is_help=True,
    help="See each model's instances (tier, weight, health, load) and change weights."
    + _ADMIN_HELP,
    context_settings=_HELP,
)
keys = typer.Typer(
    no_args_is_help=True,
    help="Create, list, revoke and rotate API keys." + _ADMIN_HELP,
    context_settings=_HELP,
)

Url = Annotated[str, typer.Option(envvar="LOCKGATE_URL", help="the gateway's base URL")]
DEFAULT_URL = "http://127.0.0.1:8000"


def call(
    url: str,
    method: str,
    path: str,
    body: dict[str, Any] | None = None,
    *,
    timeout: float = 30.0,
    flags: bool = True,
) -> Any:
    """The admin API's answer; an error is printed (its fields named as ``flags`` when
    the message is about this command's flags) and exits 1."""
    admin_key = os.environ.get("LOCKGATE_AUTH__ADMIN_KEY")
    if not admin_key:
        typer.echo("lockgate: set LOCKGATE_AUTH__ADMIN_KEY to the gateway's admin key", err=True)
        raise typer.Exit(2)
    request = urllib.request.Request(  # noqa: S310 - the URL is the operator's own
        url.rstrip("/") + path,
        method=method,
        data=None if body is None else json.dumps(body).encode(),
        headers={"Authorization": f"Bearer {admin_key}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
            return json.load(response)
    except urllib.error.HTTPError as exc:
        try:
            message = json.load(exc)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = exc.reason
        typer.echo(f"lockgate: {exc.code}: {_in_flags(message) if flags else message}", err=True)
        raise typer.Exit(1) from None
    except urllib.error.URLError as exc:
        typer.echo(f"lockgate: cannot reach {url}: {exc.reason}", err=True)
        raise typer.Exit(1) from None


def _show(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2))


# The admin API's field names, as the flags that set them: an error names the flag.
_FLAGS = {
    "requests_per_minute": "--rpm",
    "tokens_per_minute": "--tpm",
    "max_concurrent": "--concurrency",
    "tokens_per_day": "--daily-tokens",
    "tokens_per_month": "--monthly-tokens",
    "grace_seconds": "--grace",
    "expires_in": "--expires-in",
    "model_limits": "--model-limit",
    "log_requests": "--log-requests",
}
_LIMIT_FLAGS = {
    "rpm": "requests_per_minute",
    "tpm": "tokens_per_minute",
    "concurrency": "max_concurrent",
    "daily_tokens": "tokens_per_day",
    "monthly_tokens": "tokens_per_month",
}


def _in_flags(message: str) -> str:
    for field, flag in _FLAGS.items():
        message = re.sub(rf"(\b[\w.-]+\.)?\b{field}\b", flag, message)
    return message


def _fail(message: str) -> NoReturn:
    typer.echo(f"lockgate: {message}", err=True)
    raise typer.Exit(2)


def duration(value: str | None, flag: str) -> float | None:
    """``30d``, ``12h``, ``15m``, ``45s`` or plain seconds."""
    if value is None:
        return None
    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhd]?)\s*", value.lower())
    if not found:
        _fail(f"{flag} must be a duration such as 30d, 12h, 15m, 45s or a number of seconds")
    unit = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[found.group(2)]
    return float(found.group(1)) * unit


def limit(value: str | None, flag: str) -> int | Literal["unset"] | None:
    """A limit flag: a whole number, ``none`` to clear it, or "unset" when not given."""
    if value is None:
        return "unset"
    if value.strip().lower() == "none":
        return None
    if not value.strip().isdigit():
        _fail(f"{flag} must be a whole number, or none to remove the limit")
    return int(value)


def _limits(given: dict[str, str | None]) -> dict[str, int | None]:
    """The limits named on the command line (``None``: remove that limit)."""
    out: dict[str, int | None] = {}
    for option, value in given.items():
        parsed = limit(value, "--" + option.replace("_", "-"))
        if parsed != "unset":
            out[_LIMIT_FLAGS[option]] = parsed
    return out


def _model_limits(specs: list[str] | None) -> dict[str, dict[str, int | None] | None]:
    """``--model-limit gemma:rpm=60,tpm=1000`` (repeatable); ``gemma:none`` removes them."""
    out: dict[str, dict[str, int | None] | None] = {}
    for spec in specs or ():
        model, sep, rest = spec.partition(":")
        if not sep or not model.strip() or not rest.strip():
            _fail(f"--model-limit {spec!r}: use MODEL:rpm=60,tpm=1000 (or MODEL:none)")
        if rest.strip().lower() == "none":
            out[model.strip()] = None
            continue
        given: dict[str, str | None] = {}
        for part in rest.split(","):
            name, eq, value = part.partition("=")
            name = name.strip().replace("-", "_")
            if not eq or name not in _LIMIT_FLAGS:
                _fail(
                    f"--model-limit {spec!r}: each limit is NAME=VALUE, NAME one of"
                    f" {', '.join(n.replace('_', '-') for n in _LIMIT_FLAGS)}"
                )
            given[name] = value
        out[model.strip()] = _limits(given)
    return out


def _fields(
    models: str | None,
    all_models: bool,
    priority: str | None,
    weight: float | None,
    log_requests: bool | None,
    spillover: bool | None = None,
) -> dict[str, Any]:
    """The tenant fields given on the command line, other than limits."""
    fields: dict[str, Any] = {}
    if all_models and models is not None:
        _fail("give --models or --all-models, not both")
    if all_models or models == "*":
        fields["models"] = None
    elif models is not None:
        listed = [m.strip() for m in models.split(",") if m.strip()]
        if not listed:
            _fail("--models is empty: name models (a,b), or use --all-models for every model")
        fields["models"] = listed
    if priority:
        fields["priority"] = priority
    if weight is not None:
        fields["weight"] = weight
    if log_requests is not None:
        fields["log_requests"] = log_requests
    if spillover is not None:
        fields["spillover"] = spillover
    return fields


_LIMIT_HELP = "; none removes it"
Rpm = Annotated[str | None, typer.Option(help="requests per minute" + _LIMIT_HELP)]
Tpm = Annotated[str | None, typer.Option(help="tokens per minute" + _LIMIT_HELP)]
Conc = Annotated[str | None, typer.Option(help="concurrent requests" + _LIMIT_HELP)]
Daily = Annotated[str | None, typer.Option(help="token budget per UTC day" + _LIMIT_HELP)]
Monthly = Annotated[str | None, typer.Option(help="token budget per month" + _LIMIT_HELP)]
Models = Annotated[
    str | None,
    typer.Option(help="comma-separated models it may use (not given: all, on create)"),
]
AllModels = Annotated[bool, typer.Option("--all-models", help="it may use every model")]
PriorityOpt = Annotated[
    str | None, typer.Option(help="interactive or batch (batch waits behind interactive)")
]
Weight = Annotated[
    float | None, typer.Option(min=0.001, max=1000, help="fair-share weight (default 1)")
]
LogRequests = Annotated[
    bool | None,
    typer.Option(
        "--log-requests/--no-log-requests",
        help="are its requests written to the request log (request_log in the config)",
        show_default=False,
    ),
]
Spillover = Annotated[
    bool | None,
    typer.Option(
        "--spillover/--no-spillover",
        help="may its requests go to a higher tier (a CPU twin) when tier 0 is busy",
        show_default=False,
    ),
]
ModelLimit = Annotated[
    list[str] | None,
    typer.Option(
        help="per-model limits, MODEL:rpm=60,tpm=1000,concurrency=2,daily-tokens=N,"
        "monthly-tokens=N (repeatable; MODEL:none removes them; a NAME=none removes one)"
    ),
]


def _without_removals(limits: dict[str, int | None]) -> dict[str, int]:
    return {k: v for k, v in limits.items() if v is not None}


@tenants.command("create")
def create_tenant(
    tenant_id: str,
    models: Models = None,
    all_models: AllModels = False,
    rpm: Rpm = None,
    tpm: Tpm = None,
    concurrency: Conc = None,
    daily_tokens: Daily = None,
    monthly_tokens: Monthly = None,
    model_limit: ModelLimit = None,
    priority: PriorityOpt = None,
    weight: Weight = None,
    log_requests: LogRequests = None,
    spillover: Spillover = None,
    with_key: Annotated[bool, typer.Option("--with-key", help="also create a key")] = False,
    url: Url = DEFAULT_URL,
) -> None:
    """Create a tenant (and, with --with-key, its first key)."""
    fields = _fields(models, all_models, priority, weight, log_requests, spillover)
    limits = _limits({
        "rpm": rpm, "tpm": tpm, "concurrency": concurrency,
        "daily_tokens": daily_tokens, "monthly_tokens": monthly_tokens,
    })  # fmt: skip
    per_model = {
        m: _without_removals(v) for m, v in _model_limits(model_limit).items() if v is not None
    }
    body = {"id": tenant_id, **fields, "limits": _without_removals(limits)}
    if per_model:
        body["model_limits"] = per_model
    out = {"tenant": call(url, "POST", "/admin/tenants", body)}
    if with_key:
        out["key"] = call(url, "POST", f"/admin/tenants/{tenant_id}/keys", {})
    _show(out)


@tenants.command("list")
def list_tenants(url: Url = DEFAULT_URL) -> None:
    """Every tenant, with its models and limits."""
    _show(call(url, "GET", "/admin/tenants")["data"])


@tenants.command("show")
def show_tenant(tenant_id: str, url: Url = DEFAULT_URL) -> None:
    """One tenant, with its models and limits."""
    _show(call(url, "GET", f"/admin/tenants/{tenant_id}"))


@tenants.command("update")
def update_tenant(
    tenant_id: str,
    models: Models = None,
    all_models: AllModels = False,
    rpm: Rpm = None,
    tpm: Tpm = None,
    concurrency: Conc = None,
    daily_tokens: Daily = None,
    monthly_tokens: Monthly = None,
    model_limit: ModelLimit = None,
    priority: PriorityOpt = None,
    weight: Weight = None,
    log_requests: LogRequests = None,
    spillover: Spillover = None,
    url: Url = DEFAULT_URL,
) -> None:
    """Change the given fields; everything else stays as it is (--rpm none removes a limit)."""
    body = _fields(models, all_models, priority, weight, log_requests, spillover)
    limits = _limits({
        "rpm": rpm, "tpm": tpm, "concurrency": concurrency,
        "daily_tokens": daily_tokens, "monthly_tokens": monthly_tokens,
    })  # fmt: skip
    per_model = _model_limits(model_limit)
    if limits or per_model:
        current = call(url, "GET", f"/admin/tenants/{tenant_id}")
        if limits:
            body["limits"] = _without_removals({**current["limits"], **limits})
        if per_model:
            merged = dict(current.get("model_limits") or {})
            for model, changes in per_model.items():
                if changes is None:
                    merged.pop(model, None)
                else:
                    merged[model] = _without_removals({**merged.get(model, {}), **changes})
            body["model_limits"] = merged
    _show(call(url, "PATCH", f"/admin/tenants/{tenant_id}", body))


@tenants.command("delete")
def delete_tenant(tenant_id: str, url: Url = DEFAULT_URL) -> None:
    """Delete a tenant and all its keys."""
    _show(call(url, "DELETE", f"/admin/tenants/{tenant_id}"))


@keys.command("create")
def create_key(
    tenant_id: str,
    name: Annotated[str | None, typer.Option(help="a label for the key")] = None,
    expires_in: Annotated[
        str | None, typer.Option(help="until it expires: 30d, 12h, 15m, 45s (default: never)")
    ] = None,
    url: Url = DEFAULT_URL,
) -> None:
    """Create a key; it is printed once and cannot be shown again."""
    body: dict[str, Any] = {"name": name, "expires_in": duration(expires_in, "--expires-in")}
    _show(call(url, "POST", f"/admin/tenants/{tenant_id}/keys", body))


@keys.command("list")
def list_keys(tenant_id: str, url: Url = DEFAULT_URL) -> None:
    """A tenant's keys (their ids, prefixes and expiry; never the keys themselves)."""
    _show(call(url, "GET", f"/admin/tenants/{tenant_id}/keys")["data"])


@keys.command("revoke")
def revoke_key(key_id: str, url: Url = DEFAULT_URL) -> None:
    """Stop a key working, at once."""
    _show(call(url, "POST", f"/admin/keys/{key_id}/revoke", {}))


@keys.command("rotate")
def rotate_key(
    key_id: str,
    grace: Annotated[
        str, typer.Option(help="how long the old key keeps working: 0, 15m, 12h, 1d")
    ] = "0",
    url: Url = DEFAULT_URL,
) -> None:
    """Replace a key with a new one (printed once) that expires when the old one would."""
    body = {"grace_seconds": duration(grace, "--grace")}
    _show(call(url, "POST", f"/admin/keys/{key_id}/rotate", body))


@models.command("status")
def models_status(url: Url = DEFAULT_URL) -> None:
    """Every model's instances: tier, weight, canary, state (ready, ejected...), load."""
    _show(call(url, "GET", "/admin/models")["data"])


@models.command("weight")
def models_weight(
    model: str,
    instance: str,
    weight: Annotated[float, typer.Argument(min=0, max=10_000, help="0 takes no new requests")],
    url: Url = DEFAULT_URL,
) -> None:
    """Change an instance's share of new requests now (a canary's, say); no restart."""
    quote = urllib.parse.quote
    path = f"/admin/models/{quote(model)}/instances/{quote(instance)}/weight"
    _show(call(url, "PUT", path, {"weight": weight}))


def reload(url: Url = DEFAULT_URL) -> None:
    """Make a running gateway read its config file again and apply it, without a restart.

    Prints what changed and what needs a restart; a file that does not validate is
    refused whole (exit 1, the key named) and the old configuration goes on serving.
    Sending the server SIGHUP does the same (the outcome is in its log). Needs the
    admin key in $LOCKGATE_AUTH__ADMIN_KEY.
    """
    # New embedded models load before the answer: allow for a large one.
    _show(call(url, "POST", "/admin/reload", timeout=600, flags=False))


@keys.command("generate")
def generate_key() -> None:
    """Offline: a new key and its hash, for a tenant's `keys:` in the config file."""
    key = new_key()
    _show({"key": key, "hash": key_hash(key)})


def usage(
    tenant: Annotated[str | None, typer.Option(help="only this tenant")] = None,
    model: Annotated[str | None, typer.Option(help="only this model")] = None,
    start: Annotated[str | None, typer.Option(help="ISO time (default: a day ago)")] = None,
    end: Annotated[str | None, typer.Option(help="ISO time (default: now)")] = None,
    url: Url = DEFAULT_URL,
) -> None:
    """Hourly usage per tenant, key and model, with totals.

    Talks to a running gateway (--url, or $LOCKGATE_URL) with the admin key in
    $LOCKGATE_AUTH__ADMIN_KEY.
    """
    query = {"tenant": tenant, "model": model, "start": start, "end": end}
    params = urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
    _show(call(url, "GET", "/admin/usage" + (f"?{params}" if params else "")))
