"""`Gate`: the routing stage of one MoE layer in one object: router, balancing losses, load statistics.

Shape legend: B batch, S sequence, T = B * S tokens on this rank, H hidden size, E experts
(global), e local experts (E / EP), K slots per token, E1 = E counts + 1 token count.

Our ``MoELayer``, the DeepSpeed gate (``MoeDistGate``) and the Megatron-Core router
(``MoeDistRouter``) each hold one, so a plugin's maths, loss names and statistics are the same
in every stack by construction. ``gate(x_TH, B, S) -> (routing, aux)``:

1. When the caller hands tokens sequence-first (``sequence_first``: Megatron's ``[S, B, H]``),
   reorder them batch-first so that sequence-wise losses see each sequence contiguously.
2. Route: ``routing = router(x_TH)`` (experts_TK, weights_TK, probs_TE, router-owned losses).
3. ``Load`` from this rank's counts and ``B * S`` tokens. When a loss ``needs_global_counts``, a
   copy of the counts and the token count is all-reduced over ``counts_group`` (None: the
   default group) without gradient, when ``reduce_counts`` and a process group is up;
   otherwise the losses see this rank's own.
4. ``aux``: ``coef * loss(routing, load, router)`` under each loss's registry name (made unique,
   `loss_names`), plus each key of ``routing.losses`` (summed into a loss of the same name).
   Computed in train and eval mode alike. A model-scope loss (``switch`` with ``scope: model``,
   one loss over all layers at once as Hugging Face computes it) is not in ``aux``: the gate
   keeps this forward's share in ``scope_parts`` and the model combines every layer's share
   (`model_scope_losses`); ``last_aux`` holds the layer's own value for its statistics.
5. Reorder the routing back to the caller's token order.
6. Statistics, in training mode only (eval leaves balancing state alone):
   ``tokens_per_expert_E`` (slots per expert before drops) and ``last_aux`` (detached terms).

After the dispatch, whoever dispatched reports what became of the slots (training mode only):

- our dispatcher (``MoELayer``): `record_received`: rows per local expert, dropped slots and,
  with ``timing``, the all-to-all and expert seconds;
- a foreign dispatcher (DeepSpeed, Megatron; ``kept_counts=True``): `record_kept`: kept slots
  per global expert and dropped slots. ``finish_step`` turns the kept counts into
  ``received_per_local_expert_e`` with one all-reduce over the EP group (the foreign stack
  does not report what each rank received) and reads zero seconds (it does the communication).

``finish_step`` (``moe_dist.training.step_hook``) reads these once per optimizer step, calls
``router.after_step`` and ``reset_stats()``. Whatever holds a gate exposes it as ``.gate``
(`HasGate`): the trainers, the step hook and telemetry read statistics only through it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from moe_dist.balancing.base import BalancingLoss, Load
from moe_dist.config import ConfigError, MoEConfig, validate_moe
from moe_dist.registry import LOSSES, ROUTERS
from moe_dist.routing.base import Router, Routing

_TIMINGS = ("a2a_seconds", "expert_seconds")


def loss_names(losses: list[BalancingLoss]) -> list[str]:
    """Each loss's registry name (its config name if unregistered); a name configured twice gets
    ``_1``, ``_2``... suffixes: ``[switch, z_loss, switch] -> [switch, z_loss, switch_1]``."""
    out: list[str] = []
    seen: dict[str, int] = {}
    for loss in losses:
        name = type(loss).registry_name or loss.cfg.name
        seen[name] = seen.get(name, 0) + 1
        out.append(name if seen[name] == 1 else f"{name}_{seen[name] - 1}")
    return out


class Gate(nn.Module):
    """A registered router, its balancing losses and the layer's load statistics (module docstring).

    - ``ep_size``: experts are sharded over this many EP ranks (``received_per_local_expert_e``
      has ``E / ep_size`` entries); `set_ep_size` changes it where EP becomes known later (DeepSpeed).
    - ``counts_group`` / ``reduce_counts``: where global counts are summed (step 3).
    - ``sequence_first``: the caller's tokens are sequence-first (step 1).
    - ``kept_counts``: the dispatcher is not ours; it reports through `record_kept`.
    - ``model_scope``: a model above calls `model_scope_losses` after each forward, so losses
      with ``scope: model`` are allowed (a config error otherwise: nothing would combine them).
    """

    def __init__(
        self,
        cfg: MoEConfig,
        hidden_size: int,
        *,
        ep_size: int = 1,
        counts_group: Any = None,
        reduce_counts: bool = True,
        sequence_first: bool = False,
        kept_counts: bool = False,
        model_scope: bool = False,
    ) -> None:
        super().__init__()
        errors = validate_moe(cfg, hidden_size, prefix="moe")
        if errors:
            raise ConfigError(errors)
        self.cfg = cfg
        E = cfg.num_experts
        self.hidden_size, self.num_experts = hidden_size, E
        self.ep_size, self.num_local_experts = ep_size, self._local_experts(ep_size)
        rcfg = cfg.router
        self.top_k = rcfg.top_k
        self.router: Router = ROUTERS.get(rcfg.name)(rcfg, hidden_size, E)
        self.losses: list[BalancingLoss] = [LOSSES.get(c.name)(c, E, rcfg.top_k) for c in cfg.losses]
        self.loss_names = loss_names(self.losses)
        scoped = [n for n, loss in zip(self.loss_names, self.losses) if loss.model_scope]
        if scoped and not model_scope:
            raise ConfigError(
                [
                    f"moe.losses: {', '.join(scoped)} has scope 'model' (one loss over every layer's "
                    "routing), which needs moe_dist's transformer to combine the layers; this stack "
                    "routes layer by layer (use scope: layer)"
                ]
            )
        # This forward's share of each model-scope loss, by name (replaced every forward).
        self.scope_parts: dict[str, Any] = {}
        self._own_scope_values: dict[str, torch.Tensor] = {}  # the layer's own value, for statistics
        self.counts_group, self.reduce_counts = counts_group, reduce_counts
        self.sequence_first = sequence_first
        # Statistics: non-persistent buffers (per-step scratch, and [e] depends on EP).
        self.register_buffer("tokens_per_expert_E", torch.zeros(E), persistent=False)
        self.register_buffer(
            "received_per_local_expert_e", torch.zeros(self.num_local_experts), persistent=False
        )
        self.register_buffer("dropped_tokens", torch.zeros(()), persistent=False)
        self.kept_per_expert_E: torch.Tensor | None
        self.register_buffer("kept_per_expert_E", torch.zeros(E) if kept_counts else None, persistent=False)
        self.last_aux: dict[str, torch.Tensor] = {}
        self.timing = False  # the layer times its all-to-all and experts (synchronising the device)
        self.a2a_seconds = 0.0
        self.expert_seconds = 0.0

    def _local_experts(self, ep_size: int) -> int:
        E = self.num_experts
        if E % ep_size:
            raise ConfigError(
                [f"moe.num_experts: must be divisible by the expert-parallel size ({ep_size}), got {E}"]
            )
        return E // ep_size

    def set_ep_size(self, ep_size: int) -> None:
        """Shard over ``ep_size`` EP ranks from now on (a stack that learns its EP group late)."""
        self.ep_size, self.num_local_experts = ep_size, self._local_experts(ep_size)
        self.received_per_local_expert_e = self.tokens_per_expert_E.new_zeros(self.num_local_experts)

    def forward(
        self, x_TH: torch.Tensor, batch_size: int, seq_len: int
    ) -> tuple[Routing, dict[str, torch.Tensor]]:
        T = x_TH.shape[0]
        if batch_size * seq_len != T:
            raise ValueError(f"Gate: batch_size * seq_len ({batch_size} * {seq_len}) != tokens ({T})")
        # 1. batch-first order for the router and losses
        order_T = None
        if self.sequence_first and batch_size > 1 and seq_len > 1:
            order_T = torch.arange(T, device=x_TH.device).view(seq_len, batch_size).t().reshape(-1)
            x_TH = x_TH.index_select(0, order_T)
        # 2. route
        routing = self.router(x_TH)
        counts_E = routing.counts_E()
        # 3-4. losses
        aux = self._aux_losses(routing, counts_E, batch_size, seq_len)
        # 5. back to the caller's order
        if order_T is not None:
            routing = _reorder(routing, torch.argsort(order_T))
        # 6. statistics
        if self.training:
            with torch.no_grad():
                self.tokens_per_expert_E += counts_E.to(self.tokens_per_expert_E.device)
                self.last_aux = {k: v.detach() for k, v in aux.items()} | self._own_scope_values
        return routing, aux

    def _aux_losses(
        self, routing: Routing, counts_E: torch.Tensor, B: int, S: int
    ) -> dict[str, torch.Tensor]:
        load = Load(counts_E=counts_E, num_tokens=B * S, batch_size=B, seq_len=S)
        if any(loss.needs_global_counts for loss in self.losses):
            total_E1 = torch.cat([counts_E, counts_E.new_full((1,), float(B * S))])
            if self.reduce_counts and dist.is_available() and dist.is_initialized():
                dist.all_reduce(total_E1, group=self.counts_group)
            load.global_counts_E = total_E1[:-1]
            load.global_num_tokens = total_E1[-1]  # stays on the device: no host read per layer
        aux, self.scope_parts, own = {}, {}, {}
        for name, loss in zip(self.loss_names, self.losses):
            if loss.model_scope:
                self.scope_parts[name] = loss.part(routing, load)
                with torch.no_grad():
                    own[name] = loss.cfg.coef * loss(routing, load, self.router)
            else:
                aux[name] = loss.cfg.coef * loss(routing, load, self.router)
        for name, value in routing.losses.items():
            aux[name] = aux[name] + value if name in aux else value
        self._own_scope_values = own
        return aux

    @torch.no_grad()
    def record_received(
        self,
        received_e: torch.Tensor,
        dropped: torch.Tensor | int,
        a2a_seconds: float = 0.0,
        expert_seconds: float = 0.0,
    ) -> None:
        """Our dispatcher's report: rows per local expert, dropped slots, seconds (training only)."""
        if self.training:
            self.received_per_local_expert_e += received_e.to(self.received_per_local_expert_e)
            self.dropped_tokens += dropped
            self.a2a_seconds += a2a_seconds
            self.expert_seconds += expert_seconds

    @torch.no_grad()
    def record_kept(self, kept_counts_E: torch.Tensor, dropped: torch.Tensor | int) -> None:
        """A foreign dispatcher's report: slots per expert that survived its capacity step, and
        how many were dropped (training only)."""
        if self.kept_per_expert_E is None:
            raise RuntimeError("Gate.record_kept: build the gate with kept_counts=True")
        if self.training:
            self.kept_per_expert_E += kept_counts_E.to(self.kept_per_expert_E)
            self.dropped_tokens += torch.as_tensor(dropped, dtype=torch.float32).to(
                self.dropped_tokens.device
            )

    def _stat_buffers(self) -> list[torch.Tensor]:
        bufs = [self.tokens_per_expert_E, self.received_per_local_expert_e, self.dropped_tokens]
        return bufs if self.kept_per_expert_E is None else [*bufs, self.kept_per_expert_E]

    @staticmethod
    @torch.no_grad()
    def reset_all(gates: Sequence[Gate]) -> None:
        """Zero the per-step statistics of every gate (``last_aux`` and ``timing`` stay): one
        multi-tensor zero for all of them, a launch rather than three per layer."""
        torch._foreach_zero_([buf for g in gates for buf in g._stat_buffers()])
        for g in gates:
            g.a2a_seconds = 0.0
            g.expert_seconds = 0.0

    def reset_stats(self) -> None:
        """Zero this gate's per-step statistics (``reset_all``)."""
        Gate.reset_all([self])

    @contextlib.contextmanager
    def stats_restored(self) -> Iterator[None]:
        """Undo every buffer and timing change made inside (a recomputed forward counts once)."""
        saved = {name: buf.clone() for name, buf in self.named_buffers()}
        timings = {a: getattr(self, a) for a in _TIMINGS}
        last_aux = self.last_aux
        try:
            yield
        finally:
            with torch.no_grad():
                for name, buf in self.named_buffers():
                    if name in saved:
                        buf.copy_(saved[name])
            for a, v in timings.items():
                setattr(self, a, v)
            self.last_aux = last_aux

    def extra_repr(self) -> str:
        return (
            f"router={self.router.registry_name}, losses={self.loss_names}, experts={self.num_experts}, "
            f"local={self.num_local_experts}, top_k={self.top_k}"
        )


