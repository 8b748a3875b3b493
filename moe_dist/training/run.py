"""The training loop (``moe-dist train CONFIG``) of both engines, readable top to bottom, nanoGPT style.

The loop is written once; an `Engine` does what differs between ours (``parallel.engine: native``,
``training/native_engine.py``) and DeepSpeed's (``integrations/deepspeed_engine.py``): the model
it holds, its forward/backward, gradient reduction, optimizer step and checkpoint format.
``training/engines.py`` picks the engine a config names.

1. Start: process groups (DP x EP), device, data, the engine (model with the same seed on every
   rank, optimizer), per-rank random streams.
2. Resume (``--resume``): the engine loads weights and optimizer; step, RNG states and trainer
   state come back with them; the data position is the step itself (batches are a pure function
   of seed, step, micro-batch and rank). Then config.json, metrics.jsonl, telemetry.
3. Loop, one optimizer step at a time. A step that does not log, evaluate or checkpoint never
   waits for the device (no ``.item()``, ``.tolist()``, ``float(t)``, pageable copies; a CPU
   test counts them): its values stay on the device in a `StepBuffer` until the next step that
   reads them back, in one transfer.
   a. ``grad_accum`` micro-batches: ``engine.forward_backward`` (loss = cross-entropy + the MoE
      aux terms, backward);
   b. gradients: ``engine.clip_grad_norm`` (reduction, global norm, clipping; the norm stays a
      device tensor); the loss terms are averaged over ranks in one collective;
   c. non-finite guard, on the device: a non-finite loss term or gradient norm (both group-wide
      values) becomes a flag that ``engine.step(flag)`` hands to the optimizer, which skips the
      update on every rank without the host reading it (fused AdamW's ``found_inf``, the
      mechanism of torch's GradScaler); the host learns it at the next flush and says so;
   d. ``finish_step``: global expert counts, router after-step hooks;
   e. every ``run.log_every`` steps, and before evaluating or saving, the buffer is flushed:
      metrics.jsonl (one record per step, as before), the console line, TensorBoard / W&B;
      telemetry folds each step in on the device (its own asynchronous copy); validate every
      ``eval.every``, checkpoint every ``checkpoint.every``; ``run.profile`` traces a window of
      steps.
   f. SIGTERM / SIGUSR1 (preemption) or ``run.max_minutes``: every rank stops after the same
      step (``preemption.py``), saves it and ends; ``moe-dist train`` exits with
      ``EXIT_RESUMABLE`` (143) so that torchrun and SLURM restart it with ``--resume``.
4. End: final validation, final checkpoint (a background save is waited for), summary.json,
   telemetry summary.

Shape legend: B micro-batch, S sequence, E experts, L MoE layers.
"""

from __future__ import annotations

import contextlib
import json
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from moe_dist.config import Config, ConfigError, check_world_size
from moe_dist.data.batches import TokenBatches
from moe_dist.models import MoETransformer
from moe_dist.parallel.groups import ParallelGroups
from moe_dist.parallel.startup import init_distributed, shutdown_distributed
from moe_dist.training import checkpoint, checkpoint_choice
from moe_dist.training.checkpoint import step_dir_name
from moe_dist.training.evaluate import evaluate
from moe_dist.training.host_memory import retain_freed_memory
from moe_dist.training.loggers import open_loggers
from moe_dist.training.metrics_log import Console, MetricsLog
from moe_dist.training.optim import lr_at
from moe_dist.training.preemption import EXIT_RESUMABLE, StopDecision
from moe_dist.training.profiling import StepProfiler
from moe_dist.training.step_buffer import StepBuffer
from moe_dist.training.step_hook import finish_step
from moe_dist.training.summary import TrainResult, end_summary, step_record
from moe_dist.training.sync_debug import SyncDebug
from moe_dist.training.utilization import Utilization


