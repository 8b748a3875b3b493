"""The balancing-loss contract: `Load` (what a loss may know about token counts) and `BalancingLoss`.

Shape legend: T tokens on this rank, E experts (global), K slots per token.

Every loss declares its `LossSemantics` (``balancing/semantics.py``): the batch it is computed
over and so what the training loop optimises under data parallelism, expert parallelism and
gradient accumulation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from moe_dist.balancing.semantics import MICRO_BATCH, LossSemantics
from moe_dist.routing.base import Router, Routing

__all__ = ["BalancingLoss", "CountNormalizedLossConfig", "Load", "LossConfig", "LossSemantics"]


class LossConfig(BaseModel):
    """Fields every balancing loss has; a loss subclasses this for its own options."""

    model_config = ConfigDict(extra="forbid")

    name: str
    coef: float = Field(0.01, ge=0.0, description="multiplier of this term in the total loss")


class CountNormalizedLossConfig(LossConfig):
    """A loss whose load fractions f_i are token-slot counts over a normaliser:

    - ``slots``: counts / (K * T), so f sums to 1 and the loss is 1 at uniform routing (Switch's
      k = 1 formula for any k; DeepSeek's f_i carries E / (K T));
    - ``tokens``: counts / T, so f sums to K and the loss is K at uniform routing (Hugging Face's
      ``load_balancing_loss_func``, OLMoE, SimBal's and st-moe's code): K times ``slots``.

    The boolean ``normalize_by_topk`` of earlier configs is read as ``slots`` (true) / ``tokens``.
    """

    normalize: Literal["slots", "tokens"] = Field(
        "slots", description="f_i = counts / (K*T) (slots, min 1) or counts / T (tokens, min K)"
    )

    @model_validator(mode="before")
    @classmethod
    def _legacy_flag(cls, data: Any) -> Any:
        if isinstance(data, dict) and "normalize_by_topk" in data:
            data = dict(data)
            flag = data.pop("normalize_by_topk")
            data.setdefault("normalize", "slots" if flag else "tokens")
        return data

    def slots_per_token(self, top_k: int) -> int:
        """The factor of T in the normaliser: K for ``slots``, 1 for ``tokens``."""
        return top_k if self.normalize == "slots" else 1


@dataclass
class Load:
    """Token counts a loss may use. Counts carry no gradient.

    - ``counts_E``: token-slot assignments per expert of this rank's micro-batch (before any
      capacity drop), float32.
    - ``global_counts_E``: the same summed over the data x expert parallel group for this
      micro-batch; filled only when some configured loss has ``needs_global_counts``.
    - ``num_tokens``: T on this rank; ``global_num_tokens``: T summed over the group (the layer
      fills it with a 0-dim tensor on the device, so that no loss reads it on the host; an int
      is accepted too).
    - ``batch_size``, ``seq_len``: the micro-batch shape (B, S) with T = B * S; sequence-wise
      losses need it.
    """

    counts_E: torch.Tensor
    num_tokens: int
    batch_size: int
    seq_len: int
    global_counts_E: torch.Tensor | None = None
    global_num_tokens: int | torch.Tensor | None = None


class BalancingLoss:
    """Base class of balancing-loss plugins.

    Subclasses set ``Config``, register with ``@LOSSES.register("name")`` and implement
    ``__call__(routing, load, router) -> scalar Tensor`` (the unweighted term; the layer
    multiplies by ``cfg.coef`` and logs it as ``name``).

    ``semantics`` declares what batch the loss is computed over (`LossSemantics`). The default,
    ``micro_batch``, is true of any loss computed from this rank's micro-batch; a loss that reads
    ``load.global_counts_E`` declares ``global``, and finer claims (``token``, ``sequence``,
    ``weights``) are declared where they hold. ``tests/balancing/test_invariance.py`` holds every
    registered loss, third-party ones included, to its declaration.
    """

    Config: ClassVar[type[LossConfig]] = LossConfig
    registry_name: ClassVar[str] = ""
    needs_global_counts: ClassVar[bool] = False
    semantics: ClassVar[LossSemantics] = MICRO_BATCH

    def __init__(self, cfg: LossConfig, num_experts: int, top_k: int) -> None:
        self.cfg = cfg
        self.num_experts = num_experts
        self.top_k = top_k

    def __call__(self, routing: Routing, load: Load, router: Router) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    @property
    def model_scope(self) -> bool:
        """One loss over every layer's routing (``part`` per layer, ``combine`` once per forward,
        the model calls it) instead of a loss per layer; only ``switch`` offers it."""
        return False

    @classmethod
    def semantics_for(cls, cfg: LossConfig) -> LossSemantics:
        """The semantics under ``cfg`` (``switch`` with ``scope: model`` spans the layers)."""
        return cls.semantics

    @classmethod
    def validate_config(cls, cfg: LossConfig, router_cls: type[Router], num_experts: int) -> list[str]:
        """Cross-field checks (e.g. SimBal needs a router with a weight matrix); messages or []."""
        return []
