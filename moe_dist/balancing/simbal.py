"""SimBal orthogonality loss (Omi, Sen, Farhadi 2025, arXiv 2506.14038, Eq. 4 and App. A.3).

Shape legend: E experts, H hidden size.

L_orth = || R R^T - I_E ||_1 on the router's raw weight R = ``router.weight_EH`` ([E, H], the
``nn.Linear(H, E).weight`` of the paper's code), computed as the paper's reference code does::

    loss = torch.norm(w @ w.T - torch.eye(E), p=1)   # the flattened 1-norm: sum of |entries|

Penalty (option ``penalty``, issue 25):

- ``l1`` (default): the paper's Eq. 4 above, ``sum |R R^T - I|``. Its subgradient
  ``sign(R R^T - I)`` never vanishes: at orthonormality float noise decides the signs, so the
  gradient norm stays ~coef * 2 * E per layer however close R is to orthonormal.
- ``squared``: ``||R R^T - I||_F^2 = sum (R R^T - I)^2``, gradient ``4 (R R^T - I) R``, which
  vanishes at orthonormality. The same target (orthonormal router rows) with a smooth penalty;
  it is the deviation the paper reports (Table 3's ``(R^T R - I)^2``, there as a mean over the
  entries, i.e. ``reduction: mean``), not the loss the paper trains with. Not the paper's.

Normalisation: none. ``reduction: sum`` (default) is the entrywise L1 SUM over the E x E matrix,
exactly the paper's; the rows are NOT normalised, so the loss pulls every router row to unit L2
norm as well as to mutual orthogonality (that is what keeps the router a similarity-preserving
near-isometry). ``reduction: mean`` divides by E^2, for comparing coefficients across E; it is not
the paper's. The paper uses coefficient 0.1 (1.0 and 0.01 give the same perplexity), one term per
MoE layer, orthogonal router init and softmax top-k routing, plus a z-loss of 1e-5.

Needs a router with a weight matrix (``weight_EH``); LPR has none (it routes by cosine to latent
prototypes), so the pair is rejected at config time. With H < E the rows cannot be orthonormal
(min of the loss > 0); the loss warns once at its first call because the config checks do not see H.

The loss depends only on the weights, not on the tokens: every rank computes the same value on
its replica of the router, and data-parallel averaging keeps the gradient unchanged.
Semantics (``semantics``, ``balancing/semantics.py``): ``weights``, the same objective at any layout.
"""

from __future__ import annotations

import warnings
from typing import Literal

import torch
from pydantic import Field

from moe_dist.balancing.base import BalancingLoss, Load, LossConfig
from moe_dist.balancing.semantics import LossSemantics
from moe_dist.registry import LOSSES
from moe_dist.routing.base import Router, Routing


class SimBalLossConfig(LossConfig):
    name: Literal["simbal"] = "simbal"
    coef: float = Field(0.1, ge=0.0, description="multiplier of this term (paper: 0.1)")
    reduction: Literal["sum", "mean"] = Field("sum", description="sum of |R R^T - I| (paper) or its mean")
    penalty: Literal["l1", "squared"] = Field(
        "l1", description="entrywise |.| (paper's Eq. 4) or squared (smooth; Table 3's deviation)"
    )


def simbal_loss(weight_EH: torch.Tensor, reduction: str = "sum", penalty: str = "l1") -> torch.Tensor:
    """``sum |R R^T - I|`` (``penalty: squared``: ``sum (R R^T - I)^2``), or the mean over the entries."""
    w_EH = weight_EH.to(torch.promote_types(weight_EH.dtype, torch.float32))
    E = w_EH.shape[0]
    dev_EE = w_EH @ w_EH.t() - torch.eye(E, dtype=w_EH.dtype, device=w_EH.device)
    total = dev_EE.square().sum() if penalty == "squared" else dev_EE.abs().sum()
    return total / (E * E) if reduction == "mean" else total


def router_has_weight(router_cls: type[Router]) -> bool:
    """True when the router class overrides ``weight_EH`` (the base returns None)."""
    return router_cls.weight_EH is not Router.weight_EH


@LOSSES.register("simbal")
class SimBalLoss(BalancingLoss):
    Config = SimBalLossConfig
    semantics = LossSemantics("weights", uses_routing=False)

    def __init__(self, cfg: SimBalLossConfig, num_experts: int, top_k: int) -> None:
        super().__init__(cfg, num_experts, top_k)
        self.cfg: SimBalLossConfig = cfg
        self._warned_shape = False

    def __call__(self, routing: Routing, load: Load, router: Router) -> torch.Tensor:
        weight_EH = router.weight_EH
        if weight_EH is None:
            name = type(router).registry_name
            raise ValueError(f"simbal loss: router {name!r} has no weight_EH to regularise")
        E, H = weight_EH.shape
        if H < E and not self._warned_shape:
            self._warned_shape = True
            warnings.warn(
                f"simbal loss: hidden size {H} < num_experts {E}: the router rows cannot be orthonormal, "
                f"the loss cannot reach 0 (R R^T has rank <= {H})",
                stacklevel=2,
            )
        return simbal_loss(weight_EH, self.cfg.reduction, self.cfg.penalty)

    @classmethod
    def validate_config(cls, cfg: LossConfig, router_cls: type[Router], num_experts: int) -> list[str]:
        if not router_has_weight(router_cls):
            return [
                f"name: simbal regularises the router's linear weight [E, H], and router "
                f"{router_cls.registry_name!r} has none (weight_EH is None); use a linear router such as "
                f"topk_softmax or topk_sigmoid_bias"
            ]
        return []
