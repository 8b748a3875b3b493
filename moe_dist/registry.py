"""Named registries for routers and balancing losses, with entry-point plugin discovery.

A third-party package adds a router without touching moe_dist by declaring, in its own
pyproject.toml::

    [project.entry-points."moe_dist.routers"]
    my_router = "my_pkg.routing:MyRouter"

The entry point's name is the name users write in YAML (``moe.router.name: my_router``).
Entry points are loaded lazily, the first time a name is looked up and not found among the
built-in plugins, so a broken third-party package cannot break ``import moe_dist``.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Iterator
from importlib.metadata import entry_points
from typing import Generic, TypeVar

T = TypeVar("T")


class UnknownPluginError(KeyError):
    """A name that no registered or discoverable plugin carries."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it plain
        return str(self.args[0])


class Registry(Generic[T]):
    """Maps names to plugin classes.

    Built-ins register with ``@REGISTRY.register("name")``; third-party plugins are found
    through the entry-point group ``group``. ``builtin_modules`` are imported on the first
    lookup so that every built-in plugin file has registered itself by then.
    """

    def __init__(self, kind: str, group: str, builtin_modules: tuple[str, ...] = ()) -> None:
        self.kind = kind
        self.group = group
        self._builtin_modules = builtin_modules
        self._items: dict[str, type[T]] = {}
        self._builtins_loaded = False
        self._entry_points_loaded = False

    def register(self, name: str) -> Callable[[type[T]], type[T]]:
        def add(cls: type[T]) -> type[T]:
            existing = self._items.get(name)
            if existing is not None and existing is not cls:
                raise ValueError(f"{self.kind} {name!r} is already registered by {existing.__qualname__}")
            self._items[name] = cls
            cls.registry_name = name  # type: ignore[attr-defined]
            return cls

        return add

    def unregister(self, name: str) -> None:
        """Remove ``name`` (a plugin that lives only for a while: a test, a notebook experiment)."""
        self._items.pop(name, None)

    def _load_builtins(self) -> None:
        if not self._builtins_loaded:
            self._builtins_loaded = True
            for module in self._builtin_modules:
                importlib.import_module(module)

    def _load_entry_points(self) -> None:
        if self._entry_points_loaded:
            return
        self._entry_points_loaded = True
        for ep in entry_points(group=self.group):
            if ep.name in self._items:
                continue  # built-ins win; a plugin cannot silently replace one
            try:
                cls = ep.load()
            except Exception as exc:  # noqa: BLE001 - report which plugin failed, keep going
                raise ImportError(
                    f"{self.kind} plugin {ep.name!r} (entry point {ep.value!r} in group {self.group!r}) "
                    f"failed to import: {exc}"
                ) from exc
            self._items[ep.name] = cls
            cls.registry_name = ep.name

    def get(self, name: str) -> type[T]:
        self._load_builtins()
        if name not in self._items:
            self._load_entry_points()
        if name not in self._items:
            known = ", ".join(sorted(self.names())) or "(none)"
            raise UnknownPluginError(f"unknown {self.kind} {name!r}; known: {known}")
        return self._items[name]

    def names(self) -> list[str]:
        self._load_builtins()
        self._load_entry_points()
        return sorted(self._items)

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name in self.names()

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())


ROUTERS: Registry = Registry(
    "router",
    "moe_dist.routers",
    builtin_modules=(
        "moe_dist.routing.topk_softmax",
        "moe_dist.routing.topk_sigmoid_bias",
        "moe_dist.routing.lpr",
        "moe_dist.routing.expert_choice",
    ),
)
LOSSES: Registry = Registry(
    "balancing loss",
    "moe_dist.losses",
    builtin_modules=(
        "moe_dist.balancing.switch",
        "moe_dist.balancing.global_batch",
        "moe_dist.balancing.seq_aux",
        "moe_dist.balancing.z_loss",
        "moe_dist.balancing.simbal",
    ),
)
