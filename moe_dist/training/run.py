"""The training loop (``moe-dist train CONFIG``), readable top to bottom, nanoGPT style.

1. Start: process groups (DP x EP), device, data, model (same seed on every rank), AdamW.
2. Resume (``--resume``): weights, optimizer, step, RNG states, trainer state; the data position
   is the step itself (batches are a pure function of seed, step, micro-batch and rank).
3. Loop, one optimizer step at a time:
   a. ``grad_accum`` micro-batches: forward (bf16 autocast on GPU), loss = cross-entropy + the
      MoE aux terms, backward;
   b. gradient reduction (dense over the world, experts over expert-DP), global norm, clipping;
   c. a non-finite loss or norm on any rank skips the step on every rank, and says so;
   d. ``optimizer.step()``, then ``finish_step``: global expert counts, router after-step hooks;
   e. log (console, metrics.jsonl, telemetry), validate every ``eval.every``, checkpoint every
      ``checkpoint.every``.
4. End: final validation, final checkpoint, summary.json, telemetry summary.

Shape legend: B micro-batch, S sequence, V vocabulary, E experts.
"""

from __future__ import annotations

import contextlib
import json
import math
import socket
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F

from moe_dist.config import Config, ConfigError, check_world_size
from moe_dist.data.corpus import TokenBatches, load_corpus
from moe_dist.models import MoETransformer, build_model
from moe_dist.parallel.groups import ParallelGroups
from moe_dist.parallel.startup import init_distributed, shutdown_distributed
from moe_dist.training import checkpoint
from moe_dist.training.grad_sync import GradSync
from moe_dist.training.host_memory import retain_freed_memory
from moe_dist.training.metrics_log import Console, MetricsLog
from moe_dist.training.optim import build_optimizer, lr_at, set_lr
from moe_dist.training.step_hook import finish_step


@dataclass
class TrainResult:
    """What a run did; identical on every rank (losses are group means)."""

    run_dir: Path
    start_step: int
    losses: dict[int, float] = field(default_factory=dict)  # step -> mean task loss over ranks
    val_losses: dict[int, float] = field(default_factory=dict)
    skipped_steps: list[int] = field(default_factory=list)
    tokens_per_s: float = 0.0
    seconds: float = 0.0
    counts_per_layer: list[list[float]] = field(default_factory=list)  # whole-run global counts

    @property
    def final_val_loss(self) -> float | None:
        return self.val_losses[max(self.val_losses)] if self.val_losses else None


def pick_device(name: str, local_rank: int) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError(["run.device: cuda requested but CUDA is not available"])
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def run_dir_of(cfg: Config) -> Path:
    return Path(cfg.run.out_dir) / cfg.run.name


def start_run(
    cfg: Config, local_rank: int, stream: Any
) -> tuple[ParallelGroups, torch.device, Console, TokenBatches]:
    """Both engines' start, process groups up: DP x EP groups, threads, device, console, data."""
    groups = ParallelGroups.build(cfg.parallel.ep_size, cfg.parallel.ep_transport)
    if cfg.run.threads:
        torch.set_num_threads(cfg.run.threads)
    device = pick_device(cfg.run.device, local_rank)
    console = Console(cfg.schedule.steps, groups.rank == 0, cfg.run.log_every, stream)
    if device.type == "cpu" and cfg.run.retain_freed_memory:
        reason = retain_freed_memory()
        if reason is not None and groups.rank == 0:
            print(f"run.retain_freed_memory: left off: {reason}", file=stream, flush=True)
    batches = TokenBatches(load_corpus(cfg.data), cfg.data, cfg.run.seed, cfg.model.vocab_size)
    return groups, device, console, batches


def tokens_per_optimizer_step(cfg: Config, groups: ParallelGroups) -> int:
    """Tokens the whole world trains on per optimizer step."""
    return groups.world_size * cfg.data.grad_accum * cfg.data.micro_batch_size * cfg.data.seq_len


