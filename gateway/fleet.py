"""The configured model instances: built, started, and changed by a reload.

    fleet = Fleet.from_settings(settings.models, settings.scheduler, local=s, shared=s, created=t)
    await fleet.start()                  # every backend at once; the registry serves them
    change = fleet.plan(new.models)      # what a reload would do (ConfigError if it cannot)
    report = await fleet.apply(change, drain_seconds=30)
    await fleet.close()

An instance is known by its model name and public id (``gemma`` / ``embedded``). A
reload compares the configured entries by that key: a new key is built and started,
then added; a key whose settings changed gets a new backend, started *beside* the old
one, and the registry switches to it once it is ready (if it cannot load, the old one
goes on serving and the report says why); a key that left the file stops taking
requests at once. Replaced and removed instances are *retired*: closed once the last
request placed on them has ended (:class:`gateway.registry.InUse`), or at
``drain_seconds``, whichever comes first. A replaced instance keeps its scheduler pool
(its name is the same), so requests already queued keep their place.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from backends.base import Backend
from backends.fake import FakeBackend
from backends.llama.backend import EmbeddedBackend
from gateway.memory_plan import embedded_config
from gateway.registry import ModelRegistry, ServedModel
from gateway.remote import build_remote_backend
from gateway.scheduler.base import PoolLimits, Scheduler
from gateway.settings import (
    AnyModelSettings,
    ConfigError,
    FakeModelSettings,
    ModelSettings,
    RemoteModelSettings,
    SchedulerSettings,
)

log = logging.getLogger(__name__)

Key = tuple[str, str]  # (model name, public id)


def build_backend(model: AnyModelSettings) -> Backend:
    if isinstance(model, ModelSettings):
        return EmbeddedBackend(embedded_config(model))
    if isinstance(model, FakeModelSettings):
        return FakeBackend(
            model.behaviour or model.name,
            context_length=model.context_length,
            delay=model.delay,
            capacity=model.capacity,
        )
    return build_remote_backend(model)


def public_ids(models: Sequence[AnyModelSettings]) -> list[str]:
    """What clients are told served them: the configured ``id``, else the backend kind —
    numbered among a name's remote instances (``llamacpp-0``), and from the second on
    among its local ones (``embedded``, ``embedded-1``) — never an upstream's URL."""
    remote: dict[str, int] = {}
    local: dict[tuple[str, str], int] = {}
    ids: list[str] = []
    for m in models:
        if m.id is not None:
            ids.append(m.id)
        elif isinstance(m, ModelSettings | FakeModelSettings):
            n = local.get((m.name, m.backend), 0)
            local[m.name, m.backend] = n + 1
            ids.append(m.backend if n == 0 else f"{m.backend}-{n}")
        else:
            n = remote.get(m.name, 0)
            remote[m.name] = n + 1
            ids.append(f"{m.backend}-{n}")
    seen: set[tuple[str, str]] = set()
    for m, id in zip(models, ids, strict=True):
        if (m.name, id) in seen:  # a configured id equal to a generated one
            raise ConfigError(
                f"model '{m.name}': two instances would both be '{id}'; give each an `id`"
            )
        seen.add((m.name, id))
    return ids


def _kind(m: ServedModel) -> str:
    """What a newcomer needs to know of a loaded model: a base model garbles chats."""
    info = m.backend.describe()
    facts = [f for f in (info.family, info.quantization) if f]
    if info.parameters:
        facts.append(f"{info.parameters / 1e6:,.0f}M parameters")
    said = f": {', '.join(facts)}" if facts else ""
    if info.chat_template is False:
        said += (
            "; a base model (its GGUF has no chat template): completions suit it, chats"
            " get a built-in template and answers of little sense. For chat, serve an"
            " instruction-tuned GGUF: lockgate serve --model PATH"
        )
    elif info.chat_template:
        said += "; a chat model (its GGUF carries a chat template)"
    return said


