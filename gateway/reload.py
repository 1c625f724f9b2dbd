"""Hot reload: the configuration read again and applied without a restart.

    reloader = Reloader(load, settings, fleet=..., router=..., tenancy=..., ...)
    report = await reloader.reload()     # or ConfigRefused, and nothing has changed

``SIGHUP`` and ``POST /admin/reload`` both come here; one reload runs at a time. The
new file is validated whole first — the schema, the instances' ids, that every new
embedded model's file exists and that the new engines fit the memory left beside the
running ones, that the request log can be written — and refused whole, with the key
named, if any of it fails: the old configuration goes on serving.

Then, in this order, without failing a request in flight:

- **models**: instances added, replaced (the new engine loads beside the old one, the
  registry switches, the old one closes once its requests have ended) or removed
  (no new requests, closed when idle): :mod:`gateway.fleet`;
- **routing**: settings, and the configured weights of instances whose weight changed
  (:meth:`gateway.router.Router.configure`);
- **scheduler**: queue limits (``max_queue``, ``max_queue_per_tenant``, ``max_wait``);
- **tenants**: the file's tenants, limits and keys written over the stored ones (a key
  that left the file is revoked), effective at once on this replica;
- **request_log**, **drift**, ``server.drain_seconds`` and ``server.log_level``.

Whatever else changed needs a restart (the listening address, wire limits, ``auth``,
``redis_url``, ``batches``, ``scheduler.policy``...): the report and the log name each
such key, and the rest still applies. With replicas, reload each (they share tenants
through Redis, but each reads its own file).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, SecretStr

from backends.model_store import ModelFileError, resolve_model_path
from gateway.drain import Drain
from gateway.drift import DriftTracker
from gateway.errors import ConfigRefused
from gateway.fleet import Change, Fleet, Outcome
from gateway.memory_plan import cannot_load
from gateway.outliers_redis import RedisBoard
from gateway.request_log import RequestLog
from gateway.router import Router
from gateway.service import InferenceService
from gateway.settings import ConfigError, ModelSettings, Settings
from gateway.tenancy.runtime import Tenancy

log = logging.getLogger(__name__)

# What a running gateway can change; every other key needs a restart.
_LIVE_SERVER = {"drain_seconds", "log_level"}
_LIVE_SCHEDULER = {"max_queue", "max_queue_per_tenant", "max_wait"}
_LIVE = {"models", "routing", "tenants", "request_log", "drift"}


@dataclass(slots=True)
class Report:
    """What a reload did (``POST /admin/reload`` answers it as JSON)."""

    applied: list[str] = field(default_factory=list)  # the keys that changed and apply
    restart_needed: list[str] = field(default_factory=list)  # changed, apply after a restart
    models: Outcome = field(default_factory=Outcome)

    def json(self) -> dict[str, Any]:
        return {"object": "reload", **asdict(self)}


def _plain(value: Any) -> Any:
    return value.get_secret_value() if isinstance(value, SecretStr) else value


def changed_keys(old: BaseModel, new: BaseModel, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ, one level into sub-models (never a value:
    some are secrets)."""
    keys = []
    for name in type(old).model_fields:
        a, b = getattr(old, name), getattr(new, name)
        if isinstance(a, BaseModel) and isinstance(b, BaseModel) and type(a) is type(b):
            keys += [f"{prefix}{name}.{k}" for k in _differing_fields(a, b)]
        elif _plain(a) != _plain(b):
            keys.append(f"{prefix}{name}")
    return keys


def _differing_fields(a: BaseModel, b: BaseModel) -> list[str]:
    return [n for n in type(a).model_fields if _plain(getattr(a, n)) != _plain(getattr(b, n))]


def _live(key: str) -> bool:
    section, _, rest = key.partition(".")
    if section == "server":
        return rest in _LIVE_SERVER
    if section == "scheduler":
        return rest in _LIVE_SCHEDULER
    return section in _LIVE


