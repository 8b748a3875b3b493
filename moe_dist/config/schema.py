"""Typed configuration: YAML in, validated objects out, every error at once with its dotted path.

The tree mirrors the module tree: ``model.moe.router`` configures the router of every MoE layer,
``model.moe.losses[i]`` one balancing loss. Router and loss sections are validated against the
config class of the plugin they name (plugins bring their own options), in a second pass, so
errors there carry full paths too: ``model.moe.router.top_k: must be <= num_experts (8), got 12``.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from moe_dist.balancing.base import BalancingLoss, LossConfig
from moe_dist.ops.compiled import FusedKernels
from moe_dist.ops.cpu_matmul import CpuMatmul
from moe_dist.registry import LOSSES, ROUTERS, UnknownPluginError
from moe_dist.routing.base import Router, RouterConfig

EpTransport = Literal["auto", "collective", "shm"]


class ConfigError(Exception):
    """Bad configuration; ``errors`` are ``path: message`` lines, all of them."""

    def __init__(self, errors: list[str], source: str | None = None) -> None:
        self.errors = errors
        self.source = source
        where = f" in {source}" if source else ""
        super().__init__(f"invalid configuration{where}:\n" + "\n".join(f"  {e}" for e in errors))


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ExpertsConfig(Section):
    ffn_hidden_size: int = Field(256, ge=1)
    activation: Literal["swiglu", "gelu"] = "swiglu"
    init_std: float = Field(0.02, gt=0)
    cpu_matmul: CpuMatmul = Field(
        "onednn", description="fp32 expert GEMMs on CPU: oneDNN (torch.mm where unusable) or torch.mm"
    )


class SharedExpertsConfig(Section):
    count: int = Field(0, ge=0, description="shared experts applied to every token (DeepSeek)")
    ffn_hidden_size: int = Field(256, ge=1, description="hidden size of each shared expert")


class MoEConfig(Section):
    """One MoE layer. ``router`` and ``losses`` hold plugin configs (validated against the
    class of the plugin they name by ``config_from_dict``); in YAML they are mappings."""

    num_experts: int = Field(8, ge=1)
    router: Any = Field(default_factory=lambda: {"name": "topk_softmax"})
    losses: list[Any] = Field(default_factory=list)
    experts: ExpertsConfig = Field(default_factory=ExpertsConfig)
    shared_experts: SharedExpertsConfig = Field(default_factory=SharedExpertsConfig)
    capacity_factor: float | None = Field(
        None, gt=0, description="None = dropless; else each expert takes ceil(cf * T * K / E) slots per rank"
    )
    fused_kernels: FusedKernels = Field(
        "auto",
        description="the layer's memory-bound work (experts' activation, combine's gather-and-sum) "
        "as compiled kernels: auto (on CUDA), compiled (also on CPU: ~19 s to compile per process) "
        "or eager",
    )

    @field_validator("router")
    @classmethod
    def _router_is_mapping(cls, v: Any) -> Any:
        if not isinstance(v, dict | RouterConfig):
            raise ValueError("must be a mapping with at least a name, e.g. {name: topk_softmax, top_k: 2}")
        return v

    @field_validator("losses")
    @classmethod
    def _losses_are_mappings(cls, v: list[Any]) -> list[Any]:
        for item in v:
            if not isinstance(item, dict | LossConfig):
                raise ValueError(
                    "each loss must be a mapping with a name and a coef, e.g. {name: switch, coef: 0.01}"
                )
        return v

    @property
    def router_cfg(self) -> RouterConfig:
        if not isinstance(self.router, RouterConfig):
            raise RuntimeError("MoEConfig.router was not validated; build configs with config_from_dict")
        return self.router


class ModelConfig(Section):
    vocab_size: int = Field(256, ge=2)
    dim: int = Field(128, ge=1)
    n_layers: int = Field(2, ge=1)
    n_heads: int = Field(4, ge=1)
    max_seq_len: int = Field(256, ge=1)
    rope_theta: float = Field(10000.0, gt=0)
    norm_eps: float = Field(1e-5, gt=0)
    dense_layers: int = Field(0, ge=0, description="the first N blocks use a dense FFN instead of MoE")
    dense_ffn_hidden_size: int = Field(512, ge=1)
    tie_embeddings: bool = True
    activation_checkpointing: bool = False
    moe: MoEConfig = Field(default_factory=MoEConfig)

    @model_validator(mode="after")
    def _shapes(self) -> ModelConfig:
        if self.dim % self.n_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by n_heads ({self.n_heads})")
        if (self.dim // self.n_heads) % 2:
            raise ValueError(f"head dim dim/n_heads ({self.dim // self.n_heads}) must be even for RoPE")
        if self.dense_layers > self.n_layers:
            raise ValueError(f"dense_layers ({self.dense_layers}) must be <= n_layers ({self.n_layers})")
        return self


class ParallelConfig(Section):
    ep_size: int = Field(1, ge=1, description="expert-parallel size; data-parallel size = world / ep_size")
    engine: Literal["native", "deepspeed"] = "native"
    zero_stage: int = Field(0, ge=0, le=3, description="ZeRO stage when engine is deepspeed")
    backend: Literal["auto", "nccl", "gloo"] = "auto"
    ep_transport: EpTransport = Field(
        "auto", description="token rows across EP ranks: shm (one host, gloo), collective, or auto"
    )
    timeout_s: float = Field(600.0, gt=0, description="collective timeout: a dead peer ends the job, no hang")


class OptimizerConfig(Section):
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0, description="max global grad norm; 0 disables clipping")


class ScheduleConfig(Section):
    steps: int = Field(200, ge=1)
    warmup_steps: int = Field(20, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)


class DataConfig(Section):
    paths: list[str] = Field(
        default_factory=list, description="text files, directories or globs, or .bin token files; [] = stdlib"
    )
    seq_len: int = Field(128, ge=2)
    micro_batch_size: int = Field(8, ge=1, description="sequences per rank per micro-batch")
    grad_accum: int = Field(1, ge=1)
    val_fraction: float = Field(0.05, gt=0, lt=1)
    max_bytes: int | None = Field(None, ge=1, description="cap on corpus bytes read (None = all)")


class EvalConfig(Section):
    every: int = Field(50, ge=0, description="validate every N steps (0 = only at the end)")
    batches: int = Field(8, ge=1)


class CheckpointConfig(Section):
    every: int = Field(0, ge=0, description="save every N steps (0 = only at the end)")
    keep: int = Field(2, ge=1)


class TelemetryConfig(Section):
    enabled: bool = False
    bind: str = "127.0.0.1"
    port_base: int = Field(
        9400, ge=0, le=65535, description="rank r listens on port_base + local rank; 0 = any"
    )
    interval_steps: int = Field(1, ge=1, description="fetch device statistics every N steps")
    min_publish_interval_s: float = Field(
        1.0, ge=0, description="...but at most this often (steps in between are summed, never lost)"
    )
    file_sd_path: str | None = Field(None, description="write Prometheus file_sd targets here (rank 0)")
    pushgateway: str | None = Field(None, description="host:port of a Pushgateway for the end-of-job summary")
    port_fallback: bool = Field(True, description="if the port is busy, take a free one and say so")
    tls_cert: str | None = None
    tls_key: str | None = None
    basic_auth_user: str | None = None
    basic_auth_password_env: str | None = Field(None, description="environment variable holding the password")
    advertise_host: str | None = Field(
        None,
        description="host Prometheus scrapes (file_sd); default: bind, or the node name if bind is 0.0.0.0",
    )
    linger_s: float = Field(0.0, ge=0, description="keep the exporters up this long after the last step")
    wait_for_scrape_s: float = Field(
        0.0, ge=0, description="at start, wait up to this long for Prometheus' first scrape (short jobs)"
    )
    push_timeout_s: float = Field(5.0, gt=0, description="timeout of the end-of-job Pushgateway push")
    timing: bool = Field(
        True, description="time all-to-all and expert compute per layer (CUDA: syncs around each phase)"
    )


class RunConfig(Section):
    name: str = "run"
    out_dir: str = "runs"
    seed: int = 1234
    log_every: int = Field(1, ge=1)
    job_id: str | None = Field(None, description="label for telemetry; default: name + start time")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    threads: int | None = Field(None, ge=1, description="torch intra-op threads per process")
    retain_freed_memory: bool = Field(
        True, description="CPU runs: keep freed host memory mapped, no page faults per step (host_memory.py)"
    )


class Config(Section):
    run: RunConfig = Field(default_factory=RunConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    parallel: ParallelConfig = Field(default_factory=ParallelConfig)
    optim: OptimizerConfig = Field(default_factory=OptimizerConfig)
    schedule: ScheduleConfig = Field(default_factory=ScheduleConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    eval: EvalConfig = Field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)


# ---------------------------------------------------------------- validation of plugin sections


def format_pydantic_errors(exc: ValidationError, prefix: str) -> list[str]:
    out = []
    for err in exc.errors():
        loc = ".".join(str(p) for p in (prefix, *err["loc"]) if p != "")
        msg = err["msg"]
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        elif err["type"] == "literal_error" and err["loc"] and err["loc"][-1] == "name":
            continue  # a subclass pins its own name; the registry lookup already chose the class
        if "input" in err and err["type"] not in ("extra_forbidden", "missing"):
            msg = f"{msg}, got {err['input']!r}"
        out.append(f"{loc}: {msg}")
    return out


def validate_router(raw: dict[str, Any], hidden: int, num_experts: int, prefix: str) -> tuple[Any, list[str]]:
    """Validate a router section against its plugin's config class; (config or None, errors)."""
    name = raw.get("name", RouterConfig.model_fields["name"].default)
    try:
        cls: type[Router] = ROUTERS.get(name)
    except (UnknownPluginError, ImportError) as exc:
        return None, [f"{prefix}.name: {exc}"]
    try:
        cfg = cls.Config.model_validate({**raw, "name": name})
    except ValidationError as exc:
        return None, format_pydantic_errors(exc, prefix)
    return cfg, [f"{prefix}.{m}" for m in cls.validate_config(cfg, hidden, num_experts)]


