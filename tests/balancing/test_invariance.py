"""Every registered balancing loss and router-owned term means the same on any batch layout (issue 27).

Shape legend: B_ALL = 8 sequences of S = 4 tokens in the global batch, H = 8 hidden, E = 4
experts, K = 2 (``invariance_harness.py``).

Parametrised over the registries (``moe_dist.registry`` LOSSES x ROUTERS, entry-point plugins
included): every router with every loss it accepts, and every router that owns terms alone.
With a fixed global batch and fixed weights, in float64, each term's value and its gradient on
the router's parameters equal the single-process reference of the term's declared
`LossSemantics` (``balancing/semantics.py``; the table is ``docs/balancing_semantics.md``):

- DP 1, 2, 4; EP 1, 2; DP 2 x EP 2; ``grad_accum`` 1 and 4 at the same global batch (the
  training loop's arithmetic: loss / grad_accum per micro-step, ``GradSync`` over the ranks);
- activation recomputation on and off (``model.activation_checkpointing``): the same terms,
  gradients and statistics (counted once);
- our Gate = DeepSpeed's MoE with our gate (world 1) = Megatron-Core's router with ours (DP 2,
  EP 1: Megatron's layer needs CUDA for EP > 1) on the same inputs;
- each term's gradient reaches the router, non-zero, and equals a float64 finite difference.

Multi-process checks run as one launch per world size (every case and layout in the same
processes), in a fresh interpreter with a test plugin installed through the entry points (its
cases ride in the same launches); world 1 runs in the test process with one intra-op thread.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported here or in workers

import pytest  # noqa: E402
import torch  # noqa: E402
from invariance_harness import B_ALL, Case, Layout, cases, mean_over  # noqa: E402
from invariance_single import (  # noqa: E402
    check_deepspeed,
    check_finite_difference,
    check_recompute,
    check_world1,
)

from moe_dist.balancing.semantics import LossSemantics  # noqa: E402
from moe_dist.registry import LOSSES, ROUTERS  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
with torch.random.fork_rng(devices=[]):  # routers draw their init; leave the session's RNG alone
    CASES = cases()
IDS = [c.name for c in CASES]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """One intra-op thread (tiny tensors: a second one only spins) and the session's RNG state
    untouched by the checks' seeds."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    with torch.random.fork_rng(devices=[]):
        yield
    torch.set_num_threads(n)


def test_every_plugin_declares_semantics_and_the_built_ins_say_what_the_docs_say() -> None:
    for name in LOSSES.names():
        cls = LOSSES.get(name)
        assert isinstance(cls.semantics_for(cls.Config.model_validate({"name": name})), LossSemantics), name
    for name in ROUTERS.names():
        cls = ROUTERS.get(name)
        assert cls.routing_batch in ("token", "micro_batch"), name
        assert all(isinstance(s, LossSemantics) for s in cls.term_semantics.values()), name
    built_in = {"switch": "micro_batch", "global_batch": "global", "seq_aux": "sequence"}
    built_in |= {"z_loss": "token", "simbal": "weights"}
    for name, batch in built_in.items():
        assert LOSSES.get(name).semantics.batch == batch, name
    model_scope = LOSSES.get("switch").Config(scope="model")
    assert LOSSES.get("switch").semantics_for(model_scope).layers == "model"
    lpr = ROUTERS.get("lpr")
    assert {k: v.batch for k, v in lpr.term_semantics.items()} == {
        "lpr_diversity": "micro_batch",
        "lpr_kl": "token",
        "lpr_align": "micro_batch",
    }
    assert lpr.semantics_of_term("lpr_align").stop_gradient
    assert ROUTERS.get("expert_choice").routing_batch == "micro_batch"
    assert Case("expert_choice", "seq_aux").semantics("seq_aux").batch == "micro_batch"
    assert Case("topk_softmax", "seq_aux").semantics("seq_aux").batch == "sequence"
    with pytest.raises(ValueError, match="global statistic"):
        LossSemantics("global").under("micro_batch")
    assert {"topk_softmax+switch", "lpr+own_terms", "expert_choice+z_loss"} <= set(IDS)


def test_the_references_tell_the_semantics_apart() -> None:
    """Not vacuous: where a term's semantics are not invariant, its reference at another layout
    differs from the whole batch's by far more than the tolerance."""
    whole = ((0, B_ALL),)
    dp4, ga4 = Layout(4, 1, 1), Layout(1, 1, 4)
    micro = tuple(dp4.micro_batch(0, r) for r in range(4))
    steps = tuple(ga4.micro_step(m) for m in range(4))
    for case, term, spans in [
        (Case("topk_softmax", "switch"), "switch", micro),
        (Case("topk_softmax", "global_batch"), "global_batch", steps),
        (Case("lpr", None), "lpr_align", micro),
        (Case("lpr", None), "lpr_diversity", micro),
    ]:
        a, b = mean_over(case, term, whole)[0], mean_over(case, term, spans)[0]
        assert abs(a - b) > 1e-3 * max(1.0, abs(a)), (case.name, term, a, b)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_grad_accum_1_and_4_at_the_same_global_batch(case: Case) -> None:
    check_world1(case)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_gradient_reaches_the_router_and_equals_a_finite_difference(case: Case) -> None:
    check_finite_difference(case)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_recomputation_counts_terms_and_statistics_once(case: Case) -> None:
    check_recompute(case)


