"""Warnings about a valid config: choices that train, but not as the method's paper did.

``config_warnings(cfg)`` returns ``path: message`` lines. ``moe-dist check`` prints them; ``moe-dist
train`` prints them once (rank 0) before the run starts.

- SimBal without an orthogonal router init: the paper's setup (Omi, Sen, Farhadi 2025, arXiv
  2506.14038, App. A.3; summarised in ``balancing/simbal.py``) initialises the router
  orthogonally and trains the orthogonality loss from there; ``model.moe.router.init:
  orthogonal`` does that here. A warning, not an error: starting elsewhere is a valid ablation.
"""

from __future__ import annotations

from moe_dist.config.schema import Config


def config_warnings(cfg: Config) -> list[str]:
    out = []
    moe = cfg.model.moe
    init = getattr(moe.router, "init", None)
    for i, loss in enumerate(moe.losses):
        if loss.name == "simbal" and init != "orthogonal":
            now = f"init is {init}" if init is not None else f"router {moe.router.name} has no init option"
            out.append(
                f"model.moe.losses.{i}: simbal runs without an orthogonal router init ({now}); the SimBal "
                "paper starts from one: set model.moe.router.init=orthogonal"
            )
    return out