def validate_losses(
    raws: list[dict[str, Any]], router_cls: type[Router] | None, num_experts: int, prefix: str
) -> tuple[list[Any], list[str]]:
    configs, errors = [], []
    for i, raw in enumerate(raws):
        where = f"{prefix}.{i}"
        if not isinstance(raw, dict) or "name" not in raw:
            errors.append(f"{where}.name: required (one of {', '.join(LOSSES.names())})")
            continue
        try:
            cls: type[BalancingLoss] = LOSSES.get(raw["name"])
        except (UnknownPluginError, ImportError) as exc:
            errors.append(f"{where}.name: {exc}")
            continue
        try:
            cfg = cls.Config.model_validate(raw)
        except ValidationError as exc:
            errors.extend(format_pydantic_errors(exc, where))
            continue
        if router_cls is not None:
            errors.extend(f"{where}.{m}" for m in cls.validate_config(cfg, router_cls, num_experts))
        configs.append(cfg)
    return configs, errors


def _as_raw(section: Any) -> dict[str, Any]:
    if isinstance(section, BaseModel):
        return section.model_dump(mode="json")
    return dict(section)


def validate_moe(moe: MoEConfig, hidden: int, prefix: str = "model.moe") -> list[str]:
    """Swap the raw plugin sections of ``moe`` for validated plugin configs; returns errors."""
    router_cfg, errors = validate_router(_as_raw(moe.router), hidden, moe.num_experts, f"{prefix}.router")
    router_cls = ROUTERS.get(router_cfg.name) if router_cfg is not None else None
    loss_cfgs, loss_errors = validate_losses(
        [_as_raw(x) for x in moe.losses], router_cls, moe.num_experts, f"{prefix}.losses"
    )
    errors += loss_errors
    if not errors:
        object.__setattr__(moe, "router", router_cfg)
        object.__setattr__(moe, "losses", loss_cfgs)
    return errors


