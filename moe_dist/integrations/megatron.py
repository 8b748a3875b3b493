"""moe_dist routers and balancing losses inside Megatron-Core's ``MoELayer`` (0.16.1; 0.17-0.19 spec forms).

Shape legend: S sequence, B batch, T = S * B tokens on this rank (Megatron orders them
sequence-first), H hidden size, E experts, K slots per token.

Three lines in a Megatron-Core user's script::

    from moe_dist.integrations.megatron import get_gpt_layer_spec_with_router, after_step
    spec = get_gpt_layer_spec_with_router(moe_cfg, num_experts=E)   # a GPT layer spec
    ... after optimizer.step(): after_step(model)                      # bias / EMA updates, stats

`MoeDistRouter` is a ``TopKRouter`` subclass that ``MoELayer`` builds from
``MoESubmodules.router``; its ``forward(input [S, B, H], padding_mask=None)``:

1. Reorders tokens batch-first and runs the registered router and every balancing loss (its
   `Gate`, ``router.gate``: the native ``MoELayer``'s maths, names and statistics).
2. Scatters the ``[T, K]`` choice into ``probs [T, E]`` (zero outside the chosen experts;
   unused ``-1`` slots of expert choice give a token fewer experts) and ``routing_map [T, E]`` bool.
3. With ``moe_expert_capacity_factor`` set, Megatron's own ``apply_router_token_dropping``.
4. In training with gradients, attaches each term to ``probs`` by name through
   ``attach_and_log_load_balancing_loss`` (``MoEAuxLossAutoScaler``: the term's gradient joins the
   backward, Megatron's tracker logs ``term / coef``, per layer).

The router's parameters are our router's (``router.gate.router``); ``router.weight`` is that
router's ``weight_EH`` (None for routers without one), the matrix SimBal regularises. Megatron's
own ``weight`` parameter is dropped.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from megatron.core.transformer.moe.moe_utils import apply_router_token_dropping
from megatron.core.transformer.moe.router import TopKRouter
from torch import nn

from moe_dist.config import MoEConfig
from moe_dist.layers.gate import Gate
from moe_dist.parallel.groups import ParallelGroups
from moe_dist.training.step_hook import StepCounts, finish_step


def routing_to_megatron(
    experts_TK: torch.Tensor, weights_TK: torch.Tensor, num_experts: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(probs_TE, routing_map_TE)`` from a ``[T, K]`` choice; ``-1`` slots add nothing.

    Worked example (E=3): experts [[2, 0], [1, -1]], weights [[.7, .3], [1., 0.]] ->
    probs [[.3, 0, .7], [0, 1., 0]], map [[T, F, T], [F, T, F]]. Differentiable in the weights.
    """
    valid_TK = experts_TK >= 0
    index_TK = experts_TK.clamp(min=0)
    w_TK = torch.where(valid_TK, weights_TK, torch.zeros_like(weights_TK))
    probs_TE = w_TK.new_zeros(experts_TK.shape[0], num_experts).scatter_add(1, index_TK, w_TK)
    hits_TE = torch.zeros_like(probs_TE, dtype=torch.int32).scatter_add(1, index_TK, valid_TK.to(torch.int32))
    return probs_TE, hits_TE > 0


