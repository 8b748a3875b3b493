"""Per-step cost of expert-load telemetry on the demo-sized model: telemetry on vs off.

    python tools/bench_telemetry.py [--config configs/demo.yaml] [--rounds 4] [--steps 10] [--json out.json]

One process, EP 1, real training steps (forward, backward, AdamW, ``finish_step``). Rounds
alternate off / on so drift and other load on the machine hit both alike. Reported:

- step time, median, off and on, and the overhead of "on" in percent (the number that matters:
  it includes the exporter thread, the HTTP server and the layers' timing clocks);
- the direct cost of ``tel.on_step`` on the training thread (mean, p99, share of a step);
- CPU time (``time.thread_time``, so it holds on a loaded machine where wall-clock differences
  drown in noise): ``on_step`` on the training thread plus the exporter thread's publishing
  (``moe_telemetry_publish_seconds_total``), per step, as a share of the step's CPU time;
- the cost of one scrape of the endpoint (rendering runs in the server thread, not the step).

The target is < 1 % of step time. Off means ``telemetry.enabled: false``: ``start_telemetry``
returns the no-op and the trainer does no telemetry work at all.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
import urllib.request
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from moe_dist.config import TelemetryConfig, load_config  # noqa: E402
from moe_dist.models import build_model  # noqa: E402
from moe_dist.parallel.groups import ParallelGroups  # noqa: E402
from moe_dist.telemetry import Telemetry, start_telemetry  # noqa: E402
from moe_dist.training.step_hook import finish_step  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "configs" / "demo.yaml"))
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--steps", type=int, default=10, help="steps per round and mode")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--interval", type=int, default=1, help="telemetry.interval_steps")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", type=Path, default=ROOT / "runs" / "bench_telemetry.json")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    cfg = load_config(args.config, ["parallel.ep_size=1"])
    groups = ParallelGroups.single()
    model = build_model(cfg.model, groups, seed=0)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    B, S, V = cfg.data.micro_batch_size, cfg.data.seq_len, cfg.model.vocab_size
    gen = torch.Generator().manual_seed(0)
    tel = start_telemetry(
        TelemetryConfig(enabled=True, port_base=0, interval_steps=args.interval),
        groups,
        job_id="bench",
        model_name="demo",
        router_name=cfg.model.moe.router.name,
    )
    off = Telemetry()  # what the trainer holds with telemetry disabled
    step = 0

    cpu: dict[str, list[float]] = {"step": [], "hook": []}  # telemetry-on steps, CPU seconds

    def run(handle: Telemetry, n: int) -> tuple[list[float], list[float]]:
        nonlocal step
        for layer in model.moe_layers():
            layer.gate.timing = handle.wants_timing
        steps, hooks = [], []
        for _ in range(n):
            step += 1
            c0, t0 = time.thread_time(), time.perf_counter()
            x_BS = torch.randint(0, V, (B, S + 1), generator=gen)
            logits, aux_loss, _ = model(x_BS[:, :-1])
            loss = F.cross_entropy(logits.flatten(0, 1), x_BS[:, 1:].flatten()) + aux_loss
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
            counts = finish_step(model.moe_layers(), groups)
            c1, t1 = time.thread_time(), time.perf_counter()
            handle.on_step(
                step,
                model.moe_layers(),
                counts,
                step_seconds=t1 - t0,
                tokens=B * S,
                losses={"loss": float(loss.detach())},
            )
            c2, t2 = time.thread_time(), time.perf_counter()
            steps.append(t2 - t0)
            hooks.append(t2 - t1)
            if handle is not off:
                cpu["step"].append(c2 - c0)
                cpu["hook"].append(c2 - c1)
        return steps, hooks

    run(off, args.warmup)
    run(tel, args.warmup)
    cpu["step"].clear()
    cpu["hook"].clear()
    tel.flush()
    publish0 = tel.metrics.registry.get_sample_value("moe_telemetry_publish_seconds_total") or 0.0
    times: dict[str, list[float]] = {"off": [], "on": []}
    hook_on: list[float] = []
    for r in range(args.rounds):
        for mode in ("off", "on") if r % 2 == 0 else ("on", "off"):
            s, h = run(tel if mode == "on" else off, args.steps)
            times[mode] += s
            if mode == "on":
                hook_on += h
    tel.flush()
    publish_cpu = (
        tel.metrics.registry.get_sample_value("moe_telemetry_publish_seconds_total") or 0.0
    ) - publish0
    t0 = time.perf_counter()
    body = urllib.request.urlopen(tel.url, timeout=10).read()
    scrape_s = time.perf_counter() - t0
    tel.close({})

    med_off, med_on = statistics.median(times["off"]), statistics.median(times["on"])
    hook_mean = statistics.fmean(hook_on)
    hook_p99 = sorted(hook_on)[max(0, int(0.99 * len(hook_on)) - 1)]
    result = {
        "model": {
            "dim": cfg.model.dim,
            "n_layers": cfg.model.n_layers,
            "experts": cfg.model.moe.num_experts,
            "tokens_per_step": B * S,
        },
        "machine": {"platform": platform.platform(), "torch": torch.__version__, "threads": args.threads},
        "interval_steps": args.interval,
        "steps_per_mode": len(times["on"]),
        "step_seconds_median": {"off": med_off, "on": med_on},
        "overhead_percent": 100 * (med_on - med_off) / med_off,
        "on_step_seconds": {"mean": hook_mean, "p99": hook_p99},
        "on_step_percent_of_step": 100 * hook_mean / med_on,
        "cpu_seconds_per_step": {
            "step": statistics.fmean(cpu["step"]),
            "on_step": statistics.fmean(cpu["hook"]),
            "publisher": publish_cpu / len(cpu["step"]),
        },
        "cpu_overhead_percent": 100
        * (statistics.fmean(cpu["hook"]) + publish_cpu / len(cpu["step"]))
        / statistics.fmean(cpu["step"]),
        "scrape_seconds": scrape_s,
        "scrape_bytes": len(body),
    }
    rows = [
        ("step time, telemetry off (median)", f"{med_off * 1e3:9.2f} ms"),
        ("step time, telemetry on  (median)", f"{med_on * 1e3:9.2f} ms"),
        ("overhead on vs off", f"{result['overhead_percent']:+9.2f} %"),
        ("on_step on the training thread (mean)", f"{hook_mean * 1e6:9.1f} us"),
        ("on_step (p99)", f"{hook_p99 * 1e6:9.1f} us"),
        ("on_step share of a step", f"{result['on_step_percent_of_step']:9.3f} %"),
        (
            "CPU: on_step per step (training thread)",
            f"{result['cpu_seconds_per_step']['on_step'] * 1e6:9.1f} us",
        ),
        (
            "CPU: publishing per step (exporter thread)",
            f"{result['cpu_seconds_per_step']['publisher'] * 1e6:9.1f} us",
        ),
        ("CPU overhead vs step CPU time", f"{result['cpu_overhead_percent']:9.3f} %"),
        ("one scrape (server thread)", f"{scrape_s * 1e3:9.2f} ms, {len(body)} bytes"),
    ]
    width = max(len(k) for k, _ in rows)
    print(
        f"telemetry overhead, demo model ({cfg.model.n_layers} layers x {cfg.model.moe.num_experts} experts, "
        f"{B * S} tokens/step), {len(times['on'])} steps per mode, interval_steps={args.interval}"
    )
    for k, v in rows:
        print(f"  {k:<{width}}  {v}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
