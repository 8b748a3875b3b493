"""Typed configuration: the sections of a run, validated with every error at its dotted path.

The tree mirrors the module tree: ``model.moe.router`` configures the router of every MoE layer,
``model.moe.losses[i]`` one balancing loss. Validation, in the order pydantic runs it:

1. Every section checks its own fields; unknown keys are errors, not ignored.
2. The router and loss sections are resolved to the config class of the plugin they name
   (``plugins.py``), so ANY ``MoEConfig`` (from YAML or built in code) holds plugin config
   objects and errors carry full paths: ``model.moe.router.top_k: ...``.
3. ``ModelConfig`` checks its shapes, each error at its field: ``model.dim: ...``.
4. Checks that need sizes from elsewhere are functions, run by the loader (``loading.py``) on a
   whole ``Config`` and by the layers for configs built in code: ``validate_moe`` (the plugins'
   checks, which need the hidden size), ``cross_field_errors`` (EP vs experts, sequence
   lengths, schedule, engine) and ``check_world_size`` (the launch shape, known at run time).
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from moe_dist.config.errors import ConfigError, field_error
from moe_dist.config.plugins import PluginLossConfig, PluginRouterConfig, default_router, plugin_errors
from moe_dist.ops.compiled import FusedKernels
from moe_dist.ops.cpu_matmul import CpuMatmul
from moe_dist.ops.grouped_expert_mlp import ExpertsBackend

EpTransport = Literal["auto", "collective", "shm"]


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ExpertsConfig(Section):
    ffn_hidden_size: int = Field(256, ge=1)
    activation: Literal["swiglu", "gelu"] = "swiglu"
    init_std: float = Field(0.02, gt=0)
    cpu_matmul: CpuMatmul = Field(
        "onednn", description="fp32 expert GEMMs on CPU: oneDNN (torch.mm where unusable) or torch.mm"
    )
    backend: ExpertsBackend = Field(
        "auto",
        description="grouped_mm (one grouped GEMM per projection), loop (a GEMM per expert), or auto "
        "(grouped_mm on CUDA, loop on CPU, where it is faster)",
    )


class SharedExpertsConfig(Section):
    count: int = Field(0, ge=0, description="shared experts applied to every token (DeepSeek)")
    ffn_hidden_size: int = Field(256, ge=1, description="hidden size of each shared expert")


class MoEConfig(Section):
    """One MoE layer. ``router`` and ``losses`` hold the config objects of the plugins they name
    (in YAML: mappings with a ``name``), resolved when the section is validated."""

    num_experts: int = Field(8, ge=1)
    router: PluginRouterConfig = Field(default_factory=default_router)
    losses: list[PluginLossConfig] = Field(default_factory=list)
    experts: ExpertsConfig = Field(default_factory=ExpertsConfig)
    shared_experts: SharedExpertsConfig = Field(default_factory=SharedExpertsConfig)
    capacity_factor: float | None = Field(
        None, gt=0, description="None = dropless; else each expert takes ceil(cf * T * K / E) slots per rank"
    )
    fused_kernels: FusedKernels = Field(
        "auto",
        description="the layer's memory-bound work (experts' activation, combine's gather-and-sum) "
        "as compiled kernels: auto (on CUDA), compiled (also on CPU, after a compile in each process) "
        "or eager",
    )


class ModelConfig(Section):
    vocab_size: int = Field(256, ge=2)
    dim: int = Field(128, ge=1)
    n_layers: int = Field(2, ge=1)
    n_heads: int = Field(4, ge=1)
    n_kv_heads: int | None = Field(
        None, ge=1, description="key/value heads (grouped-query attention); None = n_heads"
    )
    qk_norm: bool = Field(False, description="RMSNorm over each head of q and k before RoPE (Qwen3)")
    head_dim: int | None = Field(
        None, ge=2, description="attention head dim; None = dim / n_heads (Qwen3-30B-A3B: 128 at dim 2048)"
    )
    max_seq_len: int = Field(256, ge=1)
    rope_theta: float = Field(10000.0, gt=0)
    norm_eps: float = Field(1e-5, gt=0)
    dense_layers: int = Field(0, ge=0, description="the first N blocks use a dense FFN instead of MoE")
    dense_ffn_hidden_size: int = Field(512, ge=1)
    tie_embeddings: bool = True
    activation_checkpointing: bool = False
    fp32_residual: bool = Field(
        False,
        description="under bf16 autocast keep the residual stream (embedding output and block sums) in "
        "fp32 (Megatron's --fp32-residual-connection); false: the autocast dtype, Megatron's default "
        "and what FSDP's bf16 parameters give",
    )
    compile: bool = Field(
        False,
        description="torch.compile each transformer block (torchtitan's per-block compile) and each "
        "MoE layer's gate (router + losses); the dispatch and experts keep their own kernels; off "
        "until measured on a GPU",
    )
    moe: MoEConfig = Field(default_factory=MoEConfig)

    @model_validator(mode="after")
    def _shapes(self) -> ModelConfig:
        # Raised at the field, so the message is "model.dim: ...", not the whole section.
        if self.head_dim is not None:
            if self.head_dim % 2:
                msg = "must be even (RoPE rotates pairs)"
                raise field_error(("head_dim",), "model_shape", msg, self.head_dim)
        elif self.dim % self.n_heads:
            msg = f"must be divisible by model.n_heads ({self.n_heads})"
            raise field_error(("dim",), "model_shape", msg, self.dim)
        elif (self.dim // self.n_heads) % 2:
            msg = f"must be a multiple of 2 * model.n_heads ({2 * self.n_heads}): RoPE needs an even head dim"
            raise field_error(("dim",), "model_shape", msg, self.dim)
        if self.n_kv_heads is not None and self.n_heads % self.n_kv_heads:
            msg = f"must divide model.n_heads ({self.n_heads})"
            raise field_error(("n_kv_heads",), "model_shape", msg, self.n_kv_heads)
        if self.dense_layers > self.n_layers:
            msg = f"must be <= model.n_layers ({self.n_layers})"
            raise field_error(("dense_layers",), "model_shape", msg, self.dense_layers)
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
    data_parallel: Literal["fsdp", "ddp", "replicate"] = Field(
        "replicate",
        description="native engine: fsdp (FSDP2 shards parameters, gradients, AdamW state), ddp (torch DDP),"
        " replicate (every rank holds everything; our bucketed all-reduce)",
    )


class OptimizerConfig(Section):
    lr: float = Field(3e-3, gt=0)
    weight_decay: float = Field(0.1, ge=0)
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = Field(1e-8, gt=0)
    grad_clip: float = Field(1.0, ge=0, description="max global grad norm; 0 disables clipping")


class ScheduleConfig(Section):
    """The learning rate over optimizer steps (``training/optim.py`` ``lr_at`` has the formulas)."""

    kind: Literal["cosine", "wsd", "linear", "constant"] = Field(
        "cosine",
        description="after warmup: cosine or linear decay to min_lr_ratio, constant, or wsd "
        "(warmup-stable-decay as Hugging Face's get_wsd_schedule)",
    )
    steps: int = Field(200, ge=1)
    warmup_steps: int = Field(20, ge=0)
    min_lr_ratio: float = Field(0.1, ge=0, le=1)
    warmup_start_ratio: float = Field(
        0.0, ge=0, le=1, description="cosine/linear/constant: warmup starts from this fraction of the peak"
    )
    decay_steps: int | None = Field(
        None, ge=0, description="wsd: length of the decay phase (None = 20% of steps, LPR's 5/75/20 split)"
    )
    decay_shape: Literal["cosine", "linear", "1-sqrt"] = Field(
        "cosine", description="wsd: shape of the decay phase (HF decay_type; LPR used the default cosine)"
    )

    def wsd_decay_steps(self) -> int:
        return self.decay_steps if self.decay_steps is not None else int(0.2 * self.steps)


class TokenizerConfig(Section):
    kind: Literal["bytes", "hf"] = Field(
        "bytes", description="bytes: a token per byte; hf: a tokenizers file"
    )
    path: str | None = Field(None, description="tokenizer.json (kind hf), e.g. from moe-dist train-tokenizer")

    @model_validator(mode="after")
    def _path_for_hf(self) -> TokenizerConfig:
        if self.kind == "hf" and not self.path:
            raise field_error(("path",), "tokenizer_path", "required with kind 'hf' (a tokenizer.json)", None)
        return self


class HFDataConfig(Section):
    path: str = Field(description="a datasets builder (json, parquet, text, csv) or a save_to_disk directory")
    data_files: list[str] = Field(default_factory=list, description="local files or globs for the builder")
    text_field: str = "text"


class DataConfig(Section):
    paths: list[str] = Field(
        default_factory=list,
        description="text files, directories, globs or indexed-dataset prefixes, optionally with "
        "Megatron blend weights ([0.3, A, 0.7, B]); [] = stdlib",
    )
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    hf: HFDataConfig | None = Field(None, description="local files through datasets, cached beside the run")
    document_mask: bool = Field(False, description="attention stops at document boundaries")
    seq_len: int = Field(128, ge=2)
    micro_batch_size: int = Field(8, ge=1, description="sequences per rank per micro-batch")
    grad_accum: int = Field(1, ge=1)
    val_fraction: float = Field(0.05, gt=0, lt=1)
    max_bytes: int | None = Field(None, ge=1, description="cap on corpus bytes read (None = all)")

    @field_validator("paths", mode="before")
    @classmethod
    def _weights_as_text(cls, value: object) -> object:
        # Blend weights arrive from YAML as numbers: [0.3, A, 0.7, B].
        if isinstance(value, list):
            return [str(v) if isinstance(v, int | float) and not isinstance(v, bool) else v for v in value]
        return value

    @model_validator(mode="after")
    def _one_source(self) -> DataConfig:
        if self.hf is not None and self.paths:
            raise field_error(("hf",), "data_source", "use data.hf or data.paths, not both", None)
        return self


class EvalConfig(Section):
    every: int = Field(50, ge=0, description="validate every N steps (0 = only at the end)")
    batches: int = Field(8, ge=1)


class CheckpointConfig(Section):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)

    every: int = Field(0, ge=0, description="save every N steps (0 = only at the end)")
    keep: int = Field(2, ge=1)
    format: Literal["auto", "dcp", "torch"] = Field(
        "auto",
        description="dcp: torch.distributed.checkpoint, a shard per rank; torch: one torch.save file on"
        " rank 0; auto: dcp under fsdp/ddp, torch under replicate",
    )
    async_save: bool = Field(
        False, alias="async", description="dcp only: write in the background, the step does not wait"
    )

    def resolved_format(self, data_parallel: str) -> Literal["dcp", "torch"]:
        if self.format != "auto":
            return self.format
        return "torch" if data_parallel == "replicate" else "dcp"


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
    timing: bool | None = Field(
        None,
        description="time all-to-all and expert compute per layer; None: on CPU only (on CUDA the "
        "timing synchronises the device around each phase, so it is opt-in there)",
    )


class ProfileConfig(Section):
    """``run.profile``: a torch.profiler Chrome trace per rank of steps ``start_step`` .. ``start_step +
    steps - 1`` (``training/profiling.py``); off while ``steps`` is 0."""

    start_step: int = Field(5, ge=1, description="first profiled step (1-based; skip the warm-up steps)")
    steps: int = Field(0, ge=0, description="steps to profile (0 = off)")
    dir: str | None = Field(None, description="where the traces go (default RUN_DIR/profile)")


class RunConfig(Section):
    name: str = "run"
    out_dir: str = "runs"
    seed: int = 1234
    log_every: int = Field(1, ge=1)
    job_id: str | None = Field(None, description="label for telemetry; default: name + start time")
    device: Literal["auto", "cpu", "cuda"] = "auto"
    precision: Literal["auto", "fp32", "bf16"] = Field(
        "auto",
        description="bf16: fp32 master weights and AdamW state, bf16 compute (autocast plus the "
        "experts' own casts), fp32 gradient reduction (Megatron's --bf16); fp32: everything in fp32; "
        "auto: bf16 on CUDA, fp32 on CPU",
    )
    threads: int | None = Field(None, ge=1, description="torch intra-op threads per process")
    max_minutes: float | None = Field(
        None,
        gt=0,
        description="save a checkpoint and exit 143 (to be resumed) after this many minutes of training, "
        "before a wall-time limit (Megatron's --exit-duration-in-mins; training/preemption.py)",
    )
    retain_freed_memory: bool = Field(
        True, description="CPU runs: keep freed host memory mapped, no page faults per step (host_memory.py)"
    )
    profile: ProfileConfig = Field(default_factory=ProfileConfig)
    sync_debug: Literal["off", "warn", "error"] = Field(
        "off",
        description="CUDA: torch.cuda.set_sync_debug_mode around every step that neither logs, evaluates "
        "nor saves (from the third step on): warn or raise at any host synchronisation in it",
    )
    peak_tflops: float | None = Field(
        None, gt=0, description="the device's peak TFLOP/s for MFU (default: a table of GPUs, flops.py)"
    )


class TensorBoardConfig(Section):
    enabled: bool = False
    dir: str | None = Field(None, description="event files go here (default RUN_DIR/tensorboard)")


class WandbConfig(Section):
    enabled: bool = False
    mode: Literal["offline", "online"] = Field(
        "offline", description="offline: files under dir only (upload later with `wandb sync`)"
    )
    project: str = "moe_dist"
    name: str | None = Field(None, description="the W&B run name (default run.name)")
    dir: str | None = Field(None, description="W&B's wandb/ folder goes here (default RUN_DIR)")


class LoggingConfig(Section):
    """``logging``: TensorBoard and W&B loggers on rank 0 (``training/loggers/``), off by default."""

    tensorboard: TensorBoardConfig = Field(default_factory=TensorBoardConfig)
    wandb: WandbConfig = Field(default_factory=WandbConfig)


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
    logging: LoggingConfig = Field(default_factory=LoggingConfig)

    @property
    def run_dir(self) -> Path:
        """Where the run writes its logs and checkpoints: ``run.out_dir / run.name``."""
        return Path(self.run.out_dir) / self.run.name


# ---------------------------------------------------------------- checks that need sizes from elsewhere


def validate_moe(moe: MoEConfig, hidden: int, prefix: str = "model.moe") -> list[str]:
    """The plugins' checks that need the hidden size or another plugin (``top_k <= num_experts``,
    SimBal needs a router weight, ...); returns ``path: message`` lines, empty when fine."""
    return plugin_errors(moe.router, list(enumerate(moe.losses)), hidden, moe.num_experts, prefix)


def cross_field_errors(cfg: Config) -> list[str]:
    """Checks across sections of a whole config; ``path: message`` lines."""
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
    sched = cfg.schedule
    if sched.warmup_steps > sched.steps:
        errors.append(f"schedule.warmup_steps: must be <= schedule.steps ({sched.steps})")
    elif sched.kind == "wsd" and sched.warmup_steps + sched.wsd_decay_steps() > sched.steps:
        errors.append(
            f"schedule.decay_steps: warmup ({sched.warmup_steps}) + decay ({sched.wsd_decay_steps()}) "
            f"must be <= schedule.steps ({sched.steps})"
        )
    if par.engine == "deepspeed":
        errors += deepspeed_engine_errors(cfg)
    elif cfg.checkpoint.async_save and cfg.checkpoint.resolved_format(par.data_parallel) != "dcp":
        errors.append(
            "checkpoint.async: needs checkpoint.format dcp (torch.save writes on rank 0 in the step)"
        )
    if par.data_parallel == "fsdp" and cfg.checkpoint.format == "torch":
        errors.append(
            "checkpoint.format: torch gathers the whole model on rank 0; under fsdp use dcp (or auto)"
        )
    return errors


def deepspeed_engine_errors(cfg: Config) -> list[str]:
    """What ``parallel.engine: deepspeed`` cannot do (checked with the config, and again by the
    engine for configs built in code)."""
    errors = []
    if cfg.parallel.zero_stage == 3:
        errors.append("parallel.zero_stage: DeepSpeed MoE layers do not support ZeRO stage 3 (use 0, 1 or 2)")
    if cfg.parallel.data_parallel != "replicate":
        errors.append(
            f"parallel.data_parallel: {cfg.parallel.data_parallel} is the native engine's; DeepSpeed shards"
            " with parallel.zero_stage (use replicate)"
        )
    if cfg.checkpoint.format == "dcp" or cfg.checkpoint.async_save:
        errors.append("checkpoint.format: DeepSpeed writes its own checkpoint files (no dcp, no async)")
    return errors


def world_size_errors(cfg: Config, world_size: int) -> list[str]:
    """Errors that need the launch shape (known only at run time); ``path: message`` lines that
    ``load_config(..., world_size=N)`` reports with the config's own errors."""
    errors = []
    if world_size % cfg.parallel.ep_size:
        errors.append(
            f"parallel.ep_size: must divide the world size ({world_size}), got {cfg.parallel.ep_size} "
            f"(start a multiple of {cfg.parallel.ep_size} processes, e.g. torchrun --nproc-per-node "
            f"{cfg.parallel.ep_size}, or set parallel.ep_size)"
        )
    if cfg.parallel.data_parallel == "fsdp" and world_size == 1:
        errors.append(
            "parallel.data_parallel: fsdp shards over the data-parallel ranks, and a single process has"
            " none to shard over (start 2 or more processes, or use replicate)"
        )
    return errors


def check_world_size(cfg: Config, world_size: int) -> None:
    """``world_size_errors`` as a ConfigError (for configs built in code)."""
    errors = world_size_errors(cfg, world_size)
    if errors:
        raise ConfigError(errors)
