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
import urllib.error
import urllib.parse
import urllib.request
from typing import Annotated, Any

import typer

from gateway.tenancy.keys import key_hash, new_key

tenants = typer.Typer(no_args_is_help=True, help="Create, list, change and delete tenants")
keys = typer.Typer(no_args_is_help=True, help="Create, list, revoke and rotate API keys")

Url = Annotated[str, typer.Option(envvar="LOCKGATE_URL", help="the gateway's base URL")]
DEFAULT_URL = "http://127.0.0.1:8000"


def _call(url: str, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
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
        with urllib.request.urlopen(request, timeout=30) as response:  # noqa: S310
            return json.load(response)
    except urllib.error.HTTPError as exc:
        try:
            message = json.load(exc)["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = exc.reason
        typer.echo(f"lockgate: {exc.code}: {message}", err=True)
        raise typer.Exit(1) from None
    except urllib.error.URLError as exc:
        typer.echo(f"lockgate: cannot reach {url}: {exc.reason}", err=True)
        raise typer.Exit(1) from None


def _show(data: Any) -> None:
    typer.echo(json.dumps(data, indent=2))


def _fields(
    models: str | None, priority: str | None, weight: float | None, **limits: int | None
) -> tuple[dict[str, Any], dict[str, int]]:
    """The tenant fields and the limits given on the command line (``--models '*'``: all)."""
    names = {
        "rpm": "requests_per_minute",
        "tpm": "tokens_per_minute",
        "concurrency": "max_concurrent",
        "daily_tokens": "tokens_per_day",
        "monthly_tokens": "tokens_per_month",
    }
    fields: dict[str, Any] = {}
    if models is not None:
        listed = [m.strip() for m in models.split(",") if m.strip()]
        fields["models"] = None if models == "*" else listed
    if priority:
        fields["priority"] = priority
    if weight is not None:
        fields["weight"] = weight
    return fields, {names[k]: v for k, v in limits.items() if v is not None}


Rpm = Annotated[int | None, typer.Option(help="requests per minute")]
Tpm = Annotated[int | None, typer.Option(help="tokens per minute")]
Conc = Annotated[int | None, typer.Option(help="concurrent requests")]
Daily = Annotated[int | None, typer.Option(help="token budget per UTC day")]
Monthly = Annotated[int | None, typer.Option(help="token budget per month")]
Models = Annotated[
    str | None, typer.Option(help="comma-separated models it may use (default: all)")
]
PriorityOpt = Annotated[str | None, typer.Option(help="interactive or batch")]
Weight = Annotated[float | None, typer.Option(help="fair-share weight")]


@tenants.command("create")
def create_tenant(
    tenant_id: str,
    models: Models = None,
    rpm: Rpm = None,
    tpm: Tpm = None,
    concurrency: Conc = None,
    daily_tokens: Daily = None,
    monthly_tokens: Monthly = None,
    priority: PriorityOpt = None,
    weight: Weight = None,
    with_key: Annotated[bool, typer.Option("--with-key", help="also create a key")] = False,
    url: Url = DEFAULT_URL,
) -> None:
    """Create a tenant (and, with --with-key, its first key)."""
    fields, limits = _fields(
        models, priority, weight, rpm=rpm, tpm=tpm, concurrency=concurrency,
        daily_tokens=daily_tokens, monthly_tokens=monthly_tokens,
    )  # fmt: skip
    body = {"id": tenant_id, **fields, "limits": limits}
    out = {"tenant": _call(url, "POST", "/admin/tenants", body)}
    if with_key:
        out["key"] = _call(url, "POST", f"/admin/tenants/{tenant_id}/keys", {})
    _show(out)


@tenants.command("list")
def list_tenants(url: Url = DEFAULT_URL) -> None:
    _show(_call(url, "GET", "/admin/tenants")["data"])


@tenants.command("show")
def show_tenant(tenant_id: str, url: Url = DEFAULT_URL) -> None:
    _show(_call(url, "GET", f"/admin/tenants/{tenant_id}"))


@tenants.command("update")
def update_tenant(
    tenant_id: str,
    models: Models = None,
    rpm: Rpm = None,
    tpm: Tpm = None,
    concurrency: Conc = None,
    daily_tokens: Daily = None,
    monthly_tokens: Monthly = None,
    priority: PriorityOpt = None,
    weight: Weight = None,
    url: Url = DEFAULT_URL,
) -> None:
    """Change the given fields; other limits stay as they are."""
    body, limits = _fields(
        models, priority, weight, rpm=rpm, tpm=tpm, concurrency=concurrency,
        daily_tokens=daily_tokens, monthly_tokens=monthly_tokens,
    )  # fmt: skip
    if limits:
        current = _call(url, "GET", f"/admin/tenants/{tenant_id}")["limits"]
        body["limits"] = {**current, **limits}
    _show(_call(url, "PATCH", f"/admin/tenants/{tenant_id}", body))


@tenants.command("delete")
def delete_tenant(tenant_id: str, url: Url = DEFAULT_URL) -> None:
    """Delete a tenant and all its keys."""
    _show(_call(url, "DELETE", f"/admin/tenants/{tenant_id}"))


@keys.command("create")
def create_key(
    tenant_id: str,
    name: Annotated[str | None, typer.Option(help="a label for the key")] = None,
    expires_in: Annotated[float | None, typer.Option(help="seconds until it expires")] = None,
    url: Url = DEFAULT_URL,
) -> None:
    """Create a key; it is printed once and cannot be shown again."""
    body: dict[str, Any] = {"name": name, "expires_in": expires_in}
    _show(_call(url, "POST", f"/admin/tenants/{tenant_id}/keys", body))


@keys.command("list")
def list_keys(tenant_id: str, url: Url = DEFAULT_URL) -> None:
    _show(_call(url, "GET", f"/admin/tenants/{tenant_id}/keys")["data"])


@keys.command("revoke")
def revoke_key(key_id: str, url: Url = DEFAULT_URL) -> None:
    _show(_call(url, "POST", f"/admin/keys/{key_id}/revoke", {}))


@keys.command("rotate")
def rotate_key(
    key_id: str,
    grace: Annotated[float, typer.Option(help="seconds the old key keeps working")] = 0.0,
    url: Url = DEFAULT_URL,
) -> None:
    """Replace a key with a new one (printed once)."""
    _show(_call(url, "POST", f"/admin/keys/{key_id}/rotate", {"grace_seconds": grace}))


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
    """Hourly usage per tenant, key and model, with totals."""
    query = {"tenant": tenant, "model": model, "start": start, "end": end}
    params = urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
    _show(_call(url, "GET", "/admin/usage" + (f"?{params}" if params else "")))