async def _start_all(models: Sequence[ServedModel], starting: set[ServedModel]) -> dict[int, str]:
    """Start every backend at once; each leaves ``starting`` when its start has ended.
    Returns why each that failed to start did (by ``id``)."""
    failures: dict[int, str] = {}

    async def start(m: ServedModel) -> None:
        began = time.perf_counter()
        try:
            await m.backend.start()
        except Exception as exc:
            log.exception("model %s (%s) failed to load; it answers 503", m.name, m.public_id)
            failures[id(m)] = f"{type(exc).__name__}: {exc}"
            return
        finally:
            starting.discard(m)
        took = time.perf_counter() - began
        if m.backend.ready:
            log.info("model %s (%s) ready in %.1fs%s", m.name, m.public_id, took, _kind(m))
        else:  # the backend has said why (an upstream not answering)
            log.info("model %s (%s) started, not ready yet", m.name, m.public_id)

    await asyncio.gather(*(start(m) for m in models))
    return failures


@dataclass(slots=True)
class Change:
    """What a reload does to the instances (:meth:`Fleet.plan`)."""

    entries: list[tuple[Key, AnyModelSettings]]  # the new configuration, in order
    added: list[Key] = field(default_factory=list)
    replaced: list[Key] = field(default_factory=list)
    removed: list[Key] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (self.added or self.replaced or self.removed)

    @property
    def loading(self) -> list[AnyModelSettings]:
        """The entries that get a new backend."""
        new = {*self.added, *self.replaced}
        return [m for key, m in self.entries if key in new]


@dataclass(slots=True)
class Outcome:
    """What a reload did: instances by ``name/id``; ``failed`` maps one to why."""

    added: list[str] = field(default_factory=list)
    replaced: list[str] = field(default_factory=list)
    removed: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)


def _label(key: Key) -> str:
    return f"{key[0]}/{key[1]}"


