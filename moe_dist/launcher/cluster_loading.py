"""Loading a cluster YAML: read, apply ``--set`` overrides, validate, report every error at once.

1. ``read_yaml`` and ``apply_overrides`` (``moe_dist.config``): the same YAML and ``--set a.b=c``
   rules as a train config.
2. Control characters anywhere (``cluster_checks.control_chars``), then the schema
   (``cluster_config.ClusterConfig``): field errors with their dotted paths, in the style of
   ``moe_dist.config`` (``nodes: Input should be greater than or equal to 1, got 0``).
3. Checks across fields (``cluster_checks.cross_checks``) once the fields are valid.

All errors go into one ``ConfigError``; ``moe-dist launch`` prints them and exits 2.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from moe_dist.config import ConfigError, apply_overrides, format_pydantic_errors, read_yaml
from moe_dist.config.suggest import did_you_mean
from moe_dist.launcher.cluster_checks import control_chars, cross_checks
from moe_dist.launcher.cluster_config import ClusterConfig
from moe_dist.shipped_files import resolve_user_path


def cluster_from_dict(
    data: dict[str, Any], source: str | None = None, base_dir: Path | None = None
) -> ClusterConfig:
    """Validate a cluster config given as a dict; relative paths in it are resolved from
    ``base_dir`` (default: the working directory). Raises ``ConfigError`` with every problem."""
    errors = control_chars(data)
    try:
        cfg = ClusterConfig.model_validate(data)
    except ValidationError as exc:
        errors += format_pydantic_errors(exc, "", partial(did_you_mean, ClusterConfig, data))
        hostfile = data.get("hostfile")
        if (
            isinstance(hostfile, str)
            and not (Path(base_dir or Path.cwd()) / Path(hostfile).expanduser()).is_file()
        ):
            errors.append(f"hostfile: file not found: {Path(base_dir or Path.cwd()) / hostfile}")
        raise ConfigError(errors, source) from None
    cfg._base_dir = base_dir or Path.cwd()
    errors += cross_checks(cfg)
    if errors:
        raise ConfigError(errors, source)
    return cfg


def load_cluster_config(path: str | Path, overrides: list[str] | None = None) -> ClusterConfig:
    """Read a cluster YAML, apply ``--set`` overrides, validate; raises ``ConfigError``."""
    path = resolve_user_path(path)  # configs/cluster/... from any folder: the shipped copy
    data = read_yaml(path)
    errors = apply_overrides(data, overrides or [])
    if errors:
        raise ConfigError(errors, str(path))
    return cluster_from_dict(data, str(path), Path(path).resolve().parent)