class Engine(Protocol):
    """What the loop asks of an engine; built as ``engine(cfg, groups, device)`` once groups are up.

    After ``step(flag)`` no gradient is left for the next step. The flag is a device tensor: a
    set flag leaves weights and optimizer state as they were.
    """

    model: MoETransformer  # MoE layers, blocks, parameter counts (DeepSpeed: the converted model)
    evaluate_model: nn.Module  # what validation calls (DeepSpeed: its engine around the model)
    summary_fields: dict[str, Any]  # extra summary.json fields, before the layers

    def describe(self) -> str: ...  # the start line's account of the engine
    def autocast(self) -> contextlib.AbstractContextManager: ...
    def set_lr(self, lr: float) -> None: ...
    def forward_backward(
        self, x_BS: torch.Tensor, y_BS: torch.Tensor, doc_BS: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]: ...  # (task loss, aux terms by name)
    def clip_grad_norm(self) -> torch.Tensor: ...  # reduced gradients' global norm before clipping
    def step(self, nonfinite: torch.Tensor) -> None: ...  # the update, called off where the flag is set
    def save(self, ckpt_root: Path, step: int, trainer_state: dict[str, Any], keep: int) -> None: ...
    def wait_saves(self, complete: bool) -> None: ...  # a background save: wait; complete = make it latest
    def load(self, path: Path) -> checkpoint.Loaded: ...


EngineFactory = Callable[[Config, ParallelGroups, torch.device], Engine]


def pick_device(name: str, local_rank: int) -> torch.device:
    if name == "cuda" or (name == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise ConfigError(["run.device: cuda requested but CUDA is not available"])
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def tokens_per_optimizer_step(cfg: Config, groups: ParallelGroups) -> int:
    """Tokens the whole world trains on per optimizer step."""
    return groups.world_size * cfg.data.grad_accum * cfg.data.micro_batch_size * cfg.data.seq_len


def _all_reduce_mean(losses: torch.Tensor, groups: ParallelGroups) -> torch.Tensor:
    """Mean of the loss terms over ranks (one collective, on the device)."""
    if groups.distributed:
        dist.all_reduce(losses)
        losses /= groups.world_size
    return losses


def _start_telemetry(
    cfg: Config, groups: ParallelGroups, model: MoETransformer, local_rank: int, device: torch.device
) -> Any:
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
        router_name=cfg.model.moe.router.name,
        local_rank=local_rank,
        node=socket.gethostname(),
    )
    for layer in model.moe_layers():
        # timing synchronises a CUDA device around each phase: there only when asked for
        layer.gate.timing = tel.wants_timing if tel.wants_timing is not None else device.type != "cuda"
    return tel


@dataclass
class StepEvents:
    """What a step does besides training; any of them reads values back from the device."""

    log: bool
    evaluate: bool
    save: bool
    stop_after: bool  # ``train(stop_after=)``: end here as if killed

    @property
    def reads_back(self) -> bool:
        return self.log or self.evaluate or self.save or self.stop_after

    @classmethod
    def of(cls, step: int, cfg: Config, stop_after: int | None) -> StepEvents:
        last = step == cfg.schedule.steps
        return cls(
            log=step % cfg.run.log_every == 0,
            evaluate=last or bool(cfg.eval.every and step % cfg.eval.every == 0),
            save=last or bool(cfg.checkpoint.every and step % cfg.checkpoint.every == 0),
            stop_after=stop_after is not None and step >= stop_after,
        )