class Fleet:
    """Owns the instances' lifecycle; the :class:`ModelRegistry` says who serves now."""

    def __init__(
        self,
        served: Sequence[ServedModel],
        queues: SchedulerSettings,
        *,
        configured: Sequence[AnyModelSettings] | None = None,
        build: Callable[[AnyModelSettings, str], ServedModel] | None = None,
    ) -> None:
        """``configured`` are the entries ``served`` were built from, and ``build`` makes
        an instance of an entry; without them (backends injected by a test) the
        instances cannot be reloaded."""
        self.registry = ModelRegistry(served)
        self.starting: set[ServedModel] = set(served)  # the first start only
        self._queues = queues
        self._build = build
        self._config: dict[Key, AnyModelSettings] = {}
        if configured is not None:
            for m, entry in zip(served, configured, strict=True):
                self._config[m.name, m.public_id] = entry
        self._retiring: set[asyncio.Task[None]] = set()
        self._closing: set[ServedModel] = set()
        self._declare(served)  # before any start: metrics and readiness read the pools

    @classmethod
    def from_settings(
        cls,
        models: Sequence[AnyModelSettings],
        queues: SchedulerSettings,
        *,
        local: Scheduler,
        shared: Scheduler,
        created: int,
    ) -> Fleet:
        """Embedded (and fake) engines' slots belong to this process (``local``); a remote
        engine's are shared by every replica (``shared``, through Redis when there is one)."""

        def build(m: AnyModelSettings, public_id: str) -> ServedModel:
            remote = isinstance(m, RemoteModelSettings)
            return ServedModel(
                m.name,
                build_backend(m),
                shared if remote else local,
                max_n=m.max_n,
                created=created,
                # A remote engine's slots are named by its URL, the same on every replica.
                instance=m.base_url if isinstance(m, RemoteModelSettings) else public_id,
                public_id=public_id,
                remote=remote,
                tier=m.tier,
                weight=m.weight,
                canary=m.canary,
            )

        served = [build(m, i) for m, i in zip(models, public_ids(models), strict=True)]
        return cls(served, queues, configured=models, build=build)

    def _declare(self, models: Sequence[ServedModel]) -> None:
        """Each instance's pool: its backend's slots, the configured queue limits."""
        q = self._queues
        for m in models:
            limits = PoolLimits(
                capacity=m.backend.load().capacity,
                max_queue=q.max_queue,
                max_queue_per_tenant=q.max_queue_per_tenant,
                max_wait=q.max_wait,
            )
            m.scheduler.add_pool(m.pool, limits)

    def resize(self, queues: SchedulerSettings) -> None:
        """New queue limits for every pool (a reload)."""
        if queues != self._queues:
            self._queues = queues
            self._declare(self.registry.instances())

    async def start(self) -> None:
        served = self.registry.instances()
        await _start_all(served, self.starting)
        self._declare(served)  # llama-server reports its real slot count once it is up

    # -- reloads ------------------------------------------------------------------

    def plan(self, models: Sequence[AnyModelSettings]) -> Change:
        """What serving ``models`` instead would change; ConfigError if it cannot be done."""
        if self._build is None:
            raise ConfigError("models: this gateway's backends were given to it, not configured")
        ids = public_ids(models)
        change = Change([((m.name, i), m) for m, i in zip(models, ids, strict=True)])
        entries = change.entries
        for key, m in entries:
            before = self._config.get(key)
            if before is None:
                change.added.append(key)
            elif before != m:
                change.replaced.append(key)
        keys = {key for key, _ in entries}
        change.removed = [key for key in self._config if key not in keys]
        return change

    async def apply(self, change: Change, *, drain_seconds: float) -> Outcome:
        """Start what is new beside what serves, switch, then retire what was replaced."""
        assert self._build is not None
        outcome = Outcome()
        current = {(m.name, m.public_id): m for m in self.registry.instances()}
        new = {key: self._build(m, key[1]) for key, m in change.entries
               if key in change.added or key in change.replaced}  # fmt: skip
        failures = await _start_all(list(new.values()), set(new.values()))
        serving: list[ServedModel] = []
        retire: list[ServedModel] = []
        for key, entry in change.entries:
            old, fresh = current.get(key), new.get(key)
            if fresh is None:  # unchanged
                assert old is not None
                serving.append(old)
                continue
            why = failures.get(id(fresh))
            if why is None and not fresh.backend.ready and old is not None and old.backend.ready:
                why = "not ready after its start (the old instance goes on serving)"
            if why is not None:
                outcome.failed[_label(key)] = why
                retire.append(fresh)
                if old is not None:
                    serving.append(old)  # its entry stays the old one: a later reload retries
                continue
            self._config[key] = entry
            self._declare([fresh])
            serving.append(fresh)
            if old is None:
                outcome.added.append(_label(key))
            else:
                outcome.replaced.append(_label(key))
                retire.append(old)
        for key in change.removed:
            del self._config[key]
            outcome.removed.append(_label(key))
            retire.append(current[key])
        self.registry.replace(serving)
        for m in retire:
            self._retire(m, drain_seconds)
        return outcome

    def _retire(self, m: ServedModel, drain_seconds: float) -> None:
        self._closing.add(m)
        task = asyncio.create_task(self._close_when_idle(m, drain_seconds))
        self._retiring.add(task)
        task.add_done_callback(self._retiring.discard)

    async def _close_when_idle(self, m: ServedModel, drain_seconds: float) -> None:
        try:
            try:
                await asyncio.wait_for(m.in_use.idle(), drain_seconds)
            except TimeoutError:
                log.warning(
                    "instance %s of model %s retired with %d requests still on it after %gs",
                    m.public_id, m.name, m.in_use.count, drain_seconds,
                )  # fmt: skip
            await m.backend.close()
            log.info("instance %s of model %s retired and closed", m.public_id, m.name)
        finally:
            self._closing.discard(m)

    async def retired(self) -> None:
        """Wait until every retired instance is closed (tests, shutdown)."""
        while self._retiring:
            await asyncio.gather(*self._retiring, return_exceptions=True)

    async def close(self) -> None:
        """Close every backend, the retiring ones too (shutdown)."""
        closing = {*self.registry.instances(), *self._closing}
        for task in list(self._retiring):
            task.cancel()
        await asyncio.gather(*self._retiring, return_exceptions=True)
        await asyncio.gather(*(m.backend.close() for m in closing), return_exceptions=True)
