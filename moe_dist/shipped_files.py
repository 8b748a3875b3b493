"""Files shipped with the package: configs (demo, models, cluster, compare presets) and the sbatch
template, found with ``importlib.resources`` wherever moe_dist is installed.

One source of truth: the top-level ``configs/`` and ``launch/`` folders of the source tree are
the files users read and edit. ``moe_dist/shipped/configs`` and ``moe_dist/shipped/launch`` are
symbolic links to them, so that

- an editable install (``pip install -e .``, ``make setup``) reads the checkout's files through
  the links (an edit shows at once, nothing to keep in sync);
- a wheel (``pip wheel .``, ``pip install .``) holds real copies: setuptools' ``build_py``
  copies ``package-data`` through the links (``[tool.setuptools.package-data]`` in
  pyproject.toml), so the installed package needs no source tree.

The other ways were worse: real files under ``moe_dist/`` with the top level as links moves the
paths every doc and user types; two copies kept equal by a test must be synchronised by hand;
mapping a folder outside the package with ``package-dir`` breaks ``importlib.resources`` in
editable installs. A Windows checkout without symlink support would need ``git config
core.symlinks true``; our clusters are Linux.

``resolve_user_path`` is how commands use them: a path the user typed (``configs/demo.yaml``)
is taken from the working directory when it exists there, and otherwise from the shipped copy
(said once on stderr), so the commands of the README work from any folder.
"""

from __future__ import annotations

import functools
import importlib.resources
import os
import sys
from pathlib import Path

SHIPPED_TOP_FOLDERS = ("configs", "launch")


def shipped_root() -> Path:
    """``moe_dist/shipped`` of the installed package, as a real folder on disk."""
    root = importlib.resources.files("moe_dist") / "shipped"
    if not isinstance(root, Path):  # a zip import; pip never installs us that way
        raise RuntimeError(f"moe_dist is not installed as files on disk ({root}); reinstall with pip")
    return root


def shipped_path(relative: str | os.PathLike[str]) -> Path:
    """The shipped copy of ``configs/...`` or ``launch/...`` (it may not exist; callers check)."""
    return shipped_root() / Path(relative)


def shipped_candidate(path: str | os.PathLike[str]) -> Path | None:
    """The shipped file a relative ``configs/...`` or ``launch/...`` path names, if there is one."""
    p = Path(path)
    if p.is_absolute() or not p.parts or p.parts[0] not in SHIPPED_TOP_FOLDERS or ".." in p.parts:
        return None
    candidate = shipped_path(p)
    return candidate if candidate.is_file() else None


@functools.cache
def _say_once(path: str, shipped: str) -> None:
    if os.environ.get("RANK", "0") == "0":  # every rank of a launch resolves the same path
        print(
            f"note: {path} is not in {Path.cwd()}; using the copy shipped with moe_dist: {shipped}",
            file=sys.stderr,
        )


def resolve_user_path(path: str | os.PathLike[str]) -> Path:
    """``path`` when it exists; else the shipped file of the same relative name (said once);
    else ``path`` unchanged, for the caller's own 'not found' message."""
    p = Path(path)
    if p.exists():
        return p
    candidate = shipped_candidate(p)
    if candidate is None:
        return p
    _say_once(str(path), str(candidate))
    return candidate