def model_scope_losses(gates: list[Gate]) -> dict[str, torch.Tensor]:
    """Each model-scope loss over the shares that ``gates`` kept in their last forward, weighted
    by its coefficient (the loss object of the first gate that has it does the combining)."""
    out: dict[str, torch.Tensor] = {}
    for name in dict.fromkeys(n for g in gates for n in g.scope_parts):
        holders = [g for g in gates if name in g.scope_parts]
        loss = holders[0].losses[holders[0].loss_names.index(name)]
        out[name] = loss.cfg.coef * loss.combine([g.scope_parts[name] for g in holders])
    return out


class HasGate(Protocol):
    """What the trainers, ``finish_step`` and telemetry take: anything that holds a `Gate` as
    ``.gate`` (``MoELayer``, ``DeepSpeedMoELayer``, ``MoeDistGate``, ``MoeDistRouter``)."""

    @property
    def gate(self) -> Gate: ...


def _reorder(routing: Routing, index_T: torch.Tensor) -> Routing:
    """The same routing with its token rows gathered by ``index_T``."""

    def pick(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.index_select(0, index_T)

    return replace(
        routing,
        experts_TK=pick(routing.experts_TK),
        weights_TK=pick(routing.weights_TK),
        probs_TE=pick(routing.probs_TE),
        logits_TE=pick(routing.logits_TE),
        expert_input_delta_TH=pick(routing.expert_input_delta_TH),
    )
