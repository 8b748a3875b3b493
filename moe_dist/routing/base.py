"""The router contract: `Routing` (what a router decides) and `Router` (the plugin interface).

Shape legend: T tokens on this rank, H hidden size, E experts (global), K slots per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import nn

from moe_dist.balancing.semantics import MICRO_BATCH, LossSemantics, RoutingBatch


class RouterConfig(BaseModel):
    """Fields every router has. A router subclasses this for its own options.

    Unknown keys are errors, so a typo in YAML (``top_kk``) is reported, not ignored.
    """

    model_config = ConfigDict(extra="forbid")

    name: str = "topk_softmax"
    top_k: int = Field(2, ge=1, description="experts per token")


@dataclass
class Routing:
    """One routing decision for T tokens.

    - ``experts_TK`` int64 expert ids in [0, E); ``-1`` marks an unused slot (expert-choice
      routing gives tokens a variable number of experts). Slots of one token are distinct.
    - ``weights_TK`` float32 combine weights (0 in unused slots); gradients flow through them.
    - ``probs_TE`` the scores the balancing losses see (softmax probabilities for softmax
      routers, normalised sigmoid scores for the DeepSeek router, ...).
    - ``logits_TE`` pre-activation scores when the router has them (z-loss needs them).
    - ``losses`` terms the router owns (LPR's KL, diversity, alignment), already multiplied by
      their weights: the layer adds them to the loss as they are and logs each by name.
    - ``expert_input_delta_TH`` when set, the layer feeds the experts (routed and shared)
      ``x_TH + expert_input_delta_TH`` instead of ``x_TH`` (LPR adds its decoded latent there).
    - ``every_slot_used`` a router that never emits ``-1`` says so: a dropless dispatch on one
      EP rank then knows every slot's row goes to a local expert and skips its host
      synchronisation (the token counts stay on the device). False, the safe default, always
      counts on the host.
    """

    experts_TK: torch.Tensor
    weights_TK: torch.Tensor
    probs_TE: torch.Tensor
    logits_TE: torch.Tensor | None = None
    losses: dict[str, torch.Tensor] = field(default_factory=dict)
    expert_input_delta_TH: torch.Tensor | None = None
    every_slot_used: bool = False

    @property
    def num_experts(self) -> int:
        return self.probs_TE.shape[-1]

    def counts_E(self) -> torch.Tensor:
        """Token-slot assignments per expert (float32, no gradient); unused slots are not counted."""
        # Unused slots (-1) land in bin 0 and are cut off; scatter_add, not boolean indexing or
        # bincount, so that counting does not synchronise with a GPU.
        e_flat = self.experts_TK.reshape(-1) + 1
        counts = torch.zeros(self.num_experts + 1, dtype=torch.float32, device=e_flat.device)
        return counts.scatter_add_(0, e_flat, torch.ones_like(e_flat, dtype=torch.float32))[1:]


class Router(nn.Module):
    """Base class of router plugins.

    Subclasses set ``Config`` to their pydantic config class, register with
    ``@ROUTERS.register("name")`` and implement ``forward(x_TH) -> Routing``.

    Declarations (``balancing/semantics.py``; ``tests/balancing/test_invariance.py`` holds every
    registered router to them):

    - ``routing_batch``: ``token`` when a token's experts and weights depend on that token alone,
      ``micro_batch`` (the default, always true) when they depend on the other tokens of the
      rank's micro-batch (expert choice: experts pick tokens);
    - ``term_semantics``: a `LossSemantics` per key of ``Routing.losses`` (router-owned terms such
      as LPR's); a term not listed is ``micro_batch``.
    """

    Config: ClassVar[type[RouterConfig]] = RouterConfig
    registry_name: ClassVar[str] = ""
    routing_batch: ClassVar[RoutingBatch] = "micro_batch"
    term_semantics: ClassVar[dict[str, LossSemantics]] = {}

    def __init__(self, cfg: RouterConfig, hidden_size: int, num_experts: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.hidden_size = hidden_size
        self.num_experts = num_experts
        self.top_k = cfg.top_k

    def forward(self, x_TH: torch.Tensor) -> Routing:  # pragma: no cover - abstract
        raise NotImplementedError

    @property
    def weight_EH(self) -> torch.Tensor | None:
        """The router's linear map ``[E, H]`` when it has one (SimBal regularises it), else None."""
        return None

    @torch.no_grad()
    def after_step(self, global_counts_E: torch.Tensor) -> None:
        """Non-gradient update after an optimizer step.

        ``global_counts_E`` are the token-slot assignments per expert summed over all
        micro-batches of the step and over the whole data x expert parallel group, so every
        rank applies the identical update and replicated router state stays in sync.
        """

    @classmethod
    def semantics_of_term(cls, name: str) -> LossSemantics:
        """The declared semantics of router-owned term ``name`` (``micro_batch`` if undeclared)."""
        return cls.term_semantics.get(name, MICRO_BATCH)

    @classmethod
    def validate_config(cls, cfg: RouterConfig, hidden_size: int, num_experts: int) -> list[str]:
        """Cross-field checks that need the model's sizes; returns messages (empty = fine)."""
        errors = []
        if cfg.top_k > num_experts:
            errors.append(f"top_k: must be <= num_experts ({num_experts}), got {cfg.top_k}")
        return errors