def _all_reduce_mean(losses: torch.Tensor, dropped: torch.Tensor, groups: ParallelGroups) -> list[float]:
    """Mean of the loss terms over ranks, and dropped counts summed over ranks: one collective."""
    t = torch.cat([losses, dropped.to(losses.device)])
    if groups.distributed:
        dist.all_reduce(t)
        t[: len(losses)] /= groups.world_size
    return t.tolist()


def _layer_record(block_index: int, counts_E: torch.Tensor, dropped: float) -> dict[str, Any]:
    from moe_dist.metrics import load_summary  # noqa: PLC0415 - metrics is optional at import time

    return {"layer": block_index, "counts": counts_E.tolist(), **load_summary(counts_E, dropped)}


def end_summary(
    run_dir: Path,
    step: int,
    result: TrainResult,
    groups: ParallelGroups,
    moe_blocks: list[int],
    write: bool,
    engine: dict[str, Any] | None = None,
    checkpoints: Path | None = None,
) -> dict[str, Any]:
    """summary.json's content (written when ``write``): ``engine`` fields go before the layers."""
    summary: dict[str, Any] = {
        "run_dir": str(run_dir),
        "steps": step,
        "final_loss": result.losses.get(step),
        "val_loss": result.final_val_loss,
        "tokens_per_s": result.tokens_per_s,
        "seconds": result.seconds,
        "world_size": groups.world_size,
        "ep_size": groups.ep_size,
        **(engine or {}),
        "layers": [{"layer": b, "counts": c} for b, c in zip(moe_blocks, result.counts_per_layer)],
    }
    if checkpoints is not None:
        summary["checkpoints"] = str(checkpoints)
    summary["metrics_log"] = str(run_dir / "metrics.jsonl")
    if write:
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    return summary


@torch.no_grad()
def evaluate(
    model: MoETransformer,
    batches: TokenBatches,
    num_batches: int,
    groups: ParallelGroups,
    device: torch.device,
    autocast: Any,
) -> float:
    """Mean validation loss over a fixed set of ``num_batches`` batches, whatever the world size.

    Rank r evaluates batches r, r + W, ...; a rank with none left still runs a forward (weight 0)
    so every EP group issues the same all-to-alls.
    """
    was_training = model.training
    model.eval()
    total = torch.zeros(2, dtype=torch.float64, device=device)  # (sum of losses, count)
    rounds = math.ceil(num_batches / groups.world_size)
    for r in range(rounds):
        index = r * groups.world_size + groups.rank
        x_BS, y_BS = batches.val_batch(index if index < num_batches else 0)
        with autocast():
            logits_BSV, _, _ = model(x_BS.to(device))
        loss = F.cross_entropy(logits_BSV.float().flatten(0, 1), y_BS.to(device).flatten())
        if index < num_batches:
            total += torch.stack([loss.double(), torch.ones((), dtype=torch.float64, device=device)])
    if groups.distributed:
        dist.all_reduce(total)
    model.train(was_training)
    return float(total[0] / total[1])


def _start_telemetry(cfg: Config, groups: ParallelGroups, model: MoETransformer, local_rank: int) -> Any:
    if not cfg.telemetry.enabled:
        return None
    try:
        from moe_dist.telemetry.start import start_telemetry  # noqa: PLC0415 - only when enabled
    except ImportError as exc:
        raise ConfigError([f"telemetry.enabled: the telemetry module cannot be imported ({exc})"]) from None
    job_id = cfg.run.job_id or f"{cfg.run.name}-{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"
    tel = start_telemetry(
        cfg.telemetry,
        groups,
        job_id=job_id,
        model_name=cfg.run.name,
        router_name=cfg.model.moe.router_cfg.name,
        local_rank=local_rank,
        node=socket.gethostname(),
    )
    for layer in model.moe_layers():
        if hasattr(layer, "timing"):
            layer.timing = bool(getattr(tel, "wants_timing", False))
    return tel


