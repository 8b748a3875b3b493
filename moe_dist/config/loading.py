"""Loading a config: YAML in, ``--set`` overrides applied, a validated ``Config`` out, or every
error at once.

1. ``read_yaml`` reads a mapping (a missing file, bad YAML or a non-mapping is one error);
   ``load_config`` refuses an empty file, which would otherwise train the defaults unnoticed.
2. ``apply_overrides`` sets ``a.b.c=value`` (values parsed as YAML) in place.
3. ``config_from_dict`` validates: the schema first (fields, plugin sections, shapes), then the
   checks that need a whole config (``validate_moe``, ``cross_field_errors``).
4. When the schema already fails, a second pass drops the invalid values (defaults stand in)
   and runs the whole-config checks on the rest, so that the user sees all errors at once; a
   check that reads a dropped value is left out, so a default never causes an error of its own.
5. Errors are listed in the order of the config's fields, whichever pass found them.
"""

from __future__ import annotations

import copy
import os
import re
import typing
from functools import partial
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from moe_dist.config.errors import ConfigError, format_pydantic_errors
from moe_dist.config.plugins import plugin_errors
from moe_dist.config.schema import Config, cross_field_errors, validate_moe, world_size_errors
from moe_dist.config.suggest import did_you_mean
from moe_dist.shipped_files import resolve_user_path

START_FROM = "configs/demo.yaml"


def _parse_scalar(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict[str, Any], overrides: list[str]) -> list[str]:
    """Apply ``a.b.c=value`` overrides in place (values parsed as YAML); returns errors."""
    errors = []
    for item in overrides:
        if "=" not in item:
            errors.append(f"--set {item!r}: expected KEY=VALUE, e.g. model.moe.num_experts=16")
            continue
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        node: Any = data
        for j, part in enumerate(parts[:-1]):
            if isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
                continue
            if not isinstance(node, dict):
                errors.append(f"--set {key}: {'.'.join(parts[:j])} is not a section")
                break
            node = node.setdefault(part, {})
        else:
            last = parts[-1]
            if isinstance(node, list) and last.isdigit() and int(last) < len(node):
                node[int(last)] = _parse_scalar(value)
            elif isinstance(node, dict):
                node[last] = _parse_scalar(value)
            else:
                errors.append(f"--set {key}: {'.'.join(parts[:-1])} is not a section")
    return errors


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The mapping in ``path``; a relative ``configs/...`` path missing here is read from the copy
    shipped with the package (``moe_dist.shipped_files.resolve_user_path``)."""
    p = resolve_user_path(path)
    if not p.is_file():
        raise ConfigError([f"config file not found: {p}"])
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError([f"not valid YAML: {exc}"], source=str(p)) from None
    if not isinstance(data, dict):
        raise ConfigError([f"top level must be a mapping, got {type(data).__name__}"], source=str(p))
    return data


# ---------------------------------------------------------------- the second pass


def _without(data: dict[str, Any], locs: list[tuple[Any, ...]]) -> tuple[dict[str, Any], list[int]]:
    """A deep copy of ``data`` with the values at ``locs`` removed (their defaults then apply),
    and the indices in the config of the losses kept. A router with any error goes whole; so
    does a loss (its index in the copy shifts, hence the kept indices)."""
    data = copy.deepcopy(data)
    broken_losses = set()
    for loc in locs:
        if loc[:3] == ("model", "moe", "router"):
            loc = loc[:3]
        elif loc[:3] == ("model", "moe", "losses") and len(loc) > 3:
            broken_losses.add(loc[3])
            continue
        node: Any = data
        for part in loc[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(loc[-1], None)
    model = data.get("model")
    moe = model.get("moe") if isinstance(model, dict) else None
    losses = moe.get("losses") if isinstance(moe, dict) else None
    if not isinstance(losses, list):
        return data, []
    kept = [i for i in range(len(losses)) if i not in broken_losses]
    moe["losses"] = [losses[i] for i in kept]
    return data, kept


def _second_pass_errors(data: dict[str, Any], exc: ValidationError, world_size: int | None) -> list[str]:
    """Whole-config errors of a config whose schema validation failed (see step 4 above)."""
    locs = [tuple(e["loc"]) for e in exc.errors()]
    for _ in range(4):  # each round may drop one level more; sections nest less deep than that
        pruned, kept_losses = _without(data, locs)
        try:
            cfg = Config.model_validate(pruned)
            break
        except ValidationError as again:
            # A default that fails with the rest (model.dim against model.n_heads): its section goes.
            locs += [loc[:-1] if loc in locs else loc for loc in (tuple(e["loc"]) for e in again.errors())]
            locs = [loc for loc in locs if loc]
        except (TypeError, ValueError, AttributeError):
            return []  # nested structural errors: already reported by the first pass
    else:
        return []
    dropped = [".".join(str(p) for p in loc) for loc in locs]
    moe = cfg.model.moe
    sizes = ("model", "model.moe", "model.moe.num_experts", "model.moe.router")
    if any(d in sizes or d.startswith("model.moe.router.") for d in dropped):
        errors = []  # the sizes or the router the plugin checks read are defaults now
    else:
        losses = list(zip(kept_losses, moe.losses, strict=True))
        errors = plugin_errors(moe.router, losses, cfg.model.dim, moe.num_experts, "model.moe")
    whole = cross_field_errors(cfg) + (world_size_errors(cfg, world_size) if world_size else [])
    # leave out a message that reads a dropped value: its path or one below (schedule.step is not
    # schedule.steps)
    reads = re.compile("|".join(rf"(?<![\w.]){re.escape(d)}(?!\w)" for d in dropped) or "(?!)")
    return errors + [m for m in whole if not reads.search(m)]


# ---------------------------------------------------------------- order of the errors


def _section_of(annotation: Any) -> type[BaseModel] | None:
    """The model class inside a field's annotation (``list[X]``, ``X | None``, annotated ``X``)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _section_of(arg)
        if found is not None:
            return found
    return None


