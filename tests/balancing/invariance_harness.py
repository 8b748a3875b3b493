"""The invariance suite's machinery: cases from the registries, layouts, the training loop's
arithmetic, and the single-process reference of each declared `LossSemantics`.

Shape legend: B_ALL sequences of S tokens in the global batch (N = B_ALL * S), W = DP x EP
ranks, A = grad_accum micro-steps, b = B_ALL / (W * A) sequences per micro-batch, H hidden,
E experts, K top-k.

Layout of the global batch: micro-step m, rank r holds sequences [(m W + r) b, (m W + r + 1) b);
micro-step m of the whole group holds [m W b, (m + 1) W b).

A case is one registered router with one registered loss it accepts (the loss's term is
checked), or a router alone (its own terms, ``Routing.losses``, are checked). Weights are fixed
(``fixed_state``: every router parameter ~ N(0, 0.5^2) from one generator), everything is float64.
A router whose training forward draws random numbers (LPR's latent sample: probed, not
declared) runs in eval mode where a layout is compared with the reference: the noise of one
process over N tokens is not the noise of W processes over N / W tokens.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from moe_dist.balancing.semantics import LossSemantics
from moe_dist.config import MoEConfig, validate_moe
from moe_dist.layers.gate import Gate
from moe_dist.registry import LOSSES, ROUTERS

H, E, K, S, B_ALL = 8, 4, 2, 4, 8
TOL = {"atol": 2e-5, "rtol": 1e-4}  # tests/parallel/test_layer_exactness.py
# LPR's terms at O(1) (its defaults weigh them by 1e-4 .. 1e-2, below the tolerance).
ROUTER_OPTIONS: dict[str, dict[str, Any]] = {
    "lpr": {"latent_dim": 4, "loss_coef": 1.0, "kl_weight": 1.0, "align_weight": 1.0},
}
# Megatron's MoELayer dispatches the hidden states unchanged: no decoded latent (integrations/megatron.py).
MEGATRON_OPTIONS: dict[str, dict[str, Any]] = {"lpr": {"add_decoded_latent": False}}


@dataclass(frozen=True)
class Layout:
    dp: int
    ep: int
    ga: int

    @property
    def world(self) -> int:
        return self.dp * self.ep

    @property
    def b(self) -> int:
        return B_ALL // (self.world * self.ga)

    @property
    def name(self) -> str:
        return f"DP{self.dp}xEP{self.ep}xGA{self.ga}"

    def micro_batch(self, m: int, r: int) -> tuple[int, int]:
        """(first sequence, sequences) of rank r's micro-batch at micro-step m."""
        return (m * self.world + r) * self.b, self.b

    def micro_step(self, m: int) -> tuple[int, int]:
        """(first sequence, sequences) of micro-step m over all ranks."""
        return m * self.world * self.b, self.world * self.b


LAYOUTS = {
    1: [Layout(1, 1, 1), Layout(1, 1, 4)],
    2: [Layout(2, 1, 1), Layout(1, 2, 1), Layout(2, 1, 4)],
    4: [Layout(4, 1, 1), Layout(2, 2, 1)],
}


@dataclass(frozen=True)
class Case:
    router: str
    loss: str | None  # None: the router's own terms
    loss_options: tuple[tuple[str, Any], ...] = ()

    @property
    def name(self) -> str:
        opts = "".join(f",{k}={v}" for k, v in self.loss_options)
        return f"{self.router}+{self.loss or 'own_terms'}{opts}"

    def moe_config(self, megatron: bool = False) -> MoEConfig:
        router = {"name": self.router, "top_k": K, **ROUTER_OPTIONS.get(self.router, {})}
        if megatron:
            router.update(MEGATRON_OPTIONS.get(self.router, {}))
        losses = [{"name": self.loss, "coef": 1.0, **dict(self.loss_options)}] if self.loss else []
        return MoEConfig(num_experts=E, router=router, losses=losses, experts={"ffn_hidden_size": 8})

    def terms(self) -> list[str]:
        return [self.loss] if self.loss else own_terms(self.router)

    def semantics(self, term: str) -> LossSemantics:
        """The declared semantics of ``term`` under this case's router (`LossSemantics.under`)."""
        router_cls = ROUTERS.get(self.router)
        if term == self.loss:
            cfg = self.moe_config().losses[0]
            declared = LOSSES.get(term).semantics_for(cfg)
        else:
            declared = router_cls.semantics_of_term(term)
        return declared.under(router_cls.routing_batch)


def global_batch() -> torch.Tensor:
    return torch.randn(B_ALL, S, H, generator=torch.Generator().manual_seed(7), dtype=torch.float64)


@functools.cache
def own_terms(router: str) -> list[str]:
    gate = Gate(Case(router, None).moe_config(), H).double()
    _, aux = gate(global_batch().reshape(-1, H), B_ALL, S)
    return sorted(aux)