def test_recomputation_with_a_model_scope_loss() -> None:
    check_recompute(Case("topk_softmax", "switch", (("scope", "model"),)), n_layers=2)


@pytest.mark.parametrize("case", CASES, ids=IDS)
def test_deepspeed_gate_matches_the_native_gate(case: Case) -> None:
    check_deepspeed(case)


PLUGIN_MODULE = '''
"""A router and three losses defined outside moe_dist, each declaring its semantics."""
from typing import ClassVar

import torch
from moe_dist.balancing.base import BalancingLoss, LossConfig, LossSemantics
from moe_dist.routing.base import Router, RouterConfig, Routing


class SigmoidTopK(Router):
    routing_batch = "token"
    term_semantics: ClassVar[dict] = {"weight_decay_test": LossSemantics("weights", uses_routing=False)}

    def __init__(self, cfg: RouterConfig, hidden_size: int, num_experts: int) -> None:
        super().__init__(cfg, hidden_size, num_experts)
        self.weight = torch.nn.Parameter(torch.randn(num_experts, hidden_size) * 0.5)

    def forward(self, x_TH: torch.Tensor) -> Routing:
        logits_TE = x_TH @ self.weight.t().to(x_TH.dtype)
        scores_TE = torch.sigmoid(logits_TE)
        top_TK, experts_TK = scores_TE.topk(self.top_k, dim=-1)
        probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True)
        losses = {"weight_decay_test": 0.1 * self.weight.square().sum()}
        return Routing(experts_TK=experts_TK, weights_TK=top_TK, probs_TE=probs_TE, logits_TE=logits_TE,
                       losses=losses)


class TokenEntropyLoss(BalancingLoss):
    """Mean over tokens of each token's router entropy: a per-token term."""
    semantics = LossSemantics("token", uses_routing=False)

    def __call__(self, routing: Routing, load, router: Router) -> torch.Tensor:
        p = routing.probs_TE
        return -(p * p.clamp_min(1e-30).log()).sum(-1).mean()


class MeanLoadEntropyLoss(BalancingLoss):
    """Negative entropy of the mean load: a micro-batch statistic (the default, not declared)."""

    def __call__(self, routing: Routing, load, router: Router) -> torch.Tensor:
        p_E = routing.probs_TE.mean(0)
        return (p_E * p_E.log()).sum()


class WrongClaimLoss(MeanLoadEntropyLoss):
    """The same micro-batch statistic, wrongly declared per token: the suite must catch it."""
    semantics = LossSemantics("token", uses_routing=False)
'''

PYPROJECT = """
[build-system]
requires = ["setuptools>=61"]
build-backend = "setuptools.build_meta"

[project]
name = "moe-dist-invariance-plugin"
version = "0.0.1"

[project.entry-points."moe_dist.routers"]
sigmoid_topk_test = "moe_dist_invariance_plugin:SigmoidTopK"

[project.entry-points."moe_dist.losses"]
token_entropy_test = "moe_dist_invariance_plugin:TokenEntropyLoss"
mean_load_entropy_test = "moe_dist_invariance_plugin:MeanLoadEntropyLoss"
wrong_claim_test = "moe_dist_invariance_plugin:WrongClaimLoss"

[tool.setuptools]
py-modules = ["moe_dist_invariance_plugin"]
"""

RUN = textwrap.dedent("""
    import json
    from invariance_harness import Case
    from invariance_single import check_world1, run_all
    out = run_all(frozenset({"wrong_claim_test"}))
    try:
        check_world1(Case("topk_softmax", "wrong_claim_test"))
        out["wrong"] = "passed"
    except AssertionError as exc:
        out["wrong"] = str(exc)
    print(json.dumps(out))
""")


@pytest.mark.slow
def test_every_registered_case_on_two_and_four_processes_with_a_plugin_installed(tmp_path: Path) -> None:
    """DP 2, EP 2, DP 2 x grad_accum 4, Megatron-Core's router and recomputation at DP 2 on two
    processes; DP 4 and DP 2 x EP 2 on four: one launch each, every case in it.

    A package installed with pip registers a router and losses through the entry points first,
    so the launches run in a fresh interpreter where the registries hold them: their cases go
    through every check the built-ins do (the single-process ones too), and a loss whose
    declared semantics are false fails."""
    pkg, site = tmp_path / "pkg", tmp_path / "site"
    pkg.mkdir()
    (pkg / "pyproject.toml").write_text(PYPROJECT)
    (pkg / "moe_dist_invariance_plugin.py").write_text(PLUGIN_MODULE)
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index"]
    subprocess.run([*pip, "--target", str(site), str(pkg)], check=True, capture_output=True, timeout=240)
    paths = [site, ROOT, ROOT / "tests" / "helpers", ROOT / "tests" / "balancing"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(map(str, paths)), "DS_ACCELERATOR": "cpu"}
    cmd = [sys.executable, "-W", "ignore", "-c", RUN]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert not out["failures"], "\n\n".join(out["failures"])
    checked = set(out["checked"])
    assert set(IDS) <= checked  # every built-in case of the parametrised tests
    assert {"sigmoid_topk_test+own_terms", "sigmoid_topk_test+switch", "sigmoid_topk_test+seq_aux"} <= checked
    assert {"topk_softmax+token_entropy_test", "lpr+mean_load_entropy_test"} <= checked
    assert not any("wrong_claim_test" in name for name in checked)
    assert "wrong_claim_test (token): value" in out["wrong"], out["wrong"]
