"""``import_hf(hf_dir, run_dir, router, overrides)``: a Hugging Face MoE checkpoint as a run at step 0.

The inverse of ``hf_export``, through the same tables (``hf_config.config_fields``,
``hf_weights.tensor_links``):

1. Read and refuse, before anything is written: ``config.json`` -> our model section
   (``hf_import_config``), the safetensors files and every tensor's name, shape and dtype
   (``hf_import_weights``), an existing non-empty ``run_dir``.
2. The run's config: our defaults, the model section, ``run.out_dir`` / ``run.name`` naming
   ``run_dir`` (absolute), ``data.tokenizer`` the copied ``tokenizer.json`` when ``hf_dir``
   has one; then ``--router NAME`` (the router becomes ``{name: NAME, top_k: <HF top-k>}``,
   its other options the plugin's defaults) and the ``--set`` overrides, validated like any
   config. ``--set`` may not change a shape the checkpoint fixes (``STRUCTURE``), nor the engine
   (DeepSpeed resumes only its own checkpoints).
3. The model is built at EP=1 from the run's seed (so a ``--router`` router is initialised as its
   plugin's ``reset_parameters`` says), and every tensor the table links is copied into it; with
   ``--router`` the source's router tensors are left unread. LPR: the EMA key sums start at the
   keys, as the plugin's init sets them.
4. Written into ``.<name>.tmp-<pid>`` beside ``run_dir``, then renamed (a failure leaves nothing):
   ``config.yaml`` (``moe-dist train RUN_DIR/config.yaml --resume`` continues the run),
   ``config.json`` (the same config, as ``train`` writes it: ``export-hf``, ``generate`` and
   ``compare`` read it), ``tokenizer/`` (the HF tokenizer files found) and
   ``checkpoints/step_000000``: the model, AdamW's state at step 0 (zero moments: the first step
   is that of a fresh optimizer) and zero expert counts, in the format the config resolves
   (``checkpoint.format``; auto: torch under replicate, dcp under fsdp/ddp) through the training
   code's own writers (``checkpoint.save``, ``dcp_checkpoint.DcpSaver``). Both formats hold
   experts in the global layout and resume at any EP and DP size in every data-parallel mode.

AdamW's hyper-parameters (betas, eps, weight decay) are saved with the state, and a resumed
``torch``-format run takes them from the checkpoint: set ``optim.*`` at import (``--set``).
Memory: the whole model and its AdamW moments in fp32 in this process, 12 bytes a parameter
(``dcp``), about 24 with ``torch`` (its writer copies weights and moments for ``torch.save``).
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import yaml

from moe_dist.config import Config, ConfigError, apply_overrides, config_from_dict
from moe_dist.config.schema import ModelConfig
from moe_dist.data.tokenizer import check_model_vocab, load_tokenizer
from moe_dist.export.hf_config import field_value
from moe_dist.export.hf_export import _replace_dir
from moe_dist.export.hf_import_config import HFImportError, HFSource, model_section
from moe_dist.export.hf_import_weights import HFTensorFiles, check_tensors, fill_model
from moe_dist.export.hf_weights import ROUTER_PART, tensor_links
from moe_dist.models import MoETransformer, build_model
from moe_dist.parallel.groups import ParallelGroups
from moe_dist.registry import ROUTERS
from moe_dist.training import checkpoint
from moe_dist.training.dcp_checkpoint import DcpSaver, init_optimizer_state
from moe_dist.training.optim import build_optimizer

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
)
# Model fields the checkpoint's tensors fix: --set may not change them.
STRUCTURE = (
    "vocab_size",
    "dim",
    "n_layers",
    "n_heads",
    "n_kv_heads",
    "head_dim",
    "qk_norm",
    "dense_layers",
    "tie_embeddings",
    "moe.num_experts",
    "moe.experts.ffn_hidden_size",
    "moe.experts.activation",
    "moe.shared_experts.count",
)


@dataclass
class ImportResult:
    run_dir: Path
    arch: str
    step_dir: Path
    format: str
    parameters: int
    router: str  # what happened to the router, for the summary line
    tokenizer: str
    notes: list[str] = field(default_factory=list)


def import_hf(
    hf_dir: str | Path, run_dir: str | Path, router: str | None = None, overrides: list[str] | None = None
) -> ImportResult:
    hf_dir, run_dir = Path(hf_dir), Path(run_dir).absolute()
    if not hf_dir.is_dir():
        raise HFImportError(f"{hf_dir}: no such directory")
    if run_dir.exists() and not (run_dir.is_dir() and not any(run_dir.iterdir())):
        raise HFImportError(f"-o: {run_dir} exists and is not an empty directory (choose another)")
    if router is not None and router not in ROUTERS:
        raise HFImportError(f"--router: unknown router {router!r} (known: {', '.join(ROUTERS.names())})")
    source = model_section(hf_dir)
    files = HFTensorFiles(hf_dir)
    tok_files = [name for name in TOKENIZER_FILES if (hf_dir / name).is_file()]
    source_model = source_model_config(source, hf_dir)
    cfg = run_config(source, source_model, run_dir, router, overrides or [], "tokenizer.json" in tok_files)
    swap = router is not None
    links = tensor_links(source_model, source.arch)
    read = [link for link in links if not (swap and ROUTER_PART in link.ours)]
    model = build_model(cfg.model, ParallelGroups.single(), seed=cfg.run.seed)
    state = model.state_dict()
    check_tensors(state, read, files, (link.hf for link in links), source_model.tie_embeddings)
    tokenizer_note = _check_tokenizer(cfg, source, hf_dir, run_dir, tok_files)

    fill_model(state, read, files)
    if not swap and source.arch == "qwen3_moe_lpr":
        _ema_from_keys(model)
    return _write(
        cfg, model, source, run_dir, hf_dir, tok_files, swap, tokenizer_note, len(links) - len(read)
    )


def source_model_config(source: HFSource, hf_dir: Path) -> ModelConfig:
    """The checkpoint's model as ours, validated alone (its errors name ``config.json``)."""
    seq_len = min(128, source.model["max_seq_len"])  # 128: DataConfig's default
    tree = {"model": copy.deepcopy(source.model), "data": {"seq_len": seq_len}}
    return config_from_dict(tree, str(hf_dir / "config.json")).model


