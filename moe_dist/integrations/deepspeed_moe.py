"""moe_dist routers and balancing losses inside DeepSpeed MoE (``deepspeed.moe.layer.MoE``), 0.19.x.

Shape legend: T tokens on this rank, H hidden size, F ffn hidden size, E experts (global),
e local experts, K slots per token, C capacity (slots per expert per rank), B batch, S sequence.

Three lines in a DeepSpeed user's model::

    from moe_dist.integrations.deepspeed_moe import build_deepspeed_moe
    self.moe = build_deepspeed_moe(moe_cfg, hidden, expert=my_mlp, ep_size=2)   # a deepspeed MoE
    out, l_aux, exp_counts = self.moe(x);  loss = task_loss + l_aux              # l_aux is weighted

`MoeDistGate` is a ``TopKGate`` that DeepSpeed's ``MOELayer`` calls like its own:

1. Route with the registered router and compute every balancing loss (its `Gate`, ``gate.gate``:
   the native ``MoELayer``'s maths and statistics).
2. Capacity, as ``TopKGate`` computes it: with ``drop_tokens`` ``C = max(ceil(T / E * cf * K),
   min_capacity)`` (``cf`` = ``capacity_factor`` in training, ``eval_capacity_factor`` in eval);
   without, ``C`` = the largest per-expert count over the EP group (an all-reduce MAX, as
   DeepSpeed does; every EP rank must run every MoE layer), padded to the TP size as DeepSpeed does.
3. Drop policy (with ``drop_tokens``): the native dispatcher's, ``permute.sort_slots``: an
   expert keeps the ``C`` slots with the highest router weight, earlier tokens first on ties. A
   dropped slot adds nothing (the token keeps its other experts; weights are not renormalised).
   Unused slots (-1, expert choice) are never dispatched. Tokens with ``used_token == 0`` are
   not dispatched either.
4. Return what the calling DeepSpeed version expects: the dense 4-tuple ``(l_aux, combine_SEC,
   dispatch_SEC, exp_counts_E)`` (<= 0.19.3), or with ``sparse_routes`` (>= 0.19.4, what 0.19.8
   always asks for) the 7-tuple ``(l_aux, C, E, indices_KT, locations_KT, gates_KT,
   exp_counts_E)`` with ``-1`` indices for dropped/unused slots.

``l_aux`` is the sum of the coefficient-weighted terms (each loss's ``coef`` is already applied;
add it to the loss as it is); the terms by name are in ``gate.gate.last_aux`` and, with their
graph, in ``moe.aux_terms`` after a forward of the MoE that `build_deepspeed_moe` returns.

Routers that change the experts' input (LPR's ``expert_input_delta_TH``) need that MoE: its
forward routes first, then hands ``x + delta`` to DeepSpeed's dispatch.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
import torch.distributed as dist
import torch.nn.functional as F
from deepspeed.moe.layer import MoE
from deepspeed.moe.sharded_moe import TopKGate
from deepspeed.utils import groups as ds_groups
from torch import nn

from moe_dist.config import ExpertsConfig, MoEConfig
from moe_dist.layers.experts import SharedExperts
from moe_dist.layers.gate import Gate
from moe_dist.layers.split_layout import join_on_load
from moe_dist.ops.compute_dtype import cast_weight, compute_dtype
from moe_dist.ops.slot_sort import sort_slots
from moe_dist.routing.base import Routing


def deepspeed_capacity(
    num_tokens: int, num_experts: int, top_k: int, capacity_factor: float, min_capacity: int
) -> int:
    """``TopKGate``'s capacity: ``max(ceil(T / E * cf * K), min_capacity)`` (top1/top2/topk agree)."""
    return max(math.ceil(num_tokens / num_experts * capacity_factor * top_k), min_capacity)


