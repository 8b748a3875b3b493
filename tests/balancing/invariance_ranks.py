"""What each rank runs in the invariance suite, and how its results are held to the references.

Shape legend: as ``invariance_harness.py`` (b sequences of S tokens per micro-batch, H hidden).

One launch per world size runs every case and every layout of that size in the same processes
(``launch_body``); world 1 runs in the test process itself (no process group):

1. ``run_layout``: our ``MoELayer`` on this rank's micro-batches with real DP x EP groups (the
   all-to-all runs at EP 2), and the training loop's arithmetic on the aux terms: per micro-step
   ``(sum of terms) / grad_accum``, backward (``training/native_engine.py`` ``forward_backward``;
   the task loss is left out, it is not a balancing term), then ``GradSync.reduce``
   (``training/grad_sync.py``: the gradient mean over the world). Each term's own gradient is
   reduced the same way, so that every term is held to its own semantics.
2. world 2: activation recomputation on and off at DP 2 (``check_recompute``).
3. ``megatron_case`` (world 2, DP 2 x EP 1: Megatron-Core needs CUDA for EP > 1 layers): our
   router inside Megatron's ``TopKRouter`` against our ``Gate`` on the same micro-batch and seed:
   each term as Megatron's tracker logs it and the router gradient that Megatron's
   ``MoEAuxLossAutoScaler`` carries into the backward.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from integration_helpers import transformer_config as megatron_config
from invariance_harness import (
    LAYOUTS,
    TOL,
    Case,
    H,
    Layout,
    S,
    assert_term_matches,
    global_batch,
    layout_mode,
    load_router,
    reference,
    term_grads,
)

from moe_dist.layers.gate import Gate
from moe_dist.layers.moe_layer import MoELayer
from moe_dist.parallel.groups import ParallelGroups
from moe_dist.training.grad_sync import GradSync

Grads = dict[str, torch.Tensor]


def run_layout(case: Case, layout: Layout, rank: int, groups: ParallelGroups) -> dict[str, Any]:
    """This rank's share of every term's objective and each term's reduced router gradient."""
    layer = MoELayer(case.moe_config(), H, groups).double().train(layout_mode(case))
    load_router(layer.gate.router, case)
    x_all = global_batch()
    values: dict[str, float] = {}
    grads: dict[str, Grads] = {}
    for m in range(layout.ga):
        lo, n = layout.micro_batch(m, rank)
        _, aux = layer(x_all[lo : lo + n])
        for term, g in term_grads(aux, layer.gate.router, sorted(aux), 1.0 / layout.ga).items():
            values[term] = values.get(term, 0.0) + float(aux[term].detach()) / layout.ga
            grads[term] = g if term not in grads else {k: grads[term][k] + g[k] for k in g}
        (sum(aux.values()) / layout.ga).backward()
    GradSync(layer, groups).reduce()
    total = {n: p.grad.clone() for n, p in layer.gate.router.named_parameters() if p.grad is not None}
    if groups.distributed:
        for g in grads.values():
            for t in g.values():
                dist.all_reduce(t)
                t.div_(groups.world_size)
    return {"values": values, "grads": grads, "total": total}


def check_layout(case: Case, layout: Layout, per_rank: list[dict[str, Any]]) -> None:
    """The mean over ranks of each term's value (what the loop optimises) and its gradient (the
    same on every rank) equal the reference of the term's semantics; the loop's own gradient
    sync gives the sum of the terms' gradients."""
    where = f"{case.name} at {layout.name}"
    first = per_rank[0]
    for res in per_rank[1:]:
        for term, g in res["grads"].items():
            for n, t in g.items():
                torch.testing.assert_close(
                    t, first["grads"][term][n], msg=f"{where}: ranks differ, {term} {n}"
                )
    for term in case.terms():
        value = sum(res["values"][term] for res in per_rank) / len(per_rank)
        sem = case.semantics(term)
        assert_term_matches(
            f"{where}, {term} ({sem.batch})", value, first["grads"][term], reference(case, term, layout)
        )
    summed = {n: sum(first["grads"][term][n] for term in first["grads"]) for n in first["total"]}
    for n, t in first["total"].items():
        torch.testing.assert_close(t, summed[n], **TOL, msg=f"{where}: GradSync total of {n}")


def transformer_config(case: Case) -> Any:
    return megatron_config(case.moe_config(megatron=True), 1, hidden=H, heads=2)