def run_config(
    source: HFSource,
    want: ModelConfig,
    run_dir: Path,
    router: str | None,
    overrides: list[str],
    has_tokenizer: bool,
) -> Config:
    """Our config for the imported run (module docstring, step 2); ``want``: the source's model."""
    model = copy.deepcopy(source.model)
    if router is not None:
        model["moe"]["router"] = {"name": router, "top_k": source.model["moe"]["router"]["top_k"]}
    data: dict[str, Any] = {"seq_len": min(128, model["max_seq_len"])}  # 128: DataConfig's default
    if source.tokenizer_kind == "bytes":
        data["tokenizer"] = {"kind": "bytes"}
    elif has_tokenizer:
        data["tokenizer"] = {"kind": "hf", "path": str(run_dir / "tokenizer" / "tokenizer.json")}
    tree: dict[str, Any] = {
        "run": {"name": run_dir.name, "out_dir": str(run_dir.parent)},
        "model": model,
        "data": data,
    }
    for item in overrides:
        key = item.split("=", 1)[0].strip()
        if key in ("model.moe.router", "model.moe.router.name"):
            raise HFImportError(f"--set {key}: choose the router with --router NAME (its plugin inits it)")
    errors = apply_overrides(tree, overrides)
    if errors:
        raise ConfigError(errors, "import-hf --set")
    cfg = config_from_dict(tree, "import-hf (config.json and --set)")
    problems = []
    for path in STRUCTURE:
        if _structural(cfg.model, path) != _structural(want, path):
            problems.append(
                f"model.{path}: {field_value(cfg.model, path)}, but the checkpoint has "
                f"{field_value(want, path)} (import-hf keeps the pretrained shapes)"
            )
    if want.dense_layers and cfg.model.dense_ffn_hidden_size != want.dense_ffn_hidden_size:
        problems.append(
            f"model.dense_ffn_hidden_size: {cfg.model.dense_ffn_hidden_size}, but the checkpoint has "
            f"{want.dense_ffn_hidden_size}"
        )
    if cfg.parallel.engine != "native":
        problems.append(
            f"parallel.engine: {cfg.parallel.engine}; import-hf writes native checkpoints, which "
            "DeepSpeed does not resume"
        )
    if Path(cfg.run_dir).absolute() != run_dir:
        problems.append(f"run.out_dir / run.name: {cfg.run_dir}, but -o is {run_dir}")
    if problems:
        raise HFImportError("; ".join(problems))
    return cfg


