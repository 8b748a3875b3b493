"""A "did you mean" for an unknown key: the one known key close to it (schedule.step -> steps).

``known_keys(root, data, loc)`` lists the keys the section at ``loc`` accepts: the fields of the
model class the path leads to from ``root`` (through nested sections, lists and optional
sections), and for a plugin section (``model.moe.router``, ``model.moe.losses.N``) the fields of
the plugin its ``name`` picks. ``close_key`` picks the nearest with ``difflib`` (ratio >= 0.75,
so ``step``/``steps`` and ``top_kk``/``top_k`` match, ``seed``/``steps`` do not).
"""

from __future__ import annotations

import difflib
import typing
from typing import Any

from pydantic import BaseModel

from moe_dist.balancing.base import LossConfig
from moe_dist.registry import LOSSES, ROUTERS, UnknownPluginError
from moe_dist.routing.base import RouterConfig

CUTOFF = 0.75


def _model_in(annotation: Any) -> type[BaseModel] | None:
    """The model class inside ``X``, ``X | None``, ``list[X]``, ``Annotated[X, ...]``."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _plugin_model(cls: type[BaseModel], data: Any) -> type[BaseModel]:
    """The plugin's own config class for a router or loss section whose ``name`` we know."""
    registry = ROUTERS if cls is RouterConfig else LOSSES if cls is LossConfig else None
    name = data.get("name") if isinstance(data, dict) else None
    if registry is None or not isinstance(name, str):
        return cls
    try:
        return registry.get(name).Config
    except (UnknownPluginError, ImportError):
        return cls


def known_keys(root: type[BaseModel], data: Any, loc: tuple[Any, ...]) -> list[str]:
    """The keys the section at ``loc`` (a path of keys and list indices) accepts; [] if unknown."""
    cls: type[BaseModel] | None = root
    for part in loc:
        if isinstance(part, int):  # an item of a list section: same class, its own data
            data = data[part] if isinstance(data, list) and part < len(data) else None
        elif cls is not None and part in cls.model_fields:
            data = data.get(part) if isinstance(data, dict) else None
            cls = _model_in(cls.model_fields[part].annotation)
        else:
            return []
        if cls in (RouterConfig, LossConfig) and isinstance(data, dict):
            cls = _plugin_model(cls, data)
    return list(cls.model_fields) if cls is not None else []


def close_key(key: str, keys: list[str]) -> str | None:
    """The one known key close to ``key``, if any."""
    found = difflib.get_close_matches(key, keys, n=1, cutoff=CUTOFF)
    return found[0] if found else None


def did_you_mean(root: type[BaseModel], data: Any, loc: tuple[Any, ...]) -> str:
    """`` (did you mean a.b.c?)`` for an unknown key at ``loc``, or ''."""
    if not loc or not isinstance(loc[-1], str):
        return ""
    match = close_key(loc[-1], known_keys(root, data, loc[:-1]))
    if match is None:
        return ""
    return f" (did you mean {'.'.join(str(p) for p in (*loc[:-1], match))}?)"