def megatron_case(case: Case, rank: int, layout: Layout) -> dict[str, Any]:
    """Terms and router gradient: Megatron's router vs our Gate, this rank's micro-batch, one seed."""
    from megatron.core.transformer.moe.moe_utils import (
        clear_aux_losses_tracker,
        get_moe_layer_wise_logging_tracker,
    )

    from moe_dist.integrations.megatron import MoeDistRouter

    cfg = case.moe_config(megatron=True)
    router = MoeDistRouter(transformer_config(case), moe_cfg=cfg).double().train()
    router.set_layer_number(1)
    load_router(router.gate.router, case)
    native = Gate(cfg, H).double().train()  # global counts over the world, as Megatron's tp_dp_cp group
    load_router(native.router, case)
    lo, n = layout.micro_batch(0, rank)
    x_BSH = global_batch()[lo : lo + n]
    torch.manual_seed(9 + rank)
    _, aux = native(x_BSH.reshape(-1, H), n, S)
    sum(aux.values()).backward()
    clear_aux_losses_tracker()
    torch.manual_seed(9 + rank)
    probs_TE, _ = router(x_BSH.transpose(0, 1).contiguous())  # Megatron's [S, B, H]
    (probs_TE * 0).sum().backward()  # the terms' gradients ride on probs
    tracker = get_moe_layer_wise_logging_tracker()
    coefs = {name: loss.cfg.coef for name, loss in zip(router.gate.loss_names, router.gate.losses)}

    def grads(r: torch.nn.Module) -> Grads:
        return {k: p.grad.clone() for k, p in r.named_parameters() if p.grad is not None}

    return {
        "native": {k: float(v.detach()) for k, v in aux.items()},
        "megatron": {k: float(tracker[k]["values"][0]) * coefs.get(k, 1.0) for k in aux},
        "native_grads": grads(native.router),
        "megatron_grads": grads(router.gate.router),
    }


def check_megatron(case: Case, layout: Layout, per_rank: list[dict[str, Any]]) -> None:
    """Per rank Megatron = our Gate; for a deterministic router also the reference (rank mean)."""
    where = f"{case.name} in Megatron-Core at {layout.name}"
    if "refused" in per_rank[0]:
        assert "changes the experts' input" in per_rank[0]["refused"], f"{where}: {per_rank[0]['refused']}"
        return
    for rank, res in enumerate(per_rank):
        assert res["megatron"].keys() == res["native"].keys(), where
        for k, v in res["megatron"].items():
            torch.testing.assert_close(v, res["native"][k], **TOL, msg=f"{where}: {k}, rank {rank}")
        assert res["megatron_grads"].keys() == res["native_grads"].keys(), where
        for k, g in res["megatron_grads"].items():
            torch.testing.assert_close(
                g, res["native_grads"][k], **TOL, msg=f"{where}: grad {k}, rank {rank}"
            )
    if not layout_mode(case):
        return  # a stochastic router: compared with our Gate under the same seed only
    for term in case.terms():
        value = sum(res["megatron"][term] for res in per_rank) / len(per_rank)
        want = reference(case, term, layout)[0]
        torch.testing.assert_close(value, want, **TOL, msg=f"{where}: {term} (rank mean) vs reference")
    refs = [reference(case, term, layout)[1] for term in per_rank[0]["native"]]
    for k in per_rank[0]["megatron_grads"]:
        mean = sum(res["megatron_grads"][k] for res in per_rank) / len(per_rank)
        torch.testing.assert_close(
            mean, sum(r[k] for r in refs), **TOL, msg=f"{where}: grad {k} vs reference"
        )


def launch_body(rank: int, world: int, cases: list[Case], megatron: bool) -> dict[str, Any]:
    """Every (case, layout) of this world size in this process; then Megatron's router (world 2)."""
    groups = {ep: ParallelGroups.build(ep) for ep in sorted({lay.ep for lay in LAYOUTS[world]})}
    out: dict[str, Any] = {"layouts": {}, "megatron": {}, "recompute": {}}
    for case in cases:
        for layout in LAYOUTS[world]:
            out["layouts"][(case.name, layout.name)] = run_layout(case, layout, rank, groups[layout.ep])
    if world == 2:  # recomputation with the layers' collectives (global counts) on two ranks
        from invariance_single import check_recompute

        for case in cases:
            try:
                check_recompute(case, groups=groups[1], per_term=False)  # per term: world 1
            except AssertionError as exc:
                out["recompute"][case.name] = f"rank {rank}: {exc}"
    if megatron:
        from megatron.core import parallel_state as ps

        ps.initialize_model_parallel(tensor_model_parallel_size=1, expert_model_parallel_size=1)
        try:
            for case in cases:
                try:
                    out["megatron"][case.name] = megatron_case(case, rank, Layout(world, 1, 1))
                except NotImplementedError as exc:  # a router that changes the experts' input
                    out["megatron"][case.name] = {"refused": str(exc)}
        finally:
            ps.destroy_model_parallel()
    return out


def check_launch(world: int, cases: list[Case], results: list[dict[str, Any]]) -> list[str]:
    """Every check of one launch; the failures as messages (all of them, not only the first)."""
    failures = [msg for r in results for msg in r["recompute"].values()]
    for case in cases:
        for layout in LAYOUTS[world]:
            try:
                check_layout(case, layout, [r["layouts"][(case.name, layout.name)] for r in results])
            except AssertionError as exc:
                failures.append(str(exc))
        if case.name in results[0]["megatron"]:
            try:
                check_megatron(case, Layout(world, 1, 1), [r["megatron"][case.name] for r in results])
            except AssertionError as exc:
                failures.append(str(exc))
    return failures