class Reloader:
    def __init__(
        self,
        load: Callable[[], Settings] | None,
        settings: Settings,
        *,
        fleet: Fleet,
        router: Router,
        tenancy: Tenancy,
        service: InferenceService,
        request_log: RequestLog,
        drain: Drain,
        board: RedisBoard | None = None,
        check_memory: bool = True,
    ) -> None:
        """``load`` reads the configuration as the server was started (its file, the
        environment, the command line's overrides); None: nothing to read again."""
        self.settings = settings
        self._load = load
        self._fleet = fleet
        self._router = router
        self._tenancy = tenancy
        self._service = service
        self._request_log = request_log
        self._drain = drain
        self._board = board
        self._check_memory = check_memory
        self._lock = asyncio.Lock()
        self._background: set[asyncio.Task[None]] = set()

    async def reload(self) -> Report:
        """Read the configuration again and apply it; ConfigRefused if it is refused."""
        async with self._lock:
            new = await self._read()
            change = self._plan(new)
            await self._check(new, change)
            return await self._apply(new, change)

    def reload_soon(self) -> None:
        """From a signal handler (SIGHUP): reload in the background and log how it went."""
        task = asyncio.get_running_loop().create_task(self._logged())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _logged(self) -> None:
        try:
            await self.reload()
        except ConfigRefused as exc:
            log.error("reload refused, the old configuration goes on serving: %s", exc.message)
        except Exception:
            log.exception("reload failed")

    async def stop(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)

    # -- the stages ------------------------------------------------------------------

    async def _read(self) -> Settings:
        if self._load is None:
            raise ConfigRefused("This gateway was given its settings; there is no file to read.")
        try:
            return await asyncio.to_thread(self._load)
        except ConfigError as exc:
            raise ConfigRefused(str(exc)) from None

    def _plan(self, new: Settings) -> Change:
        try:
            return self._fleet.plan(new.models)
        except ConfigError as exc:
            raise ConfigRefused(str(exc)) from None

    async def _check(self, new: Settings, change: Change) -> None:
        """Refuse what could not be applied before anything changes."""
        problem = RequestLog(new.request_log).check()
        if problem is not None:
            raise ConfigRefused(problem)
        loading = [
            (i, m)
            for i, m in enumerate(new.models)
            if isinstance(m, ModelSettings) and m in change.loading
        ]
        found: list[tuple[ModelSettings, Path]] = []
        for i, m in loading:
            try:
                path = await asyncio.to_thread(resolve_model_path, m.path, progress=False)
            except ModelFileError as exc:
                raise ConfigRefused(f"models.{i}.path: model '{m.name}': {exc}") from None
            found.append((m, path))
        if self._check_memory and found:
            problem = await asyncio.to_thread(cannot_load, found)
            if problem is not None:
                raise ConfigRefused(f"models: {problem}")

    async def _apply(self, new: Settings, change: Change) -> Report:
        old, report = self.settings, Report()
        for key in changed_keys(old, new):
            (report.applied if _live(key) else report.restart_needed).append(key)
        before = self._fleet.registry.instances()
        if not change.empty:
            report.models = await self._fleet.apply(change, drain_seconds=new.server.drain_seconds)
        after = self._fleet.registry.instances()
        self._router.configure(new.routing, before, after)
        if self._board is not None:
            self._board.share([m.pool for m in after if m.remote])
        self._fleet.resize(new.scheduler)
        await self._tenancy.reload(new)
        self._request_log.configure(new.request_log)
        self._reconfigure_drift(new)
        self._drain.seconds = new.server.drain_seconds
        if new.server.log_level != old.server.log_level:
            for name in ("", "uvicorn", "uvicorn.error"):
                logging.getLogger(name).setLevel(new.server.log_level.upper())
        self.settings = new
        self._log(report)
        return report

    def _reconfigure_drift(self, new: Settings) -> None:
        service = self._service
        if not new.drift.enabled:
            service.drift = None
        elif service.drift is None:
            service.drift = DriftTracker(new.drift)
        else:
            service.drift.configure(new.drift)

    def _log(self, report: Report) -> None:
        models = report.models
        done = ", ".join(
            f"{what} {', '.join(ids)}"
            for what, ids in (
                ("added", models.added),
                ("replaced", models.replaced),
                ("removed", models.removed),
            )
            if ids
        )
        log.info(
            "reloaded: %s%s",
            ", ".join(report.applied) or "nothing changed",
            f" (instances: {done})" if done else "",
        )
        for instance, why in models.failed.items():
            log.error("reload: instance %s not changed: %s", instance, why)
        if report.restart_needed:
            log.warning(
                "reload: these keys changed and apply only after a restart: %s",
                ", ".join(report.restart_needed),
            )