def train(
    cfg: Config, resume: str | None = None, stop_after: int | None = None, stream: Any = None
) -> TrainResult:
    """Train ``cfg``; ``resume`` is a checkpoint root or step dir ("" = this run's latest).

    ``stop_after`` ends the loop after that step without the final save, as if the job had been
    killed (tests use it for kill-and-resume).
    """
    if cfg.parallel.engine == "deepspeed":  # the same run through the DeepSpeed engine (ZeRO)
        from moe_dist.integrations import deepspeed_engine  # noqa: PLC0415 - deepspeed only when asked

        return deepspeed_engine.train(cfg, resume=resume, stop_after=stop_after, stream=stream)
    # ---- 1. start
    own_pg = not (dist.is_available() and dist.is_initialized())
    info = init_distributed(cfg.parallel)
    tel = None
    try:
        check_world_size(cfg, info.world_size)
        groups, device, console, batches = start_run(cfg, info.local_rank, stream)
        is_main = groups.rank == 0
        model = build_model(cfg.model, groups, seed=cfg.run.seed).to(device)
        model.train()
        optimizer = build_optimizer(model, cfg.optim, device)
        sync = GradSync(model, groups)
        torch.manual_seed(cfg.run.seed + 1000 + groups.rank)  # per-rank randomness (router jitter)
        use_bf16 = device.type == "cuda"

        def autocast() -> contextlib.AbstractContextManager:
            if use_bf16:
                return torch.autocast("cuda", dtype=torch.bfloat16)
            return contextlib.nullcontext()

        run_dir = run_dir_of(cfg)
        ckpt_root = run_dir / "checkpoints"
        moe_blocks = [i for i, b in enumerate(model.blocks) if b.is_moe]
        counts_total = [torch.zeros(cfg.model.moe.num_experts, dtype=torch.float64) for _ in moe_blocks]

        # ---- 2. resume
        start_step = 0
        resume_path = checkpoint.resume_from(resume, ckpt_root, groups, console.stream)
        if resume_path is not None:
            loaded = checkpoint.load(resume_path, model, optimizer, groups)
            start_step = loaded.step
            counts_total = loaded.counts(counts_total)
            console.say(
                f"resumed from {loaded.path} at step {start_step}"
                + ("" if loaded.rng_restored else " (new EP/world size: RNG streams reseeded)")
            )
        if is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=1) + "\n")
        log = (
            MetricsLog(run_dir / "metrics.jsonl", start_step if resume_path is not None else None)
            if is_main
            else None
        )
        tel = _start_telemetry(cfg, groups, model, info.local_rank)
        n = model.num_params()
        console.say(
            f"{cfg.run.name}: {n['total']:,} parameters on rank 0 ({n['expert']:,} in experts), "
            f"world {groups.world_size}"
            f" = DP {groups.dp_size} x EP {groups.ep_size}, device {device}, data: {batches.source}"
        )
        result = TrainResult(run_dir=run_dir, start_step=start_step)
        tokens_per_step = tokens_per_optimizer_step(cfg, groups)
        t_run = time.perf_counter()
        step = start_step

        # ---- 3. loop
        for step in range(start_step + 1, cfg.schedule.steps + 1):
            t0 = time.perf_counter()
            lr = lr_at(step - 1, cfg.optim, cfg.schedule)
            set_lr(optimizer, lr)
            # a. micro-batches
            # sums stay on the device: one host sync per step, in the reduction below
            task_sum = torch.zeros((), dtype=torch.float64, device=device)
            aux_sums: dict[str, torch.Tensor] = {}
            for micro in range(cfg.data.grad_accum):
                x_BS, y_BS = batches.train_batch(step - 1, micro, groups.rank)
                with autocast():
                    logits_BSV, aux_loss, aux_terms = model(x_BS.to(device))
                task = F.cross_entropy(logits_BSV.float().flatten(0, 1), y_BS.to(device).flatten())
                ((task + aux_loss) / cfg.data.grad_accum).backward()
                task_sum += task.detach().double()
                for k, v in aux_terms.items():
                    aux_sums[k] = aux_sums.get(k, 0.0) + v.detach().double()
            # b. gradients
            sync.reduce()
            grad_norm = float(sync.clip(cfg.optim.grad_clip))
            names = sorted(aux_sums)
            local = [task_sum, *(aux_sums[k] for k in names)]
            dropped_local = [layer.dropped_tokens.double() for layer in model.moe_layers()]
            dropped_L = torch.stack(dropped_local) if dropped_local else torch.zeros(0, dtype=torch.float64)
            means = _all_reduce_mean(torch.stack(local) / cfg.data.grad_accum, dropped_L, groups)
            loss, aux_mean = means[0], dict(zip(names, means[1 : 1 + len(names)]))
            dropped = means[1 + len(names) :]
            # c. non-finite guard: the reduced loss and the global norm are the same on every rank
            skipped = not (math.isfinite(loss) and math.isfinite(grad_norm))
            # d. update
            if skipped:
                result.skipped_steps.append(step)
                console.say(f"step {step}: non-finite loss ({loss}) or grad norm ({grad_norm}); step skipped")
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            global_counts = finish_step(model.moe_layers(), groups)
            step_seconds = time.perf_counter() - t0
            # e. log, evaluate, checkpoint
            for total, c in zip(counts_total, global_counts):
                total += c.detach().double().cpu()
            result.losses[step] = loss
            tok_s = tokens_per_step / step_seconds
            if tel is not None:
                tel.on_step(
                    step,
                    model.moe_layers(),
                    global_counts,
                    step_seconds=step_seconds,
                    tokens=tokens_per_step // groups.world_size,
                    losses={"loss": loss, **aux_mean},
                )
            record: dict[str, Any] = {
                "step": step,
                "loss": loss,
                "aux": aux_mean,
                "lr": lr,
                "grad_norm": grad_norm,
                "tokens": step * tokens_per_step,
                "tokens_per_s": tok_s,
                "step_seconds": step_seconds,
                "skipped": skipped,
            }
            if log is not None:
                record["layers"] = [
                    _layer_record(b, c.detach().float().cpu(), d)
                    for b, c, d in zip(moe_blocks, global_counts, dropped)
                ]
            last = step == cfg.schedule.steps
            if (cfg.eval.every and step % cfg.eval.every == 0) or last:
                record["val_loss"] = result.val_losses[step] = evaluate(
                    model, batches, cfg.eval.batches, groups, device, autocast
                )
            record["elapsed_s"] = time.perf_counter() - t_run
            if log is not None:
                log.write(record)
            extra = f"  val {record['val_loss']:.4f}" if "val_loss" in record else ""
            console.step(step, loss, lr, tok_s, extra)
            trainer_state = {"counts": [c.tolist() for c in counts_total]}
            if last or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0):
                checkpoint.save(ckpt_root, step, model, optimizer, groups, trainer_state, cfg.checkpoint.keep)
            if stop_after is not None and step >= stop_after:
                break

        # ---- 4. end
        result.seconds = time.perf_counter() - t_run
        steps_run = max(0, step - start_step)
        result.tokens_per_s = steps_run * tokens_per_step / result.seconds if steps_run else 0.0
        result.counts_per_layer = [c.tolist() for c in counts_total]
        if steps_run == 0 and not result.val_losses:  # resumed at the end: just evaluate
            result.val_losses[step] = evaluate(model, batches, cfg.eval.batches, groups, device, autocast)
        summary = end_summary(
            run_dir, step, result, groups, moe_blocks, is_main and stop_after is None, checkpoints=ckpt_root
        )
        if log is not None:
            log.close()
        if tel is not None:
            tel.close(summary)
            tel = None
        return result
    finally:
        if tel is not None:
            with contextlib.suppress(Exception):
                tel.close({"error": True})
        if own_pg:
            shutdown_distributed()
