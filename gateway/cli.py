"""``lockgate`` command line: ``lockgate serve``, ``lockgate fetch-model``."""

from __future__ import annotations

import asyncio
import gc
import logging
from importlib import metadata
from pathlib import Path
from typing import Annotated

import typer

from backends.model_store import ModelFileError, resolve_model_path
from gateway import admin_cli, batch_cli, drift_cli, plan_cli
from gateway.settings import ConfigError, ModelSettings, Settings, load_settings

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="Lockgate: a local LLM inference gateway (OpenAI and Ollama APIs, tenants, fair queues).",
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.add_typer(admin_cli.tenants, name="tenants")
app.add_typer(admin_cli.keys, name="keys")
app.add_typer(admin_cli.models, name="models")
app.command("usage")(admin_cli.usage)
app.command("reload")(admin_cli.reload)
app.add_typer(batch_cli.batch, name="batch")
app.add_typer(drift_cli.drift, name="drift")
app.command("plan")(plan_cli.plan)
app.add_typer(plan_cli.quantize, name="quantize")


def _version(asked: bool) -> None:
    if asked:
        typer.echo(f"lockgate {metadata.version('lockgate')}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="print the version"),
    ] = False,
) -> None:
    """Lockgate: a local LLM inference gateway (OpenAI and Ollama APIs, tenants, fair queues)."""


ConfigOption = Annotated[
    Path | None,
    typer.Option("--config", "-c", help="YAML config file", exists=True, dir_okay=False),
]


def _settings(config: Path | None) -> Settings:
    try:
        return load_settings(config)
    except ConfigError as exc:
        typer.echo(f"lockgate: {exc}", err=True)
        raise typer.Exit(2) from None


def _model_name(path: Path) -> str:
    """``Qwen2.5-0.5B-Instruct-Q4_K_M.gguf`` → ``qwen2.5-0.5b-instruct-q4_k_m``."""
    return path.name.removesuffix(".gguf").lower()


def _prepare_models(settings: Settings) -> list[tuple[ModelSettings, Path]]:
    paths = []
    for model in settings.models:
        if not isinstance(model, ModelSettings):
            continue
        try:
            path = resolve_model_path(model.path)
        except ModelFileError as exc:
            typer.echo(f"lockgate: model '{model.name}': {exc}", err=True)
            raise typer.Exit(2) from None
        typer.echo(f"model '{model.name}': {path}", err=True)
        paths.append((model, path))
    return paths


def _refuse_what_cannot_fit(paths: list[tuple[ModelSettings, Path]]) -> None:
    """The embedded models' memory, planned from their GGUF headers, against what this
    process may allocate: refused with the numbers rather than failing inside llama.cpp."""
    from gateway.memory_plan import cannot_load

    problem = cannot_load(paths)
    if problem is not None:
        typer.echo(f"lockgate: {problem}", err=True)
        raise typer.Exit(2)


def _refuse_open_bind(settings: Settings) -> None:
    """No keys on a non-loopback address: say how to fix it, before anything starts."""
    from gateway.metrics import Metrics
    from gateway.tenancy.runtime import Tenancy, is_loopback, no_auth_message

    if is_loopback(settings.server.host):
        return

    async def needed() -> bool:
        tenancy = Tenancy(settings, Metrics())
        await tenancy.store.open()
        try:
            return await tenancy.auth_needed()
        finally:
            await tenancy.store.close()
            if tenancy.link is not None:
                await tenancy.link.close()

    if not asyncio.run(needed()):
        typer.echo(f"lockgate: {no_auth_message(settings.server.host)}", err=True)
        raise typer.Exit(2)


def _refuse_unwritable_log(settings: Settings) -> None:
    from gateway.request_log import RequestLog

    problem = RequestLog(settings.request_log).check()
    if problem is not None:
        typer.echo(f"lockgate: {problem}", err=True)
        raise typer.Exit(2)


@app.command()
def serve(
    config: ConfigOption = None,
    host: Annotated[str | None, typer.Option(help="bind address (default 127.0.0.1)")] = None,
    port: Annotated[int | None, typer.Option(help="port (default 8000)")] = None,
    model: Annotated[
        Path | None,
        typer.Option(
            help="serve this GGUF file (named after the file) instead of the configured models",
            dir_okay=False,
        ),
    ] = None,
    skip_memory_check: Annotated[
        bool, typer.Option(help="start even if the models' planned memory exceeds what is free")
    ] = False,
) -> None:
    """Start the gateway."""
    import uvicorn

    from gateway.app import create_app
    from gateway.drain import Drain, DrainingServer
    from gateway.http_server import limited_protocol

    def read() -> Settings:
        """The configuration as this command line makes it (also for a reload)."""
        settings = load_settings(config)
        server = settings.server.model_copy(
            update={k: v for k, v in {"host": host, "port": port}.items() if v is not None}
        )
        update: dict[str, object] = {"server": server}
        if model is not None:
            update["models"] = [ModelSettings(name=_model_name(model), path=str(model))]
        return settings.model_copy(update=update)

    try:
        settings = read()
    except ConfigError as exc:
        typer.echo(f"lockgate: {exc}", err=True)
        raise typer.Exit(2) from None
    server = settings.server
    logging.basicConfig(
        level=server.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    _refuse_open_bind(settings)
    _refuse_unwritable_log(settings)
    paths = _prepare_models(settings)
    if not skip_memory_check:
        _refuse_what_cannot_fit(paths)
    drain = Drain(server.drain_seconds)
    app = create_app(settings, drain=drain, reload_from=read, check_memory=not skip_memory_check)
    # What exists now (modules, schemas, the app) lives as long as the process: keep it
    # out of the collector's full scans, and collect young objects less often. Under 64
    # clients this took the gateway's p99 from 81-94 ms to 31-51 ms and its rate from
    # 2.0-2.2k to 2.4-2.8k requests/s (loadtests/bench_overhead.py, auth on).
    gc.freeze()
    gc.set_threshold(10_000, 50, 100)
    server_config = uvicorn.Config(
        app,
        host=server.host,
        port=server.port,
        loop="uvloop",
        http=limited_protocol(server),  # httptools, with wire limits
        timeout_keep_alive=server.keep_alive_timeout,
        log_level=server.log_level,
        access_log=False,
        # After the drain (which already waited for every request) only idle
        # connections are left to close.
        timeout_graceful_shutdown=2,
    )
    DrainingServer(server_config, drain).run()


@app.command("fetch-model")
def fetch_model(config: ConfigOption = None) -> None:
    """Assemble and verify the configured model files (no network)."""
    _prepare_models(_settings(config))


@app.command()
def openapi(config: ConfigOption = None) -> None:
    """Print the OpenAPI document of every route (JSON); nothing is started."""
    import orjson

    from gateway.app import create_app

    document = create_app(_settings(config)).openapi()
    typer.echo(orjson.dumps(document, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS).decode())