def _cross_checks(cfg: Config) -> list[str]:
    errors = []
    moe, par = cfg.model.moe, cfg.parallel
    if moe.num_experts % par.ep_size:
        errors.append(
            f"parallel.ep_size: must divide model.moe.num_experts ({moe.num_experts}), got {par.ep_size}"
        )
    if cfg.data.seq_len > cfg.model.max_seq_len:
        errors.append(
            f"data.seq_len: must be <= model.max_seq_len ({cfg.model.max_seq_len}), got {cfg.data.seq_len}"
        )
    if cfg.schedule.warmup_steps > cfg.schedule.steps:
        errors.append(f"schedule.warmup_steps: must be <= schedule.steps ({cfg.schedule.steps})")
    if par.engine == "deepspeed":
        errors += deepspeed_engine_errors(cfg)
    return errors


def deepspeed_engine_errors(cfg: Config) -> list[str]:
    """What ``parallel.engine: deepspeed`` cannot do (checked with the config, and again by the
    engine for configs built in code)."""
    errors = []
    if cfg.parallel.zero_stage == 3:
        errors.append("parallel.zero_stage: DeepSpeed MoE layers do not support ZeRO stage 3 (use 0, 1 or 2)")
    return errors


def check_world_size(cfg: Config, world_size: int) -> None:
    """Errors that need the launch shape (known only at run time)."""
    if world_size % cfg.parallel.ep_size:
        raise ConfigError(
            [
                f"parallel.ep_size: must divide the world size ({world_size}), got {cfg.parallel.ep_size} "
                f"(start a multiple of {cfg.parallel.ep_size} processes, e.g. torchrun --nproc-per-node "
                f"{cfg.parallel.ep_size}, or set parallel.ep_size)"
            ]
        )


