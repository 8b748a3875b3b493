"""A third-party package, really installed, adds a router and a loss through entry points.

The test writes a throwaway package with a pyproject declaring entry points in the groups
``moe_dist.routers`` and ``moe_dist.losses``, installs it with pip into a temporary target
directory, and in a fresh interpreter (that directory on its path) builds a full MoELayer that
names both plugins, runs forward and backward, and checks the values.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from pydantic import ValidationError

from moe_dist.config import MoEConfig, format_pydantic_errors

ROOT = Path(__file__).resolve().parents[2]

PLUGIN_MODULE = '''
"""A sigmoid top-k router and an entropy loss, defined outside moe_dist."""
import torch
from pydantic import Field
from moe_dist.balancing.base import BalancingLoss, LossConfig
from moe_dist.routing.base import Router, RouterConfig, Routing


class SigmoidConfig(RouterConfig):
    scale: float = Field(1.0, gt=0)


class SigmoidTopK(Router):
    Config = SigmoidConfig

    def __init__(self, cfg, hidden_size, num_experts):
        super().__init__(cfg, hidden_size, num_experts)
        self.weight = torch.nn.Parameter(torch.randn(num_experts, hidden_size) * 0.5)

    def forward(self, x_TH):
        scores_TE = torch.sigmoid(self.cfg.scale * x_TH.float() @ self.weight.t())
        top_TK, experts_TK = scores_TE.topk(self.top_k, dim=-1)
        probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True)
        return Routing(experts_TK=experts_TK, weights_TK=top_TK, probs_TE=probs_TE)


class EntropyLoss(BalancingLoss):
    Config = LossConfig

    def __call__(self, routing, load, router):
        p_E = routing.probs_TE.mean(0)
        return (p_E * p_E.log()).sum()  # negative entropy of the mean load: low when balanced
'''

PYPROJECT = """
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "moe-dist-test-plugin"
version = "0.0.1"

[project.entry-points."moe_dist.routers"]
sigmoid_topk_test = "moe_dist_test_plugin:SigmoidTopK"

[project.entry-points."moe_dist.losses"]
neg_entropy_test = "moe_dist_test_plugin:EntropyLoss"

[tool.setuptools]
py-modules = ["moe_dist_test_plugin"]
"""

USE_IT = textwrap.dedent("""
    import json, torch
    from pydantic import ValidationError
    from moe_dist.config import MoEConfig
    from moe_dist.layers.moe_layer import MoELayer
    from moe_dist.registry import LOSSES, ROUTERS
    torch.manual_seed(0)
    cfg = MoEConfig(num_experts=4, router={"name": "sigmoid_topk_test", "top_k": 2, "scale": 2.0},
                    losses=[{"name": "neg_entropy_test", "coef": 0.5}, {"name": "switch", "coef": 0.01}],
                    experts={"ffn_hidden_size": 8})
    layer = MoELayer(cfg, 8)
    x = torch.randn(10, 8, requires_grad=True)
    y, aux = layer(x)
    (y.square().sum() + sum(aux.values())).backward()
    scores = torch.sigmoid(2.0 * x.detach() @ layer.gate.router.weight.detach().t())
    p = (scores / scores.sum(-1, keepdim=True)).mean(0)
    try:
        MoEConfig(router={"name": "no_such_router"})
        unknown = ""
    except ValidationError as exc:
        unknown = str(exc)
    print(json.dumps({
        "router_cls": type(layer.gate.router).__module__ + "." + type(layer.gate.router).__name__,
        "aux": {k: float(v) for k, v in aux.items()},
        "want_entropy_term": 0.5 * float((p * p.log()).sum()),
        "router_grad_norm": float(layer.gate.router.weight.grad.norm()),
        "routers": ROUTERS.names(), "losses": LOSSES.names(), "unknown": unknown,
    }))
""")


@pytest.mark.slow
def test_entry_point_plugin_used_by_name_through_moe_layer(tmp_path: Path) -> None:
    pkg = tmp_path / "pkg"
    pkg.mkdir()
    (pkg / "pyproject.toml").write_text(PYPROJECT)
    (pkg / "moe_dist_test_plugin.py").write_text(PLUGIN_MODULE)
    site = tmp_path / "site"
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "--no-index",
            "--target",
            str(site),
            str(pkg),
        ],
        check=True,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert list(site.glob("moe_dist_test_plugin-*.dist-info/entry_points.txt"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)])}
    proc = subprocess.run(
        [sys.executable, "-c", USE_IT], env=env, capture_output=True, text=True, timeout=240, cwd=tmp_path
    )
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["router_cls"] == "moe_dist_test_plugin.SigmoidTopK"
    assert set(out["aux"]) == {"neg_entropy_test", "switch"}
    assert out["aux"]["neg_entropy_test"] == pytest.approx(out["want_entropy_term"], rel=1e-5)
    assert out["router_grad_norm"] > 0
    assert "sigmoid_topk_test" in out["routers"] and "topk_softmax" in out["routers"]
    assert "neg_entropy_test" in out["losses"] and "switch" in out["losses"]
    assert "no_such_router" in out["unknown"] and "sigmoid_topk_test" in out["unknown"]


def test_unknown_names_list_the_known_ones() -> None:
    """Any MoEConfig resolves its plugins when it is built, so the name is checked right there."""
    with pytest.raises(ValidationError) as exc:
        MoEConfig(router={"name": "no_such_router"})
    [line] = format_pydantic_errors(exc.value, "moe")
    assert line.startswith("moe.router.name: unknown router 'no_such_router'; known:")
    assert "topk_softmax" in line
    with pytest.raises(ValidationError) as exc:
        MoEConfig(losses=[{"name": "no_such_loss", "coef": 0.1}])
    [line] = format_pydantic_errors(exc.value, "moe")
    assert line.startswith("moe.losses.0.name: unknown balancing loss 'no_such_loss'; known:")
    assert "switch" in line