def _schema_order(line: str) -> tuple[int, ...]:
    """Sort key of a ``path: message`` line: the positions of its path's fields in the schema."""
    key: list[int] = []
    cls: type[BaseModel] | None = Config
    for part in line.split(":", 1)[0].split("."):
        if part.isdigit():
            key.append(int(part))
            continue
        fields = list(cls.model_fields) if cls is not None else []
        key.append(fields.index(part) if part in fields else len(fields))
        cls = _section_of(cls.model_fields[part].annotation) if cls is not None and part in fields else None
    return tuple(key)


# ---------------------------------------------------------------- entry points


def config_from_dict(
    data: dict[str, Any], source: str | None = None, world_size: int | None = None
) -> Config:
    """The validated config, or a ConfigError with every error; ``world_size`` (the launch's
    process count) adds the checks that need it (``world_size_errors``) to the same list."""
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        hint = partial(did_you_mean, Config, data)
        errors = format_pydantic_errors(exc, "", hint) + _second_pass_errors(data, exc, world_size)
        raise ConfigError(sorted(errors, key=_schema_order), source) from None
    errors = validate_moe(cfg.model.moe, cfg.model.dim) + cross_field_errors(cfg)
    errors += world_size_errors(cfg, world_size) if world_size else []
    if errors:
        raise ConfigError(sorted(errors, key=_schema_order), source)
    return cfg


def load_config(
    path: str | os.PathLike[str] | None, overrides: list[str] | None = None, world_size: int | None = None
) -> Config:
    """The config in ``path`` with ``overrides``; ``None``: the defaults (tests, tools). With
    ``world_size``, the errors of that launch shape come in the same list."""
    data = read_yaml(path) if path is not None else {}
    source = str(path) if path is not None else None
    if path is not None and not data:
        sections = ", ".join(Config.model_fields)
        raise ConfigError(
            [
                f"the file is empty (no keys, only comments or {{}}); a config needs at least one "
                f"section ({sections}); use {START_FROM} as a start"
            ],
            source,
        )
    errors = apply_overrides(data, overrides or [])
    if errors:
        raise ConfigError(errors, source)
    return config_from_dict(data, source, world_size)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """A plain dict that round-trips through YAML and ``config_from_dict``."""
    return cfg.model_dump(mode="json")