# ---------------------------------------------------------------- loading, overrides


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
    p = Path(path)
    if not p.is_file():
        raise ConfigError([f"config file not found: {p}"])
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError([f"not valid YAML: {exc}"], source=str(p)) from None
    if not isinstance(data, dict):
        raise ConfigError([f"top level must be a mapping, got {type(data).__name__}"], source=str(p))
    return data


def _without(data: Any, locs: list[tuple[Any, ...]]) -> Any:
    """A deep copy of ``data`` with the values at ``locs`` removed (their defaults then apply)."""
    data = copy.deepcopy(data)
    for loc in locs:
        node = data
        for part in loc[:-1]:
            node = node.get(part) if isinstance(node, dict) else None
        if isinstance(node, dict):
            node.pop(loc[-1], None)
    return data


def _second_pass_errors(data: dict[str, Any], exc: ValidationError) -> list[str]:
    """Plugin and cross-field errors of a config whose first pass failed, so that all errors show
    at once: the invalid values are dropped (defaults stand in) and the rest is checked. A check
    that reads a dropped value is left out, so a default never causes an error of its own."""
    locs = [tuple(e["loc"]) for e in exc.errors()]
    dropped = [".".join(str(p) for p in loc) for loc in locs]
    try:
        cfg = Config.model_validate(_without(data, locs))
    except (ValidationError, TypeError, ValueError):
        return []  # nested structural errors: already reported by the first pass
    sizes = ("model", "model.moe", "model.moe.num_experts")
    errors = [] if any(d in sizes for d in dropped) else validate_moe(cfg.model.moe, cfg.model.dim)
    return errors + [m for m in _cross_checks(cfg) if not any(d in m for d in dropped)]


def config_from_dict(data: dict[str, Any], source: str | None = None) -> Config:
    try:
        cfg = Config.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_pydantic_errors(exc, "") + _second_pass_errors(data, exc), source) from None
    errors = validate_moe(cfg.model.moe, cfg.model.dim) + _cross_checks(cfg)
    if errors:
        raise ConfigError(errors, source)
    return cfg


def load_config(path: str | os.PathLike[str] | None, overrides: list[str] | None = None) -> Config:
    data = read_yaml(path) if path is not None else {}
    errors = apply_overrides(data, overrides or [])
    if errors:
        raise ConfigError(errors, str(path) if path else None)
    return config_from_dict(data, str(path) if path else None)


def config_to_dict(cfg: Config) -> dict[str, Any]:
    """A plain dict that round-trips through YAML and ``config_from_dict``."""
    return cfg.model_dump(mode="json")