def _structural(model: ModelConfig, path: str) -> object:
    """A ``STRUCTURE`` field's value, ``n_kv_heads`` None read as ``n_heads`` (the same model)."""
    value = field_value(model, path)
    return model.n_heads if path == "n_kv_heads" and value is None else value


def _check_tokenizer(cfg: Config, source: HFSource, hf_dir: Path, run_dir: Path, tok_files: list[str]) -> str:
    """The tokenizer the run will read must load and fit the model's vocabulary (checked on
    ``hf_dir``'s file, which is copied to where the config points); a line for the summary."""
    tok = cfg.data.tokenizer
    if tok.kind == "hf" and tok.path == str(run_dir / "tokenizer" / "tokenizer.json"):
        loaded = load_tokenizer("hf", str(hf_dir / "tokenizer.json"))
        check_model_vocab(loaded.vocab_size, cfg.model.vocab_size, str(hf_dir / "tokenizer.json"))
        return f"tokenizer.json (vocabulary {loaded.vocab_size}, EOS id {loaded.eos_id})"
    if tok.kind == "bytes" and source.tokenizer_kind == "bytes":
        return "bytes (a moe-dist export of a byte-level run)"
    if not tok_files:
        return f"{tok.kind} (HF_DIR has no tokenizer files: set data.tokenizer before training)"
    return f"{tok.kind} {tok.path or ''} (--set)".replace("  ", " ")


def _ema_from_keys(model: MoETransformer) -> None:
    """LPR's EMA key sums start at the keys (``LPRRouter.reset_parameters``); the export has no EMA."""
    with torch.no_grad():
        for layer in model.moe_layers():
            router = layer.gate.router
            router.ema_sums_ED.copy_(router.expert_keys)


def _write(
    cfg: Config,
    model: MoETransformer,
    source: HFSource,
    run_dir: Path,
    hf_dir: Path,
    tok_files: list[str],
    swap: bool,
    tokenizer_note: str,
    unread: int,
) -> ImportResult:
    run_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = run_dir.parent / f".{run_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        if tok_files:
            (tmp / "tokenizer").mkdir()
            for name in tok_files:
                shutil.copyfile(hf_dir / name, tmp / "tokenizer" / name)
        dumped = cfg.model_dump(mode="json")
        header = (
            f"# moe-dist import-hf {hf_dir.absolute()} ({source.arch}); continue with:\n"
            f"#   moe-dist train {run_dir / 'config.yaml'} --resume [--set parallel.ep_size=N ...]\n"
        )
        (tmp / "config.yaml").write_text(header + yaml.safe_dump(dumped, sort_keys=False))
        (tmp / "config.json").write_text(_json(dumped))
        fmt = cfg.checkpoint.resolved_format(cfg.parallel.data_parallel)
        step_dir = write_step0(tmp / "checkpoints", model, cfg, fmt)
        _replace_dir(tmp, run_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    name = cfg.model.moe.router.name
    router_note = f"{name}, imported"
    if swap:
        router_note = f"{name} initialised as its plugin says ({unread} source router tensors not read)"
    return ImportResult(
        run_dir=run_dir,
        arch=source.arch,
        step_dir=run_dir / "checkpoints" / step_dir.name,
        format=fmt,
        parameters=sum(p.numel() for p in model.parameters()),
        router=router_note,
        tokenizer=tokenizer_note,
        notes=source.notes,
    )


def _json(data: dict[str, Any]) -> str:
    return json.dumps(data, indent=1) + "\n"


def write_step0(ckpt_root: Path, model: MoETransformer, cfg: Config, fmt: str) -> Path:
    """Checkpoint step 0 of ``model`` (EP=1, one process) with a fresh AdamW's state, in ``fmt``."""
    groups = ParallelGroups.single()
    optimizer = build_optimizer(model, cfg.optim, torch.device("cpu"))
    init_optimizer_state(optimizer)  # a step at lr 0 on zero gradients: zero moments, weights unchanged
    for state in optimizer.state.values():
        state["step"].zero_()  # step 0: the first update is that of a fresh optimizer
    counts = [[0.0] * cfg.model.moe.num_experts for _ in model.moe_layers()]
    trainer = {"counts": counts, "imported_from_hf": True}
    keep = cfg.checkpoint.keep
    if fmt == "torch":
        return checkpoint.save(ckpt_root, 0, model, optimizer, groups, trainer, keep)
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        DcpSaver(groups, async_save=False).save(ckpt_root, 0, model, optimizer, None, trainer, keep)
    return ckpt_root / checkpoint.step_dir_name(0)