class MoeDistRouter(TopKRouter):
    """A Megatron-Core router running a registered moe_dist router and losses (module docstring).

    Built by ``MoELayer`` as ``submodules.router(config=..., pg_collection=...[, is_mtp_layer=...])``;
    `router_builder` binds the ``MoEConfig``.
    """

    def __init__(self, config: Any, pg_collection: Any = None, *, moe_cfg: MoEConfig, **kwargs: Any) -> None:
        if pg_collection is None:
            from megatron.core.transformer.moe.moe_utils import get_default_pg_collection  # noqa: PLC0415

            pg_collection = get_default_pg_collection()
        super().__init__(config=config, pg_collection=pg_collection, **kwargs)
        # Megatron's gate parameters go: ours live in the gate's router (see `weight`).
        del self._parameters["weight"]
        if self._parameters.get("bias") is not None:
            del self._parameters["bias"]
            self.bias = None
        ep_group = getattr(pg_collection, "ep", None)
        ep_size = dist.get_world_size(ep_group) if ep_group is not None and dist.is_initialized() else 1
        self.gate = Gate(
            moe_cfg,
            config.hidden_size,
            ep_size=ep_size,
            counts_group=getattr(pg_collection, "tp_dp_cp", None),
            sequence_first=True,
            kept_counts=True,
        )
        for p in self.gate.parameters():
            p.sequence_parallel = config.sequence_parallel  # type: ignore[attr-defined]  # as Megatron's weight

    @property
    def weight(self) -> torch.Tensor | None:  # type: ignore[override]
        gate = self.__dict__.get("_modules", {}).get("gate")
        if gate is None:  # inside TopKRouter.__init__: Megatron registers and initialises its own
            if "weight" in self._parameters:
                return self._parameters["weight"]
            raise AttributeError("weight")  # not yet registered: lets register_parameter proceed
        return gate.router.weight_EH

    def gating(self, input: torch.Tensor) -> torch.Tensor:
        """CPU-safe logits of a linear router (Megatron's moves weights to the current CUDA device)."""
        w_EH = self.weight
        if w_EH is None:
            raise RuntimeError(f"router {self.gate.router.registry_name!r} has no linear gate")
        return F.linear(input.float(), w_EH.float())

    def routing(self, logits: torch.Tensor, padding_mask: torch.Tensor | None = None) -> Any:
        raise NotImplementedError("MoeDistRouter routes from the hidden states: call forward(input)")

    def forward(  # type: ignore[override]
        self, input: torch.Tensor, padding_mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        S, B = (input.shape[0], input.shape[1]) if input.dim() == 3 else (input.shape[0], 1)
        x_TH = input.reshape(-1, input.shape[-1])
        # 1. route + losses (batch-first inside)
        routing, aux = self.gate(x_TH, B, S)
        if routing.expert_input_delta_TH is not None:
            raise NotImplementedError(
                f"router {self.gate.router.registry_name!r} changes the experts' input (LPR's latent); "
                "Megatron's MoELayer dispatches the hidden states unchanged: set add_decoded_latent: false"
            )
        # 2. Megatron's contract
        probs_TE, routing_map_TE = routing_to_megatron(
            routing.experts_TK, routing.weights_TK.float(), self.num_experts
        )
        # 3. capacity, Megatron's way
        if self.config.moe_expert_capacity_factor is not None:
            probs_TE, kept_TE = apply_router_token_dropping(
                probs_TE,
                routing_map_TE,
                router_topk=self.topk,
                capacity_factor=self.config.moe_expert_capacity_factor,
                drop_policy=self.config.moe_token_drop_policy,
                pad_to_capacity=self.config.moe_pad_expert_input_to_capacity,
            )
            dropped = (routing_map_TE & ~kept_TE).sum()
            routing_map_TE = kept_TE
        else:
            dropped = torch.zeros((), device=probs_TE.device)
        self.gate.record_kept(routing_map_TE.sum(0).float(), dropped)
        # 4. aux terms ride on probs, one per name
        if self.training and torch.is_grad_enabled():
            coefs = {name: loss.cfg.coef for name, loss in zip(self.gate.loss_names, self.gate.losses)}
            for name, value in aux.items():
                coef = coefs.get(name, 1.0) or 1.0  # router-owned terms are already weighted
                probs_TE = self.attach_and_log_load_balancing_loss(
                    probs_TE, coef, value, name, self.tp_cp_group
                )
        return probs_TE, routing_map_TE


@torch.no_grad()
def copy_experts_to_megatron(native: nn.Module, layer: nn.Module) -> None:
    """A native ``MoELayer``'s router state and experts into Megatron-Core's ``MoELayer`` with
    `MoeDistRouter` and ``SequentialMLP`` experts: ``linear_fc1.weight = w13[i]^T`` (Megatron's
    gated fc1 is [gate; up] along its output rows, our fused ``[w1 | w3]`` transposed, no
    reordering) and ``linear_fc2.weight = w2[i]^T``. Both place global expert ``ep_rank * e + i``
    at local index ``i``."""
    layer.router.gate.router.load_state_dict(native.gate.router.state_dict())
    ex = native.experts
    local = layer.experts.local_experts
    if len(local) != ex.num_local_experts:
        raise ValueError(
            f"copy_experts_to_megatron: {len(local)} Megatron experts, native has {ex.num_local_experts}"
        )
    for i, mlp in enumerate(local):
        mlp.linear_fc1.weight.copy_(ex.w13_eHG[i].t())
        mlp.linear_fc2.weight.copy_(ex.w2_eFH[i].t())


def router_builder(moe_cfg: MoEConfig) -> Any:
    """What goes into ``MoESubmodules.router``: `MoeDistRouter` bound to ``moe_cfg``."""
    return functools.partial(MoeDistRouter, moe_cfg=moe_cfg)


def moe_submodules(mlp_spec: Any) -> Any:
    """The ``MoESubmodules`` of an MoE spec in either form (to build ``MoELayer(config, submodules)``)."""
    if isinstance(mlp_spec, functools.partial):
        return mlp_spec.keywords.get("submodules")
    return getattr(mlp_spec, "submodules", None)


def with_router(mlp_spec: Any, moe_cfg: MoEConfig) -> Any:
    """A copy of an MoE spec with our router: ``ModuleSpec`` (0.16) or ``functools.partial`` (0.19)."""
    if isinstance(mlp_spec, functools.partial):
        sub = mlp_spec.keywords.get("submodules")
        if sub is None or not hasattr(sub, "router"):
            raise TypeError(f"not an MoE layer spec (no submodules.router): {mlp_spec!r}")
        return functools.partial(
            mlp_spec.func,
            *mlp_spec.args,
            **{**mlp_spec.keywords, "submodules": dataclasses.replace(sub, router=router_builder(moe_cfg))},
        )
    sub = getattr(mlp_spec, "submodules", None)
    if sub is None or not hasattr(sub, "router"):
        raise TypeError(f"not an MoE layer spec (no submodules.router): {mlp_spec!r}")
    return dataclasses.replace(mlp_spec, submodules=dataclasses.replace(sub, router=router_builder(moe_cfg)))


def get_gpt_layer_spec_with_router(
    moe_cfg: MoEConfig,
    num_experts: int | None = None,
    use_transformer_engine: bool = False,
    **spec_kwargs: Any,
) -> Any:
    """Megatron's GPT layer spec (local or Transformer Engine) with `MoeDistRouter` as the MoE router."""
    from megatron.core.models.gpt import gpt_layer_specs  # noqa: PLC0415

    make = (
        gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec
        if use_transformer_engine
        else gpt_layer_specs.get_gpt_layer_local_spec
    )
    layer = make(num_experts=num_experts or moe_cfg.num_experts, **spec_kwargs)
    mlp = layer.submodules.mlp
    layer = dataclasses.replace(
        layer, submodules=dataclasses.replace(layer.submodules, mlp=with_router(mlp, moe_cfg))
    )
    return layer


def transformer_config_fields(moe_cfg: MoEConfig, ep_size: int = 1) -> dict[str, Any]:
    """``TransformerConfig`` MoE fields for ``moe_cfg`` (our router and losses do the balancing).

    Megatron's own balancing is off (``moe_router_load_balancing_type: none``, coefficients 0,
    no z-loss, no expert bias): the terms come from our losses. ``moe_router_pre_softmax`` keeps
    Megatron's top-1 validation happy; our router decides the weights either way.
    """
    return {
        "num_moe_experts": moe_cfg.num_experts,
        "moe_router_topk": moe_cfg.router.top_k,
        "moe_ffn_hidden_size": moe_cfg.experts.ffn_hidden_size,
        "gated_linear_unit": moe_cfg.experts.activation == "swiglu",
        "activation_func": F.silu if moe_cfg.experts.activation == "swiglu" else F.gelu,
        "moe_expert_capacity_factor": moe_cfg.capacity_factor,
        "moe_shared_expert_intermediate_size": (
            moe_cfg.shared_experts.count * moe_cfg.shared_experts.ffn_hidden_size
            if moe_cfg.shared_experts.count
            else None
        ),
        "moe_router_load_balancing_type": "none",
        "moe_aux_loss_coeff": 0.0,
        "moe_z_loss_coeff": None,
        "moe_router_enable_expert_bias": False,
        "moe_router_pre_softmax": moe_cfg.router.top_k == 1,
        "expert_model_parallel_size": ep_size,
    }


def routers_of(model: nn.Module) -> list[MoeDistRouter]:
    return [m for m in model.modules() if isinstance(m, MoeDistRouter)]


def megatron_groups() -> ParallelGroups:
    """``ParallelGroups`` from Megatron's ``parallel_state`` (EP group; counts over the whole world)."""
    from megatron.core import parallel_state as ps  # noqa: PLC0415

    if not dist.is_initialized():
        return ParallelGroups.single()
    return ParallelGroups(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        ep_size=ps.get_expert_model_parallel_world_size(),
        ep_group=ps.get_expert_model_parallel_group(),
        expert_dp_group=None,
        world_group=dist.group.WORLD,
    )


def after_step(model: nn.Module, groups: ParallelGroups | None = None) -> StepCounts:
    """Call after ``optimizer.step()``: ``finish_step`` over every `MoeDistRouter` of ``model``
    (kept -> received counts over EP, global counts, ``router.after_step``: bias, EMA keys; stats reset).

    Returns the `StepCounts`, for ``Telemetry.on_step(step, routers_of(model), counts)`` (call
    telemetry with these before the next forward).
    """
    return finish_step(routers_of(model), groups if groups is not None else megatron_groups())