def slot_locations(
    experts_S: torch.Tensor, weights_S: torch.Tensor, num_experts: int, capacity: int | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Which slots an expert keeps and where: ``(kept_S bool, location_S, kept_counts_E)``.

    Worked layout (E=2, capacity 1, slots s0..s3 -> experts [0, 1, 0, -1], weights [.2, .9, .7, 0]):
    expert 0 keeps s2 (higher weight) at location 0 and drops s0; expert 1 keeps s1 at 0; s3 is
    unused. Kept slots of one expert take locations 0.. in token order (``sort_slots``' order).
    """
    order_S, kept_counts_E = sort_slots(experts_S, num_experts, weights_S, capacity)
    S = experts_S.shape[0]
    rank_S = torch.empty_like(order_S).scatter_(0, order_S, torch.arange(S, device=order_S.device))
    starts_E = torch.cumsum(kept_counts_E, 0) - kept_counts_E
    kept_S = (experts_S >= 0) & (rank_S < kept_counts_E.sum())
    location_S = torch.where(kept_S, rank_S - starts_E[experts_S.clamp(min=0)], torch.zeros_like(rank_S))
    return kept_S, location_S, kept_counts_E


class MoeDistGate(TopKGate):
    """A ``TopKGate`` running a registered moe_dist router and losses (see the module docstring).

    The gate's parameters are the router's (``gate.gate.router``); ``TopKGate``'s ``wg`` is removed.
    ``ep_size``: the EP size the experts are sharded over (the EP group, when it is set, says it again).
    """

    def __init__(
        self,
        cfg: MoEConfig,
        hidden_size: int,
        capacity_factor: float = 1.0,
        eval_capacity_factor: float = 1.0,
        min_capacity: int = 4,
        drop_tokens: bool = True,
        ep_group: Any = None,
        sequence_first: bool = False,
        ep_size: int = 1,
        model_scope: bool = False,
    ) -> None:
        # Global counts over the default group (DP x EP), set up by deepspeed.initialize.
        gate = Gate(
            cfg,
            hidden_size,
            ep_size=ep_size,
            sequence_first=sequence_first,
            kept_counts=True,
            model_scope=model_scope,
        )
        super().__init__(
            hidden_size,
            cfg.num_experts,
            k=gate.top_k,
            capacity_factor=capacity_factor,
            eval_capacity_factor=eval_capacity_factor,
            min_capacity=min_capacity,
            noisy_gate_policy=None,
            drop_tokens=drop_tokens,
            use_rts=False,
            ep_group=None,
            top2_2nd_expert_sampling=False,
        )
        del self.wg  # the router owns the gate weight
        self.gate = gate
        self._pre_routed: tuple[Routing, dict[str, torch.Tensor]] | None = None
        if ep_group is not None:
            self._set_ep_group(ep_group)

    def _set_ep_group(self, ep_group: Any) -> None:
        super()._set_ep_group(ep_group)
        if ep_group is not None and dist.is_initialized():
            self.gate.set_ep_size(dist.get_world_size(ep_group))

    def route(
        self, x_TH: torch.Tensor, batch_size: int, seq_len: int
    ) -> tuple[Routing, dict[str, torch.Tensor]]:
        """Route ahead of DeepSpeed's ``MOELayer`` (the next gate call uses this result)."""
        self._pre_routed = self.gate(x_TH, batch_size, seq_len)
        return self._pre_routed

    def forward(  # type: ignore[override]
        self,
        input: torch.Tensor,
        used_token: torch.Tensor | None = None,
        sparse_routes: bool = False,
        use_tutel: bool = False,
    ) -> tuple[Any, ...]:
        T = input.shape[0]
        # 1. route (or take what `route` computed for this input)
        if self._pre_routed is not None:
            routing, aux = self._pre_routed
            self._pre_routed = None
            if routing.experts_TK.shape[0] != T:
                raise RuntimeError(f"MoeDistGate: pre-routed {routing.experts_TK.shape[0]} tokens, got {T}")
        else:
            # DeepSpeed's own MOELayer flattens the batch: one sequence of T tokens as far as we know
            per_sequence = [
                n
                for n, loss in zip(self.gate.loss_names, self.gate.losses)
                if loss.semantics.batch == "sequence"
            ]
            if per_sequence:
                raise RuntimeError(
                    f"MoeDistGate: {', '.join(per_sequence)} is computed per sequence, and DeepSpeed's MoE "
                    "hands the gate a flat batch without its shape; build the layer with "
                    "moe_dist.integrations.deepspeed_moe.build_deepspeed_moe, which routes with (B, S)"
                )
            routing, aux = self.gate(input, 1, T)
            if routing.expert_input_delta_TH is not None:
                raise RuntimeError(
                    f"MoeDistGate: router {self.gate.router.registry_name!r} changes the experts' input; "
                    "use the MoE from moe_dist.integrations.deepspeed_moe.build_deepspeed_moe, "
                    "which applies it"
                )
        E, K = self.gate.num_experts, routing.experts_TK.shape[1]
        experts_TK, weights_TK = routing.experts_TK, routing.weights_TK.float()
        if used_token is not None:
            unused_T1 = used_token.reshape(T, 1) == 0
            experts_TK = experts_TK.masked_fill(unused_T1, -1)
            weights_TK = weights_TK.masked_fill(unused_T1, 0.0)
        valid_S = experts_TK.reshape(-1) >= 0
        exp_counts_E = torch.bincount(experts_TK.reshape(-1)[valid_S], minlength=E)
        # 2. capacity
        if self.drop_tokens:
            cf = self.capacity_factor if self.training else self.eval_capacity_factor
            capacity = deepspeed_capacity(T, E, self.k, cf, self.min_capacity)
        else:
            capacity = self._dropless_capacity(exp_counts_E)
        # 3. which slots each expert keeps, and where
        kept_S, location_S, kept_counts_E = slot_locations(
            experts_TK.reshape(-1), weights_TK.reshape(-1), E, capacity if self.drop_tokens else None
        )
        self.gate.record_kept(kept_counts_E.float(), valid_S.sum() - kept_S.sum())
        l_aux = sum(aux.values(), torch.zeros((), device=input.device))
        kept_TK, location_TK = kept_S.view(T, K), location_S.view(T, K)
        gates_TK = torch.where(kept_TK, weights_TK, torch.zeros_like(weights_TK))
        # 4. DeepSpeed's return contract
        if sparse_routes:
            indices_KT = torch.where(kept_TK, experts_TK, torch.full_like(experts_TK, -1)).t().contiguous()
            return (
                l_aux,
                capacity,
                E,
                indices_KT.to(torch.int32),
                (location_TK * kept_TK).t().contiguous().to(torch.int32),
                gates_TK.t().contiguous(),
                exp_counts_E,
            )
        combine_SEC, dispatch_SEC = dense_routes(experts_TK, kept_TK, location_TK, gates_TK, E, capacity)
        return l_aux, combine_SEC, dispatch_SEC, exp_counts_E

    def _dropless_capacity(self, exp_counts_E: torch.Tensor) -> int:
        """The largest count over the EP group (DeepSpeed's ``drop_tokens=False``), padded to TP."""
        new_capacity = exp_counts_E.max().reshape(1)
        if self.ep_group is not None and dist.is_initialized() and dist.get_world_size(self.ep_group) > 1:
            dist.all_reduce(new_capacity, op=dist.ReduceOp.MAX, group=self.ep_group)
        capacity = int(new_capacity.item())
        if ds_groups.mpu is not None and ds_groups._get_expert_model_parallel_world_size() == 1:
            from deepspeed.utils.bwc import bwc_tensor_model_parallel_world_size

            tp = bwc_tensor_model_parallel_world_size(mpu=ds_groups.mpu)
            capacity = math.ceil(capacity / tp) * tp
        # Not capped at this rank's T: every EP rank must size its all-to-all buffers alike.
        return max(capacity, 1)


def dense_routes(
    experts_TK: torch.Tensor,
    kept_TK: torch.Tensor,
    location_TK: torch.Tensor,
    gates_TK: torch.Tensor,
    num_experts: int,
    capacity: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``combine_SEC`` (the gate weight at [token, expert, location]) and the bool ``dispatch_SEC``.

    One scatter into a flat ``[T*E*C + 1]`` buffer whose last entry collects dropped/unused
    slots; differentiable in ``gates_TK``.
    """
    T = experts_TK.shape[0]
    size = T * num_experts * capacity
    token_TK = torch.arange(T, device=experts_TK.device).unsqueeze(1).expand_as(experts_TK)
    flat_TK = (token_TK * num_experts + experts_TK.clamp(min=0)) * capacity + location_TK
    flat_TK = torch.where(kept_TK, flat_TK, torch.full_like(flat_TK, size))
    combine = gates_TK.new_zeros(size + 1).scatter_add(0, flat_TK.reshape(-1), gates_TK.reshape(-1))
    dispatch = torch.zeros(size + 1, dtype=torch.bool, device=experts_TK.device)
    dispatch = dispatch.scatter(0, flat_TK.reshape(-1), kept_TK.reshape(-1))
    shape = (T, num_experts, capacity)
    return combine[:size].view(shape), dispatch[:size].view(shape)


class ExpertMLP(nn.Module):
    """One expert, the same function as one slice of ``GroupedExperts``: ``act(x W1) (* x W3) W2``,
    with the same fused layout: ``w13_HG`` = [w1 | w3] (SwiGLU, G = 2F; w1 alone for GELU), so
    gate and up are one GEMM. Init draws w1, w3, w2 in that order (the earlier split layout's).

    Works on any leading shape (DeepSpeed's ``Experts`` feeds ``[ep, 1, C, H]`` chunks).
    """

    def __init__(
        self,
        hidden: int,
        ffn_hidden: int,
        activation: Literal["swiglu", "gelu"] = "swiglu",
        init_std: float = 0.02,
    ) -> None:
        super().__init__()
        self.swiglu = activation == "swiglu"
        n_in = 2 if self.swiglu else 1
        halves = [torch.empty(hidden, ffn_hidden).normal_(0.0, init_std) for _ in range(n_in)]
        self.w13_HG = nn.Parameter(torch.cat(halves, dim=-1))
        self.w2_FH = nn.Parameter(torch.empty(ffn_hidden, hidden).normal_(0.0, init_std / math.sqrt(2.0)))
        self.split_pairs = ("w13_HG",) if self.swiglu else ()  # layers/split_layout.py
        join_on_load(self)  # DeepSpeed's expert files of format version <= 2

    @classmethod
    def from_config(cls, cfg: ExpertsConfig, hidden: int) -> ExpertMLP:
        return cls(hidden, cfg.ffn_hidden_size, cfg.activation, cfg.init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dt = compute_dtype(x)
        h = x.to(dt) @ cast_weight(self.w13_HG, dt)
        if self.swiglu:
            h1, h3 = h.chunk(2, dim=-1)
            h = F.silu(h1) * h3
        else:
            h = F.gelu(h)
        return h @ cast_weight(self.w2_FH, dt)


class MoeDistDeepSpeedMoE(MoE):
    """DeepSpeed's ``MoE`` with `MoeDistGate`; ``forward(x) -> (out, l_aux, exp_counts)`` as DeepSpeed's.

    1. Route ``x`` (``[B, S, H]``, ``[S, B, H]`` with ``sequence_first``, or ``[T, H]``) with the
       gate's router and losses, knowing B and S (sequence-wise losses need them).
    2. DeepSpeed's ``MOELayer`` dispatches ``x`` (+ the router's expert-input delta, LPR), runs
       the experts (all-to-all over the EP group) and combines; the gate returns the routing of 1.
    3. Shared experts (``moe.shared_experts.count``), if any, see every token; their output is added.

    ``aux_terms`` holds the last forward's weighted terms by name, with their graph.
    """

    shared_experts: SharedExperts | None

    def forward(  # type: ignore[override]
        self, hidden_states: torch.Tensor, used_token: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        gate: MoeDistGate = self.deepspeed_moe.gate  # type: ignore[assignment]
        H = hidden_states.shape[-1]
        if hidden_states.dim() == 3:
            lead = hidden_states.shape[:2]
            B, S = (lead[1], lead[0]) if gate.gate.sequence_first else (lead[0], lead[1])
        else:
            B, S = 1, hidden_states.numel() // H
        # 1. route
        routing, aux = gate.route(hidden_states.reshape(-1, H), B, S)
        self.aux_terms = aux
        xe = hidden_states
        if routing.expert_input_delta_TH is not None:
            xe = hidden_states + routing.expert_input_delta_TH.view_as(hidden_states).to(hidden_states.dtype)
        # 2. DeepSpeed dispatch / experts / combine
        try:
            output = self.deepspeed_moe(xe, used_token)
        finally:
            gate._pre_routed = None
        if self.use_residual:
            output_mlp = self.mlp(xe)
            if isinstance(output_mlp, tuple):
                output_mlp = output_mlp[0]
            coef = F.softmax(self.coefficient(hidden_states), dim=-1)
            output = output * coef[..., 0:1] + output_mlp * coef[..., 1:]
        # 3. shared experts
        if self.shared_experts is not None:
            output = output + self.shared_experts(xe.reshape(-1, H)).view_as(output)
        return output, self.deepspeed_moe.l_aux, self.deepspeed_moe.exp_counts


def build_deepspeed_moe(
    moe_cfg: MoEConfig,
    hidden: int,
    expert: nn.Module | None = None,
    ep_size: int = 1,
    *,
    capacity_factor: float | None = None,
    eval_capacity_factor: float | None = None,
    min_capacity: int = 4,
    sequence_first: bool = False,
    use_residual: bool = False,
    model_scope: bool = False,
) -> MoeDistDeepSpeedMoE:
    """A ``deepspeed.moe.layer.MoE`` whose gate is `MoeDistGate` for ``moe_cfg``'s router and losses.

    - ``expert``: the module DeepSpeed copies once per local expert (default: `ExpertMLP` from
      ``moe_cfg.experts``, the native experts' function).
    - Capacity: ``capacity_factor`` (default ``moe_cfg.capacity_factor``); None = dropless
      (``drop_tokens=False``). ``eval_capacity_factor`` defaults to the training one.
    - The gate is installed before any parallelism is set: ``deepspeed.initialize`` (or
      ``moe.set_deepspeed_parallelism()``) then gives it the EP group, as for ``TopKGate``.
    - ``model_scope``: the caller combines model-scope losses over its layers
      (``layers.gate.model_scope_losses``), as moe_dist's transformer does; a bare DeepSpeed MoE
      refuses ``scope: model``.
    """
    cf = capacity_factor if capacity_factor is not None else moe_cfg.capacity_factor
    eval_cf = eval_capacity_factor if eval_capacity_factor is not None else cf
    # The gate first: it validates moe_cfg (and that ep_size divides the experts) for the MoE.
    gate = MoeDistGate(
        moe_cfg,
        hidden,
        capacity_factor=cf or 1.0,
        eval_capacity_factor=eval_cf or 1.0,
        min_capacity=min_capacity,
        drop_tokens=cf is not None,
        sequence_first=sequence_first,
        ep_size=ep_size,
        model_scope=model_scope,
    )
    expert = expert if expert is not None else ExpertMLP.from_config(moe_cfg.experts, hidden)
    moe = MoeDistDeepSpeedMoE(
        hidden,
        expert,
        num_experts=moe_cfg.num_experts,
        ep_size=ep_size,
        k=moe_cfg.router.top_k,
        capacity_factor=cf or 1.0,
        eval_capacity_factor=eval_cf or 1.0,
        min_capacity=min_capacity,
        use_residual=use_residual,
        drop_tokens=cf is not None,
        use_rts=False,
        top2_2nd_expert_sampling=False,
    )
    moe.deepspeed_moe.gate = gate
    sh = moe_cfg.shared_experts
    moe.shared_experts = (
        SharedExperts(sh.count, hidden, sh.ffn_hidden_size, init_std=moe_cfg.experts.init_std)
        if sh.count
        else None
    )
    return moe


@torch.no_grad()
def copy_from_native(moe: MoeDistDeepSpeedMoE, layer: nn.Module) -> None:
    """Load a native ``MoELayer``'s weights (router, this rank's experts, shared experts) into ``moe``.

    Both place global expert ``ep_rank * e + i`` at local index ``i``, so local copies local.
    """
    gate: MoeDistGate = moe.deepspeed_moe.gate  # type: ignore[assignment]
    gate.gate.router.load_state_dict(layer.gate.router.state_dict())
    ex = layer.experts
    ds_experts = moe.deepspeed_moe.experts.deepspeed_experts
    if len(ds_experts) != ex.num_local_experts:
        raise ValueError(
            f"copy_from_native: {len(ds_experts)} local DeepSpeed experts, native has {ex.num_local_experts}"
        )
    for i, mlp in enumerate(ds_experts):
        mlp.w13_HG.copy_(ex.w13_eHG[i])
        mlp.w2_FH.copy_(ex.w2_eFH[i])
    if moe.shared_experts is not None and layer.shared_experts is not None:
        moe.shared_experts.load_state_dict(layer.shared_experts.state_dict())