def built_in(name: str | None) -> bool:
    """A router or loss of moe_dist itself (not an entry-point plugin)."""
    if name is None:
        return True
    cls = ROUTERS.get(name) if name in ROUTERS.names() else LOSSES.get(name)
    return cls.__module__.startswith("moe_dist.")


def cases(skip: frozenset[str] = frozenset()) -> list[Case]:
    """Every registered router with every registered loss it accepts, and alone when it owns
    terms; none that names a plugin in ``skip``."""
    out = []
    for router in ROUTERS.names():
        for loss in [None, *LOSSES.names()]:
            case = Case(router, loss)
            if {router, loss} & skip:
                continue
            if validate_moe(case.moe_config(), H) or not case.terms():
                continue
            out.append(case)
    return out


@functools.cache
def fixed_state(case: Case) -> dict[str, torch.Tensor]:
    """The router's state: parameters ~ N(0, 0.5^2) from one generator, buffers as built; float64."""
    torch.manual_seed(0)
    cfg = case.moe_config().router
    router = ROUTERS.get(case.router)(cfg, H, E).double()
    g = torch.Generator().manual_seed(11)
    params = {n for n, _ in router.named_parameters()}
    state = {}
    for n, t in router.state_dict().items():
        is_param = n in params
        state[n] = torch.randn(t.shape, generator=g, dtype=t.dtype) * 0.5 if is_param else t.clone()
    return state


def load_router(router: nn.Module, case: Case) -> None:
    router.load_state_dict(fixed_state(case))


@functools.cache
def stochastic(case: Case) -> bool:
    """True when two training forwards of the same tokens under different seeds differ."""
    outs = []
    for seed in (1, 2):
        gate = make_gate(case, train=True)
        torch.manual_seed(seed)
        routing, aux = gate(global_batch().reshape(-1, H), B_ALL, S)
        outs.append([routing.weights_TK, routing.probs_TE, *(aux[k] for k in sorted(aux))])
    return not all(torch.equal(a, b) for a, b in zip(*outs))


def layout_mode(case: Case) -> bool:
    """Training mode for the layout comparisons (eval for a stochastic router, module docstring)."""
    return not stochastic(case)


def make_gate(case: Case, train: bool) -> Gate:
    gate = Gate(case.moe_config(), H).double()
    load_router(gate.router, case)
    return gate.train(train)


def term_grads(
    aux: dict[str, torch.Tensor], router: nn.Module, terms: list[str], scale: float = 1.0
) -> dict[str, dict[str, torch.Tensor]]:
    """Per term: its gradient (times ``scale``) on every router parameter (zeros where unused)."""
    named = [(n, p) for n, p in router.named_parameters() if p.requires_grad]
    out = {}
    for term in terms:
        gs = torch.autograd.grad(
            aux[term] * scale, [p for _, p in named], retain_graph=True, allow_unused=True
        )
        out[term] = {n: torch.zeros_like(p) if g is None else g for (n, p), g in zip(named, gs)}
    return out


def reference(case: Case, term: str, layout: Layout) -> tuple[float, dict[str, torch.Tensor]]:
    """The single-process value and router gradient of ``term`` under its declared semantics:
    token / sequence / weights: the whole global batch at once; micro_batch: the mean over the
    layout's micro-batches; global: the mean over its micro-steps (all ranks' tokens at once)."""
    batch = case.semantics(term).batch
    if batch in ("token", "sequence", "weights"):
        spans = ((0, B_ALL),)
    elif batch == "micro_batch":
        spans = tuple(layout.micro_batch(m, r) for m in range(layout.ga) for r in range(layout.world))
    else:
        spans = tuple(layout.micro_step(m) for m in range(layout.ga))
    return mean_over(case, term, spans)


@functools.cache
def mean_over(
    case: Case, term: str, spans: tuple[tuple[int, int], ...]
) -> tuple[float, dict[str, torch.Tensor]]:
    """``term``'s value and gradient, each batch of ``spans`` in one gate call, mean over them."""
    x_all = global_batch()
    gate = make_gate(case, train=layout_mode(case))
    value, grads = 0.0, None
    for lo, n in spans:
        _, aux = gate(x_all[lo : lo + n].reshape(-1, H), n, S)
        g = term_grads(aux, gate.router, [term], 1.0 / len(spans))[term]
        value += float(aux[term].detach()) / len(spans)
        grads = g if grads is None else {k: grads[k] + g[k] for k in g}
    assert grads is not None
    return value, grads


def assert_term_matches(
    where: str, value: float, grads: dict[str, torch.Tensor], want: tuple[float, dict[str, torch.Tensor]]
) -> None:
    v_ref, g_ref = want
    torch.testing.assert_close(value, v_ref, **TOL, msg=lambda m: f"{where}: value\n{m}")
    assert g_ref.keys() == grads.keys(), where
    for n, g in grads.items():
        torch.testing.assert_close(g, g_ref[n], **TOL, msg=lambda m, n=n: f"{where}: grad of {n}\n{m}")
