"""Public model names and the instances that serve them.

    registry = ModelRegistry([ServedModel("gemma", backend, scheduler, max_n=4, created=t)])
    registry.instances_of("gemma")   # every instance, in configured order

Several configuration entries may share a public name: they are its instances,
and :func:`gateway.routing.place` picks among them per request. A reload swaps the
registry's contents at once (:meth:`ModelRegistry.replace`); a request keeps the
instance it was placed on, and :attr:`ServedModel.in_use` says when the last such
request has ended, so a retired instance can be closed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

from backends.base import Backend
from gateway.errors import ModelNotFound
from gateway.scheduler.base import Scheduler


class InUse:
    """How many requests hold an instance (placed on it, not yet finished)."""

    __slots__ = ("_idle", "count")

    def __init__(self) -> None:
        self.count = 0
        self._idle: asyncio.Event | None = None  # made when someone waits

    def enter(self) -> None:
        self.count += 1

    def leave(self) -> None:
        self.count -= 1
        if self.count == 0 and self._idle is not None:
            self._idle.set()

    async def idle(self) -> None:
        """Return once no request holds the instance."""
        while self.count:
            self._idle = asyncio.Event()
            await self._idle.wait()


@dataclass(frozen=True, slots=True)
class ServedModel:
    """One instance of a public model: a backend and the scheduler that owns its slots."""

    name: str
    backend: Backend
    scheduler: Scheduler
    max_n: int = 1
    created: int = 0
    # Its slots' identity: the upstream URL for a remote engine (the same on every replica,
    # whatever its config order), else the public id (an engine of this process).
    instance: str = "embedded"
    # What clients are told served them (x-lockgate-backend): never an internal URL.
    public_id: str = "embedded"
    remote: bool = False  # an upstream server, not an engine in this process
    tier: int = 0  # 0: primary; higher tiers take spillover only
    weight: float = 100.0  # configured share among equals (the router may change it)
    canary: bool = False
    in_use: InUse = field(default_factory=InUse, compare=False, repr=False)

    @property
    def pool(self) -> str:
        """The scheduler's name for this instance's slots (the same on every replica)."""
        return f"{self.name}@{self.instance}"


class ModelRegistry:
    def __init__(self, models: Sequence[ServedModel]) -> None:
        self._models: dict[str, list[ServedModel]] = {}
        self.replace(models)

    def replace(self, models: Sequence[ServedModel]) -> None:
        """Serve exactly ``models`` from now on (a reload); lists handed out stay as they were."""
        grouped: dict[str, list[ServedModel]] = {}
        for m in models:
            grouped.setdefault(m.name, []).append(m)
        self._models = grouped

    def instances_of(self, name: str) -> Sequence[ServedModel]:
        """Every instance serving ``name``, in configured order; ModelNotFound if none."""
        try:
            return self._models[name]
        except KeyError:
            raise ModelNotFound(name) from None

    def names(self) -> list[ServedModel]:
        """One entry per public name (its first instance)."""
        return [entries[0] for entries in self._models.values()]

    def instances(self) -> list[ServedModel]:
        return [m for entries in self._models.values() for m in entries]

    def by_name(self) -> dict[str, list[ServedModel]]:
        return {name: list(entries) for name, entries in self._models.items()}
