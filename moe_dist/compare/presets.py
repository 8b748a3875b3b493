"""A comparison file: a training config plus a ``compare:`` section (arms, seeds, baseline, claims).

``configs/compare/lpr_paper.yaml`` and ``simbal_paper.yaml`` are such files (``moe-dist compare
--preset lpr_paper``); a plain training config (``configs/compare.yaml``) has no ``compare:``
section and uses the built-in variants (``variants.py``).

The section (every key optional):

- ``arms``: name -> ``{description, router, losses, set, seeds}``: what replaces
  ``model.moe.router`` and ``model.moe.losses`` in that arm (``top_k`` from the base router when
  the arm's router has none); ``set``: further ``KEY=VALUE`` overrides of this arm only, applied
  after the command line's ``--set`` and ``--steps`` (e.g. ``schedule.steps=1600`` for a longer
  arm, ``optim.grad_clip=0``); ``seeds``: the seeds this arm runs with, a subset of ``seeds``
  (default: all). A claim is judged on the seeds both of its arms run.
- ``baseline``: the arm the iso-loss column and the claims compare against.
- ``seeds``: the seeds every arm runs with (``--seeds`` overrides).
- ``parallel``, ``last_n``, ``pes_tokens``: defaults of the flags of the same names.
- ``prepare``: data made once before the arms run (`compare.prepare`): ``{inputs, vocab_size,
  dir}``; the base config then reads ``dir/corpus`` with ``dir/tokenizer.json``.
- ``claims``: the papers' claims this comparison tests, each ``{text, arm, metric, better}``
  against the baseline, or against another arm (``versus``)
  (`compare.seeds` turns each into a line: difference, seed spread, verdict).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from moe_dist.compare.variants import Variant
from moe_dist.config import ConfigError, read_yaml
from moe_dist.shipped_files import shipped_root

PRESET_DIR = Path("configs") / "compare"
CLAIM_METRICS = ("final_val_loss", "ema_gini", "ema_min_max", "gini", "min_max_ratio", "pes_min", "speedup")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ArmSpec(_Strict):
    description: str = ""
    router: dict[str, Any]
    losses: list[dict[str, Any]] = Field(default_factory=list)
    set: list[str] = Field(default_factory=list, description="KEY=VALUE overrides of this arm only")
    seeds: list[int] | None = Field(None, min_length=1, description="this arm's seeds (default: all)")


class PrepareSpec(_Strict):
    inputs: list[str] = Field(min_length=1, description="text files, directories or globs")
    vocab_size: int = Field(8192, gt=256)
    dir: str = Field(description="where tokenizer.json and corpus.{bin,idx} are written (cached)")
    install_hint: str = Field("", description="what to install when the inputs are missing")
    shuffle_files: bool = Field(
        False, description="files in the order of a hash of their path (validation samples every source)"
    )


class ClaimSpec(_Strict):
    text: str
    arm: str
    metric: Literal[CLAIM_METRICS]  # type: ignore[valid-type]
    better: Literal["lower", "higher"]
    versus: str | None = Field(None, description="the arm compared with (default: the baseline)")


class CompareSection(_Strict):
    arms: dict[str, ArmSpec] = Field(default_factory=dict)
    baseline: str | None = None
    seeds: list[int] = Field(default_factory=list)
    parallel: int | None = Field(None, ge=1)
    last_n: int | None = Field(None, ge=1)
    pes_tokens: int | None = Field(None, ge=1)
    prepare: PrepareSpec | None = None
    claims: list[ClaimSpec] = Field(default_factory=list)

    def variants(self) -> dict[str, Variant]:
        return {
            name: Variant(name, arm.description, arm.router, arm.losses, arm.set, arm.seeds)
            for name, arm in self.arms.items()
        }


def preset_path(name: str, root: Path | None = None) -> Path:
    """``configs/compare/NAME.yaml`` under ``root`` (default: the working directory, then the
    presets shipped with the package, ``moe_dist.shipped_files``)."""
    roots = [root] if root is not None else [Path.cwd(), shipped_root()]
    for r in roots:
        p = r / PRESET_DIR / f"{name}.yaml"
        if p.is_file():
            return p
    known = sorted(
        p.stem for r in roots if (r / PRESET_DIR).is_dir() for p in (r / PRESET_DIR).glob("*.yaml")
    )
    raise ConfigError([f"--preset: no preset {name!r} (known: {', '.join(sorted(set(known))) or 'none'})"])


def split_compare_file(path: str | None) -> tuple[dict[str, Any], CompareSection]:
    """(the training config as a raw dict, its validated ``compare:`` section)."""
    data = read_yaml(path) if path else {}
    raw = data.pop("compare", None) or {}
    try:
        section = CompareSection.model_validate(raw)
    except ValidationError as exc:
        errors = ["compare." + ".".join(str(p) for p in e["loc"]) + f": {e['msg']}" for e in exc.errors()]
        raise ConfigError(errors, path) from None
    problems = []
    names = set(section.arms)
    if section.baseline is not None and names and section.baseline not in names:
        problems.append(f"compare.baseline: {section.baseline!r} is not an arm ({', '.join(names)})")
    for i, claim in enumerate(section.claims):
        for key in ("arm", "versus"):
            value = getattr(claim, key)
            if names and value is not None and value not in names:
                problems.append(f"compare.claims.{i}.{key}: {value!r} is not an arm ({', '.join(names)})")
    for name, arm in section.arms.items():
        extra = sorted(set(arm.seeds or []) - set(section.seeds))
        if extra and section.seeds:
            problems.append(
                f"compare.arms.{name}.seeds: {', '.join(map(str, extra))} not in compare.seeds "
                f"{section.seeds}"
            )
    if problems:
        raise ConfigError(problems, path)
    return data, section