def train(
    cfg: Config,
    make_engine: EngineFactory,
    resume: str | None = None,
    stop_after: int | None = None,
    stream: Any = None,
) -> TrainResult:
    """Train ``cfg`` with ``make_engine`` (``engines.engine_for(cfg)``); ``resume`` is a
    checkpoint root or step dir ("" = this run's latest).

    ``stop_after`` ends the loop after that step without the final save, as if the job had been
    killed (tests use it for kill-and-resume).
    """
    # ---- 1. start
    own_pg = not (dist.is_available() and dist.is_initialized())
    info = init_distributed(cfg.parallel)
    tel = log = loggers = prof = stop = None
    try:
        check_world_size(cfg, info.world_size)
        groups = ParallelGroups.build(cfg.parallel.ep_size, cfg.parallel.ep_transport)
        stop = StopDecision.start(cfg.run.max_minutes)  # SIGTERM / SIGUSR1 / time limit, agreed by all ranks
        is_main = groups.rank == 0
        if cfg.run.threads:
            torch.set_num_threads(cfg.run.threads)
        device = pick_device(cfg.run.device, info.local_rank)
        console = Console(cfg.schedule.steps, is_main, stream)
        if device.type == "cpu" and cfg.run.retain_freed_memory:
            reason = retain_freed_memory()
            if reason is not None:
                console.say(f"run.retain_freed_memory: left off: {reason}")
        batches = TokenBatches.for_run(cfg)
        engine = make_engine(cfg, groups, device)
        model = engine.model
        torch.manual_seed(cfg.run.seed + 1000 + groups.rank)  # per-rank randomness (router jitter)
        run_dir = cfg.run_dir
        ckpt_root = run_dir / "checkpoints"
        moe_blocks = [i for i, b in enumerate(model.blocks) if b.is_moe]
        counts_total = [torch.zeros(cfg.model.moe.num_experts, dtype=torch.float64) for _ in moe_blocks]

        # ---- 2. resume
        start_step = 0
        resume_path = checkpoint_choice.resume_from(resume, ckpt_root, groups, console.stream)
        if resume_path is not None:
            loaded = engine.load(resume_path)
            start_step = loaded.step
            counts_total = loaded.counts(counts_total)
            console.say(
                f"resumed from {loaded.path} at step {start_step}"
                + ("" if loaded.rng_restored else " (new EP/world size: RNG streams reseeded)")
            )
        # whole-run counts accumulate on the device; read at checkpoints and at the end
        counts_total = [c.to(device) for c in counts_total]
        if is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            (run_dir / "config.json").write_text(json.dumps(cfg.model_dump(mode="json"), indent=1) + "\n")
            log = MetricsLog(run_dir / "metrics.jsonl", start_step if resume_path is not None else None)
        tel = _start_telemetry(cfg, groups, model, info.local_rank, device)
        if tel is not None and is_main and (where := tel.serving()):
            console.say(where)
        loggers = open_loggers(cfg, is_main, start_step if resume_path is not None else None)
        prof = StepProfiler(cfg.run.profile, run_dir, groups.rank, device)
        util = Utilization.for_run(cfg, model, device, groups, console.say)  # peak memory, MFU
        console.say(
            f"{cfg.run.name}: {engine.describe()}, world {groups.world_size}"
            f" = DP {groups.dp_size} x EP {groups.ep_size}, device {device}, data: {batches.source}"
        )
        console.say(f"run directory: {run_dir.resolve()}")
        result = TrainResult(run_dir=run_dir, start_step=start_step)
        tokens_per_step = tokens_per_optimizer_step(cfg, groups)
        buffer = StepBuffer(moe_blocks)
        t_run = time.perf_counter()
        step = start_step

        def flush() -> None:
            """Read back and log the steps since the last flush (ONE transfer; collective: the
            peak memory of every rank is gathered with it)."""
            rows = buffer.flush()
            if not rows:
                return
            mem_W = util.all_ranks_peak_memory(groups)
            for row in rows:
                result.losses[row.step] = row.loss
                if row.skipped:
                    result.skipped_steps.append(row.step)
                    console.say(
                        f"step {row.step}: non-finite loss or gradient norm on some rank; step skipped"
                    )
                record = step_record(
                    row, tokens_per_step, util.fields(mem_W, tokens_per_step / row.step_seconds)
                )
                if row.step in result.val_losses:
                    record["val_loss"] = result.val_losses[row.step]
                record["elapsed_s"] = time.perf_counter() - t_run
                if log is not None:
                    log.write(record)
                if loggers is not None:
                    loggers.write(record)
                if tel is not None and row is rows[-1]:
                    tel.set_losses({"loss": row.loss, **row.aux})
            console.log(
                record,
                interval_tokens_per_s=tokens_per_step / rows[-1].step_seconds,
                skipped=len(result.skipped_steps),
            )

        sync_debug = SyncDebug(cfg.run.sync_debug, device)

        # ---- 3. loop
        for step in range(start_step + 1, cfg.schedule.steps + 1):
            prof.before(step)
            events = StepEvents.of(step, cfg, stop_after)
            steady = sync_debug.enter(step, start_step, events.reads_back)
            lr = lr_at(step - 1, cfg.optim, cfg.schedule)
            engine.set_lr(lr)
            # a. micro-batches; the sums stay on the device
            task_sum = torch.zeros((), dtype=torch.float64, device=device)
            aux_sums: dict[str, torch.Tensor] = {}
            for micro in range(cfg.data.grad_accum):
                batch = batches.train_batch(step - 1, micro, groups.rank).to(device)
                task, aux_terms = engine.forward_backward(batch.x_BS, batch.y_BS, batch.doc_BS)
                task_sum += task.detach().double()
                for k, v in aux_terms.items():
                    aux_sums[k] = aux_sums.get(k, 0.0) + v.detach().double()
            # b. gradients: reduced, clipped, their norm kept on the device; loss terms over ranks
            grad_norm = engine.clip_grad_norm()
            names = sorted(aux_sums)
            local_A = torch.stack([task_sum, *(aux_sums[k] for k in names)]) / cfg.data.grad_accum
            losses_A = _all_reduce_mean(local_A, groups)
            # c. non-finite guard as a device flag (group-wide values: every rank decides alike)
            nonfinite = ~(torch.isfinite(losses_A).all() & torch.isfinite(grad_norm.to(losses_A.device)))
            # d. update unless flagged, then the step hook
            engine.step(nonfinite)
            counts = finish_step(model.moe_layers(), groups)
            for total, c in zip(counts_total, counts.counts_E):
                total += c.detach().to(total.device, torch.float64)
            buffer.add(step, lr, names, losses_A, grad_norm, nonfinite, counts.counts_E, counts.dropped)
            if tel is not None:
                tel.on_step(step, model.moe_layers(), counts, tokens=tokens_per_step // groups.world_size)
            sync_debug.leave(steady)
            # e. log, evaluate, checkpoint: the only steps that read values back
            saving = events.save
            if events.evaluate:
                with buffer.paused():  # evaluation is not step time
                    result.val_losses[step] = evaluate(
                        engine.evaluate_model, batches, cfg.eval.batches, groups, device, engine.autocast
                    )
            if events.reads_back:
                flush()
            console.progress(step, result.losses)
            prof.after(step)
            # f. preemption (SIGTERM, SIGUSR1) or run.max_minutes: the same answer on every rank
            result.stop_reason = stop.stop_reason(step)
            if result.stop_reason is not None and not saving:
                flush()
                saving = True
            if saving:
                with buffer.paused():
                    trainer_state = {"counts": [c.tolist() for c in counts_total]}
                    engine.save(ckpt_root, step, trainer_state, cfg.checkpoint.keep)
                console.say(f"checkpoint: step {step} saved in {ckpt_root / step_dir_name(step)}")
            if result.stop_reason is not None:
                console.say(f"{result.stop_reason}; resume with --resume (exit code {EXIT_RESUMABLE})")
                break
            if events.stop_after:
                break

        # ---- 4. end
        # a background save is waited for; stopped as if killed, it stays unfinished
        engine.wait_saves(complete=stop_after is None)
        # every checkpoint is on disk: from here a SIGTERM ends the process at once (the final
        # evaluation, a lingering exporter), instead of waiting for a step that will not come
        stop.flag.restore()
        result.seconds = time.perf_counter() - t_run
        steps_run = max(0, step - start_step)
        result.tokens_per_s = steps_run * tokens_per_step / result.seconds if steps_run else 0.0
        result.counts_per_layer = [c.tolist() for c in counts_total]
        if steps_run == 0 and not result.val_losses and result.stop_reason is None:  # resumed at the end
            result.val_losses[step] = evaluate(
                engine.evaluate_model, batches, cfg.eval.batches, groups, device, engine.autocast
            )
        summary = end_summary(
            run_dir,
            step,
            result,
            groups,
            moe_blocks,
            is_main and stop_after is None and result.stop_reason is None,
            engine=engine.summary_fields,
            checkpoints=ckpt_root,
        )
        if tel is not None:
            tel.close(summary)
            tel = None
        return result
    finally:
        if log is not None:
            log.close()
        if loggers is not None:
            loggers.close()
        if prof is not None:
            prof.close()
        if tel is not None:
            with contextlib.suppress(Exception):
                tel.close({"error": True})
        if stop is not None:
            stop.close()
        if own_pg:
            shutdown_distributed()
