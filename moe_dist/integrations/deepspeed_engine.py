"""Training through the DeepSpeed engine (``parallel.engine: deepspeed``; ZeRO stage ``parallel.zero_stage``).

Shape legend: B micro-batch, S sequence, V vocabulary, H hidden size, E experts.

Why DeepSpeed ``MoE`` layers (with `MoeDistGate`) and not our ``MoELayer`` with marked expert
parameters: the engine treats a model as MoE only when it contains ``deepspeed.moe.layer.MoE``
modules (``has_moe_layers``); only then does it create the expert-parallel groups, reduce expert
gradients over the expert-data-parallel group and keep ZeRO's MoE parameter groups apart. Our
``MoELayer`` with ``allreduce = False`` parameters would have its expert gradients averaged over
the whole data-parallel group, i.e. mixed between different experts at EP > 1. So every
``MoELayer`` of the model is swapped for a `DeepSpeedMoELayer`: DeepSpeed's MoE (dispatch,
all-to-all, experts) around our router and losses, initialised with the native layer's weights.

`train(cfg)` is ``moe_dist.training.run.train`` for this engine:

1. Process groups (DeepSpeed's E+D layout, the same as ``ParallelGroups``), the native model
   (same seed), every MoE block converted.
2. Parameter groups: decay / no-decay, then ``split_params_into_different_moe_groups_for_optimizer``
   (expert parameters in their own ``moe`` groups, needed by ZeRO); torch AdamW.
3. ``deepspeed.initialize`` with ``train_micro_batch_size_per_gpu``, ``gradient_accumulation_steps``,
   ``gradient_clipping`` and ``zero_optimization.stage`` from our config.
4. Resume (``--resume``): ``deepspeed_checkpoint.load`` (DeepSpeed's files, our meta.json).
5. Loop: per micro-batch ``engine(x)``, ``engine.backward(task + aux)``, ``engine.step()`` (which
   steps the optimizer at the accumulation boundary); then `after_step` (global counts, router
   after-step hooks), metrics.jsonl, telemetry (``Telemetry.on_step``), evaluation, and
   checkpoints every ``checkpoint.every`` steps and at the end (``deepspeed_checkpoint.save``).
6. summary.json, telemetry summary.

Run it with ``deepspeed --num_gpus N --master_addr 127.0.0.1 --no_local_rank $(which moe-dist)
train CONFIG --set parallel.engine=deepspeed`` (on CPU: ``DS_ACCELERATOR=cpu``, gloo, and
``deepspeed --num_nodes 1 --num_gpus N`` is read as processes per node).
"""

from __future__ import annotations

import time
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from moe_dist.config import Config, ConfigError, check_world_size, deepspeed_engine_errors
from moe_dist.integrations import deepspeed_checkpoint
from moe_dist.integrations.deepspeed_layer import convert_model
from moe_dist.integrations.plugin_routing import after_step
from moe_dist.training import checkpoint


def deepspeed_config(cfg: Config) -> dict[str, Any]:
    """The DeepSpeed JSON config our YAML implies (fp32; bf16 autocast is the native trainer's business)."""
    return {
        "train_micro_batch_size_per_gpu": cfg.data.micro_batch_size,
        "gradient_accumulation_steps": cfg.data.grad_accum,
        "gradient_clipping": cfg.optim.grad_clip,
        "zero_optimization": {"stage": cfg.parallel.zero_stage},
        "zero_allow_untested_optimizer": True,  # torch AdamW as the client optimizer
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


def initialize(model: nn.Module, cfg: Config) -> Any:
    """``deepspeed.initialize`` for a converted model: MoE parameter groups, AdamW, our ZeRO stage."""
    import deepspeed  # noqa: PLC0415 - heavy, only for this engine
    from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer  # noqa: PLC0415

    errors = deepspeed_engine_errors(cfg)
    if errors:
        raise ConfigError(errors)
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    param_groups = split_params_into_different_moe_groups_for_optimizer(
        [
            {"name": "decay", "params": decay, "weight_decay": cfg.optim.weight_decay},
            {"name": "no_decay", "params": no_decay, "weight_decay": 0.0},
        ]
    )
    optimizer = torch.optim.AdamW(param_groups, lr=cfg.optim.lr, betas=cfg.optim.betas, eps=cfg.optim.eps)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=deepspeed_config(cfg))
    return engine


