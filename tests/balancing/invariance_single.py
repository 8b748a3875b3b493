"""The invariance suite's single-process checks (world size 1, no process group), and `run_all`
(the multi-process launches).

Shape legend: as ``invariance_harness.py`` (B_ALL sequences of S tokens, H hidden, E experts).

- ``check_world1``: DP 1 with ``grad_accum`` 1 and 4 at the same global batch (``run_layout``).
- ``check_finite_difference``: each term's router gradient is non-zero and, unless its semantics
  hold part of it constant (``stop_gradient``), equals a central finite difference of its value
  in float64, along a random direction per parameter tensor.
- ``check_recompute``: a one-layer model with ``model.activation_checkpointing`` on and off, same
  weights, tokens and seed (also at DP 2 in the two-process launch): the same terms, router
  gradients (per term and of the whole loss) and every buffer (the gate's load statistics,
  router state such as LPR's step sums): counted once.
- ``check_deepspeed``: DeepSpeed's MoE with our gate (``build_deepspeed_moe``) vs our Gate on the
  whole global batch and the same seed: every term and its router gradient, and ``l_aux``.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.nn.functional as F
from invariance_harness import (
    B_ALL,
    LAYOUTS,
    TOL,
    Case,
    H,
    Layout,
    S,
    assert_term_matches,
    built_in,
    cases,
    global_batch,
    layout_mode,
    load_router,
    make_gate,
    reference,
    term_grads,
)
from invariance_ranks import check_launch, check_layout, launch_body, run_layout
from rank_processes import run_on_ranks

from moe_dist.config import ModelConfig
from moe_dist.models import build_model
from moe_dist.parallel.groups import ParallelGroups


def check_world1(case: Case) -> None:
    for layout in LAYOUTS[1]:
        check_layout(case, layout, [run_layout(case, layout, 0, ParallelGroups.single())])


def check_finite_difference(case: Case, h: float = 1e-6) -> None:
    gate = make_gate(case, train=layout_mode(case))
    x_TH = global_batch().reshape(-1, H)
    _, aux = gate(x_TH, B_ALL, S)
    grads = term_grads(aux, gate.router, case.terms())
    for term, g in grads.items():
        where = f"{case.name}, {term}"
        assert any(float(t.abs().max()) > 0 for t in g.values()), f"{where}: no gradient reaches the router"
        if case.semantics(term).stop_gradient:
            continue  # by definition not the derivative of its value (LPR's alignment target)
        gen = torch.Generator().manual_seed(13)
        for name, p in gate.router.named_parameters():
            v = torch.randn(p.shape, generator=gen, dtype=p.dtype)
            with torch.no_grad():
                p.add_(h * v)
                up = float(gate(x_TH, B_ALL, S)[1][term])
                p.sub_(2 * h * v)
                down = float(gate(x_TH, B_ALL, S)[1][term])
                p.add_(h * v)
            fd, want = torch.tensor((up - down) / (2 * h), dtype=torch.float64), (g[name] * v).sum()
            torch.testing.assert_close(
                fd, want, **TOL, msg=lambda m, n=name, w=where: f"{w}: d/d{n} vs finite difference\n{m}"
            )


def _model_run(
    case: Case, checkpointing: bool, n_layers: int, groups: ParallelGroups | None, term: str | None = None
) -> Any:
    """One forward and ONE backward (of ``term``, or of the whole loss) of a fresh model.

    One backward per forward, as in training: the recompute context of an MoE block is a one-shot
    context manager (``MoETransformer._run_block``), so a second backward through the same
    checkpointed forward fails."""
    cfg = ModelConfig(
        vocab_size=32,
        dim=H,
        n_layers=n_layers,
        n_heads=2,
        max_seq_len=S,
        activation_checkpointing=checkpointing,
        moe=case.moe_config(),
    )
    model = build_model(cfg, groups, seed=0).double().train()
    layers = model.moe_layers()
    for layer in layers:
        load_router(layer.gate.router, case)
    tokens = torch.randint(0, 32, (2, S), generator=torch.Generator().manual_seed(4))
    torch.manual_seed(5)
    logits, aux_loss, terms = model(tokens)
    routers = torch.nn.ModuleList(layer.gate.router for layer in layers)
    if term is not None:
        return term_grads(terms, routers, [term])[term]
    (F.cross_entropy(logits.flatten(0, 1), tokens.roll(-1, 1).flatten()) + aux_loss).backward()
    return {
        "terms": {k: float(v.detach()) for k, v in terms.items()},
        "grads": {n: p.grad.clone() for n, p in routers.named_parameters() if p.grad is not None},
        "buffers": {n: b.clone() for n, b in model.named_buffers()},
        "counted": float(sum(layer.gate.tokens_per_expert_E.sum() for layer in layers)),
    }


def check_recompute(
    case: Case, n_layers: int = 1, groups: ParallelGroups | None = None, per_term: bool = True
) -> None:
    """Every run first, then the comparisons (with ``groups`` over several ranks, every rank must
    take part in every forward's collectives even when its comparison fails). ``per_term``: also
    each term's own gradient (a forward and backward per term)."""
    off, on = (_model_run(case, ckpt, n_layers, groups) for ckpt in (False, True))
    terms = off["terms"] if per_term else {}
    per_term_grads = {
        t: [_model_run(case, ckpt, n_layers, groups, t) for ckpt in (False, True)] for t in terms
    }
    where = f"{case.name} with activation recomputation"
    assert off["counted"] > 0 and on["terms"].keys() == off["terms"].keys(), where
    for k in on["terms"]:
        torch.testing.assert_close(on["terms"][k], off["terms"][k], **TOL, msg=f"{where}: {k}")
    for group in ("grads", "buffers"):
        assert on[group].keys() == off[group].keys(), (where, group)
        for k, t in on[group].items():
            torch.testing.assert_close(t, off[group][k], **TOL, msg=f"{where}: {group} {k}")
    for term, (g_off, g_on) in per_term_grads.items():
        for k, t in g_on.items():
            torch.testing.assert_close(t, g_off[k], **TOL, msg=f"{where}: {term} grad {k}")


def check_deepspeed(case: Case) -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from moe_dist.integrations.deepspeed_moe import build_deepspeed_moe

    moe = build_deepspeed_moe(case.moe_config(), H).double().train()
    ds_router = moe.deepspeed_moe.gate.gate.router
    load_router(ds_router, case)
    native = make_gate(case, train=True)
    x_BSH = global_batch()
    torch.manual_seed(3)
    _, aux = native(x_BSH.reshape(-1, H), B_ALL, S)
    torch.manual_seed(3)
    _, l_aux, _ = moe(x_BSH)
    terms = moe.aux_terms
    where = f"{case.name} in DeepSpeed's MoE"
    assert terms.keys() == aux.keys(), where
    torch.testing.assert_close(l_aux, sum(aux.values()), **TOL, msg=f"{where}: l_aux")
    ours, theirs = term_grads(aux, native.router, sorted(aux)), term_grads(terms, ds_router, sorted(aux))
    for term in sorted(aux):
        assert_term_matches(
            f"{where}, {term}",
            float(terms[term].detach()),
            theirs[term],
            (float(aux[term].detach()), ours[term]),
        )
        if layout_mode(case) and term in case.terms():  # deterministic: the reference itself too
            assert_term_matches(
                f"{where}, {term}",
                float(terms[term].detach()),
                theirs[term],
                reference(case, term, Layout(1, 1, 1)),
            )


def run_all(skip: frozenset[str] = frozenset()) -> dict[str, list[str]]:
    """One launch per world size (2 with Megatron, 4) for every registered case but ``skip``'s,
    and the single-process checks for the cases that name a plugin (the parametrised tests do
    the built-ins'). Returns the cases checked and every failure's message."""
    torch.set_num_threads(1)  # tiny tensors; this runs in an interpreter of its own
    chosen = cases(skip)
    failures = []
    for case in chosen:
        if built_in(case.router) and built_in(case.loss):
            continue
        for check in (check_world1, check_finite_difference, check_recompute, check_deepspeed):
            try:
                check(case)
            except AssertionError as exc:
                failures.append(str(exc))
    for world in (2, 4):
        failures += check_launch(world, chosen, run_on_ranks(launch_body, world, (chosen, world == 2)))
    return {"checked": [c.name for c in chosen], "failures": failures}