def train(cfg: Config, resume: str | None = None, stop_after: int | None = None, stream: Any = None) -> Any:
    """``training.run.train`` through the DeepSpeed engine (see the module docstring); a ``TrainResult``.

    Writes what the native trainer writes (config.json, metrics.jsonl, summary.json, checkpoints
    every ``checkpoint.every`` steps and at the end, in DeepSpeed's format: deepspeed_checkpoint)
    and feeds telemetry the same way; ``resume`` as the native trainer's.
    """
    import json  # noqa: PLC0415

    import deepspeed  # noqa: PLC0415
    import torch.distributed as dist  # noqa: PLC0415

    from moe_dist.models import build_model  # noqa: PLC0415
    from moe_dist.parallel.startup import init_distributed, pick_backend, shutdown_distributed  # noqa: PLC0415
    from moe_dist.training.metrics_log import MetricsLog  # noqa: PLC0415
    from moe_dist.training.optim import lr_at, set_lr  # noqa: PLC0415
    from moe_dist.training.run import (  # noqa: PLC0415
        TrainResult,
        _layer_record,
        _start_telemetry,
        end_summary,
        evaluate,
        run_dir_of,
        start_run,
        tokens_per_optimizer_step,
    )

    errors = deepspeed_engine_errors(cfg)
    if errors:
        raise ConfigError(errors)
    # 1. groups, model
    own_pg = not (dist.is_available() and dist.is_initialized())
    info = init_distributed(cfg.parallel)
    tel = log = None
    try:
        check_world_size(cfg, info.world_size)
        deepspeed.init_distributed(dist_backend=pick_backend(cfg.parallel))
        groups, device, console, batches = start_run(cfg, info.local_rank, stream)
        is_main = groups.rank == 0
        model = convert_model(build_model(cfg.model, groups, seed=cfg.run.seed), cfg.parallel.ep_size)
        # 2-3. parameter groups, engine
        engine = initialize(model.to(device), cfg)
        torch.manual_seed(cfg.run.seed + 1000 + groups.rank)
        run_dir = run_dir_of(cfg)
        ckpt_root = run_dir / "checkpoints"
        moe_blocks = [i for i, b in enumerate(model.blocks) if b.is_moe]
        counts_total = [torch.zeros(cfg.model.moe.num_experts, dtype=torch.float64) for _ in moe_blocks]
        # 4. resume (weights, experts, optimizer, generators, trainer state)
        start_step = 0
        resume_path = checkpoint.resume_from(resume, ckpt_root, groups, console.stream)
        if resume_path is not None:
            loaded = deepspeed_checkpoint.load(engine, resume_path, groups)
            start_step = loaded.step
            counts_total = loaded.counts(counts_total)
            console.say(f"resumed from {loaded.path} at step {start_step}")
        if is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=1) + "\n")
            log = MetricsLog(run_dir / "metrics.jsonl", start_step if resume_path is not None else None)
        tel = _start_telemetry(cfg, groups, model, info.local_rank)
        console.say(
            f"{cfg.run.name}: DeepSpeed engine, ZeRO {cfg.parallel.zero_stage}, world {groups.world_size}"
            f" = DP {groups.dp_size} x EP {groups.ep_size}, device {device}, data: {batches.source}"
        )
        result = TrainResult(run_dir=run_dir, start_step=start_step)
        tokens_per_step = tokens_per_optimizer_step(cfg, groups)
        t_run, step = time.perf_counter(), start_step
        # 5. loop
        for step in range(start_step + 1, cfg.schedule.steps + 1):
            t0 = time.perf_counter()
            lr = lr_at(step - 1, cfg.optim, cfg.schedule)
            set_lr(engine.optimizer, lr)
            task_sum, aux_sums = 0.0, {}
            for micro in range(cfg.data.grad_accum):
                x_BS, y_BS = batches.train_batch(step - 1, micro, groups.rank)
                logits_BSV, aux_loss, aux_terms = engine(x_BS.to(device))
                task = F.cross_entropy(logits_BSV.float().flatten(0, 1), y_BS.to(device).flatten())
                engine.backward(task + aux_loss)  # the engine divides by gradient_accumulation_steps
                engine.step()  # an optimizer step only at the accumulation boundary
                task_sum += float(task.detach()) / cfg.data.grad_accum
                for k, v in aux_terms.items():
                    aux_sums[k] = aux_sums.get(k, 0.0) + float(v.detach()) / cfg.data.grad_accum
            layers = model.moe_layers()
            dropped_local = [float(layer.dropped_tokens) for layer in layers]
            global_counts = after_step([layer.plugin for layer in layers], groups)
            names = sorted(aux_sums)
            sums = torch.tensor(
                [task_sum] + [aux_sums[k] for k in names] + dropped_local, dtype=torch.float64
            )
            if groups.distributed:
                dist.all_reduce(sums)  # one collective: losses averaged, drops summed over ranks
            means = (sums / groups.world_size).tolist()
            loss, aux_mean = means[0], dict(zip(names, means[1 : 1 + len(names)]))
            dropped = [d * groups.world_size for d in means[1 + len(names) :]]
            step_seconds = time.perf_counter() - t0
            result.losses[step] = loss
            for total, c in zip(counts_total, global_counts):
                total += c.detach().double().cpu()
            if tel is not None:
                tel.on_step(
                    step,
                    layers,
                    global_counts,
                    step_seconds=step_seconds,
                    tokens=tokens_per_step // groups.world_size,
                    losses={"loss": loss, **aux_mean},
                )
            grad_norm = engine.get_global_grad_norm()
            record: dict[str, Any] = {
                "step": step,
                "loss": loss,
                "aux": aux_mean,
                "lr": lr,
                "grad_norm": float(grad_norm) if grad_norm is not None else None,
                "tokens": step * tokens_per_step,
                "tokens_per_s": tokens_per_step / step_seconds,
                "step_seconds": step_seconds,
                "skipped": False,
                "layers": [
                    _layer_record(b, c.detach().float().cpu(), d)
                    for b, c, d in zip(moe_blocks, global_counts, dropped)
                ],
            }
            last = step == cfg.schedule.steps
            if (cfg.eval.every and step % cfg.eval.every == 0) or last:
                record["val_loss"] = result.val_losses[step] = evaluate(
                    engine, batches, cfg.eval.batches, groups, device, _no_autocast
                )
            if log is not None:
                log.write(record)
            extra = f"  val {record['val_loss']:.4f}" if "val_loss" in record else ""
            console.step(step, loss, lr, record["tokens_per_s"], extra)
            if last or (cfg.checkpoint.every and step % cfg.checkpoint.every == 0):
                trainer_state = {"counts": [c.tolist() for c in counts_total]}
                deepspeed_checkpoint.save(engine, ckpt_root, step, groups, trainer_state, cfg.checkpoint.keep)
            if stop_after is not None and step >= stop_after:
                break
        # 6. end
        result.seconds = time.perf_counter() - t_run
        steps_run = step - start_step
        result.tokens_per_s = steps_run * tokens_per_step / result.seconds if steps_run else 0.0
        result.counts_per_layer = [c.tolist() for c in counts_total]
        summary = end_summary(
            run_dir,
            step,
            result,
            groups,
            moe_blocks,
            is_main and stop_after is None,
            engine={"engine": "deepspeed", "zero_stage": cfg.parallel.zero_stage},
            checkpoints=ckpt_root,
        )
        if tel is not None:
            tel.close(summary)
            tel = None
        return result
    finally:
        if log is not None:
            log.close()
        if tel is not None:
            tel.close({"error": True})
        if own_pg:
            shutdown_distributed()


def _no_autocast() -> Any:
    import contextlib  # noqa: PLC0415

    return contextlib.nullcontext()
