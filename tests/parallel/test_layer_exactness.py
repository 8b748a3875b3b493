"""MoELayer output and gradients at EP = 1, 2, 4 (and DP 2 x EP 2) equal a dense single-process reference.

Shape legend: T tokens, H hidden, F ffn hidden, E experts, K top-k.

The reference below is written independently of the library: softmax router, top-k,
renormalised weights, and for every token and each of its k experts ``weight * expert(x)``,
in float64. Every rank has a different token count; the skewed scenario sends every token to
experts 0 and 1, so most experts, and at EP = 4 three of the four ranks, receive nothing.
"""

from dataclasses import replace

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from rank_processes import run_on_ranks

from moe_dist.config import MoEConfig
from moe_dist.layers.moe_layer import MoELayer
from moe_dist.parallel.groups import ParallelGroups

H, FF, E, K = 8, 12, 8, 2
SWITCH_COEF = 0.1
SCENARIOS = [
    {"name": "random", "skew": False, "activation": "swiglu", "shared": 0},
    {"name": "skewed", "skew": True, "activation": "swiglu", "shared": 0},
    {"name": "gelu+shared", "skew": False, "activation": "gelu", "shared": 2},
]


def tokens_on(rank: int) -> int:
    return 3 + 4 * rank


def make_case(scenario: dict, world: int) -> dict:
    g = torch.Generator().manual_seed(7)
    case = {
        "router_EH": torch.randn(E, H, generator=g) * 0.5,
        "w1": torch.randn(E, H, FF, generator=g) * 0.3,
        "w3": torch.randn(E, H, FF, generator=g) * 0.3,
        "w2": torch.randn(E, FF, H, generator=g) * 0.3,
        "s1": torch.randn(H, 2 * 4, generator=g) * 0.3,
        "s3": torch.randn(H, 2 * 4, generator=g) * 0.3,
        "s2": torch.randn(2 * 4, H, generator=g) * 0.3,
        "x": [torch.randn(tokens_on(r), H, generator=g) for r in range(world)],
        "gy": [torch.randn(tokens_on(r), H, generator=g) for r in range(world)],
    }
    if scenario["skew"]:
        case["router_EH"][:, 0] = 0.0
        case["router_EH"][0, 0], case["router_EH"][1, 0] = 3.0, 2.5
        for x in case["x"]:
            x[:, 0] = 4.0
    return case


def build_layer(scenario: dict, groups: ParallelGroups) -> MoELayer:
    cfg = MoEConfig(
        num_experts=E,
        router={"name": "topk_softmax", "top_k": K},
        losses=[{"name": "switch", "coef": SWITCH_COEF}],
        experts={"ffn_hidden_size": FF, "activation": scenario["activation"]},
        shared_experts={"count": scenario["shared"], "ffn_hidden_size": 4},
    )
    return MoELayer(cfg, H, groups)


def run_layer(layer: MoELayer, case: dict, rank: int) -> dict:
    """Load the case's weights (this rank's expert slice), forward + backward on this rank's tokens."""
    lo = layer.experts.first_expert
    sl = slice(lo, lo + layer.num_local_experts)
    with torch.no_grad():
        layer.gate.router.weight.copy_(case["router_EH"])
        layer.experts.w1_eHF.copy_(case["w1"][sl])
        if layer.experts.w3_eHF is not None:
            layer.experts.w3_eHF.copy_(case["w3"][sl])
        layer.experts.w2_eFH.copy_(case["w2"][sl])
        if layer.shared_experts is not None:
            layer.shared_experts.w13_HG.copy_(torch.cat([case["s1"], case["s3"]], dim=-1))
            layer.shared_experts.w2_FH.copy_(case["s2"])
    x = case["x"][rank].clone().requires_grad_()
    y, aux = layer(x)
    ((y * case["gy"][rank]).sum() + sum(aux.values())).backward()
    return {"y": y.detach(), "x_grad": x.grad, "aux": {k: v.detach() for k, v in aux.items()}}


def _body(rank: int, world: int, ep_size: int) -> dict:
    groups = ParallelGroups.build(ep_size)
    out = {}
    for scenario in SCENARIOS:
        layer = build_layer(scenario, groups)
        res = run_layer(layer, make_case(scenario, world), rank)
        # what the trainer does: dense grads over the world, expert grads over expert-DP
        grads = {"router": layer.gate.router.weight.grad}
        if layer.shared_experts is not None:
            grads.update(s13=layer.shared_experts.w13_HG.grad, s2=layer.shared_experts.w2_FH.grad)
        for v in grads.values():
            dist.all_reduce(v, group=groups.world_group)
        for name, p in layer.experts.named_parameters():
            dist.all_reduce(p.grad, group=groups.expert_dp_group)
            grads[name] = p.grad
        res.update(
            grads=grads,
            first_expert=layer.experts.first_expert,
            received=layer.gate.received_per_local_expert_e.clone(),
        )
        out[scenario["name"]] = res
    return out


def reference(scenario: dict, case: dict, world: int) -> dict:
    """Dense float64 reference: every rank's tokens through every chosen expert, one by one."""
    d = torch.float64
    W = case["router_EH"].to(d).requires_grad_()
    w1, w3, w2 = (case[k].to(d).requires_grad_() for k in ("w1", "w3", "w2"))
    s1, s3, s2 = (case[k].to(d).requires_grad_() for k in ("s1", "s3", "s2"))
    ys, xgrads, auxes = [], [], []
    counts = torch.zeros(E)
    for r in range(world):
        x = case["x"][r].to(d).requires_grad_()
        probs = torch.softmax(x @ W.t(), dim=-1)
        top_p, top_e = probs.topk(K, dim=-1)
        top_w = top_p / top_p.sum(-1, keepdim=True)
        rows = []
        for t in range(x.shape[0]):
            acc = torch.zeros(H, dtype=d)
            for k in range(K):
                e = int(top_e[t, k])
                if scenario["activation"] == "swiglu":
                    h = F.silu(x[t] @ w1[e]) * (x[t] @ w3[e])
                else:
                    h = F.gelu(x[t] @ w1[e])
                acc = acc + top_w[t, k] * (h @ w2[e])
                counts[e] += 1
            if scenario["shared"]:
                acc = acc + (F.silu(x[t] @ s1) * (x[t] @ s3)) @ s2
            rows.append(acc)
        y = torch.stack(rows)
        f = torch.bincount(top_e.reshape(-1), minlength=E).to(d) / (x.shape[0] * K)
        aux = SWITCH_COEF * E * (f * probs.mean(0)).sum()
        ((y * case["gy"][r].to(d)).sum() + aux).backward()
        ys.append(y.detach())
        xgrads.append(x.grad)
        auxes.append(aux.detach())
    # the fused layouts' gradients: [w1 | w3] of the routed experts, [s1 | s3] of the shared ones
    w13_grad = torch.cat([w1.grad, w3.grad], dim=-1) if scenario["activation"] == "swiglu" else w1.grad
    s13_grad = torch.cat([s1.grad, s3.grad], dim=-1) if scenario["shared"] else None
    grads = {"router": W.grad, "w13_eHG": w13_grad, "w2_eFH": w2.grad, "s13": s13_grad, "s2": s2.grad}
    return {"y": ys, "x_grad": xgrads, "aux": auxes, "grads": grads, "counts": counts}


def check(results: list[dict], world: int) -> None:
    tol = {"atol": 2e-5, "rtol": 1e-4}
    for scenario in SCENARIOS:
        case = make_case(scenario, world)
        ref = reference(scenario, case, world)
        for r, res_all in enumerate(results):
            res = res_all[scenario["name"]]
            where = f"{scenario['name']} rank {r}"
            torch.testing.assert_close(res["y"].double(), ref["y"][r], **tol, msg=f"y, {where}")
            torch.testing.assert_close(
                res["x_grad"].double(), ref["x_grad"][r], **tol, msg=f"x grad, {where}"
            )
            torch.testing.assert_close(res["aux"]["switch"].double(), ref["aux"][r], **tol)
            lo = res["first_expert"]
            for name, g in res["grads"].items():
                want = ref["grads"][name]
                if name.endswith(("_eHG", "_eFH")):
                    want = want[lo : lo + g.shape[0]]
                torch.testing.assert_close(g.double(), want, **tol, msg=f"{name} grad, {where}")
        if scenario["skew"]:
            assert ref["counts"][2:].sum() == 0 and ref["grads"]["w13_eHG"][2:].abs().sum() == 0


@pytest.mark.parametrize("grouped_mm", [False, True], ids=["per_expert_loop", "grouped_mm"])
def test_ep1_matches_dense_reference(grouped_mm: bool) -> None:
    """Both expert paths: the per-expert loop (CPU default) and grouped_mm (CUDA default, forced here)."""
    torch.manual_seed(0)
    results = []
    for scenario in SCENARIOS:
        layer = build_layer(scenario, ParallelGroups.single())
        layer.experts.backend = "grouped_mm" if grouped_mm else "loop"
        assert layer.experts.use_grouped_mm(torch.zeros(1, H)) == grouped_mm  # CPU supports it
        res = run_layer(layer, make_case(scenario, 1), 0)
        res["grads"] = {"router": layer.gate.router.weight.grad, **dict(layer.experts.named_parameters())}
        res["grads"] = {
            k: (v.grad if isinstance(v, torch.nn.Parameter) else v) for k, v in res["grads"].items()
        }
        if layer.shared_experts is not None:
            res["grads"].update(s13=layer.shared_experts.w13_HG.grad, s2=layer.shared_experts.w2_FH.grad)
        res["first_expert"] = 0
        results.append((scenario["name"], res))
    check([dict(results)], 1)


def test_ep1_dispatch_without_host_counts_is_the_same(monkeypatch: pytest.MonkeyPatch) -> None:
    """One EP rank, a router that fills every slot: the dispatch keeps the counts on the device
    (no ``tolist``: on a GPU, no synchronisation), and output and gradients equal those of the
    host-counted dispatch bit for bit."""
    scenario = SCENARIOS[0]
    results = {}
    tolist = torch.Tensor.tolist
    host_reads: list[tuple[int, ...]] = []

    def counted_tolist(t: torch.Tensor) -> list:
        host_reads.append(tuple(t.shape))
        return tolist(t)

    for every_slot_used in (True, False):
        torch.manual_seed(0)
        layer = build_layer(scenario, ParallelGroups.single())
        layer.experts.backend = "grouped_mm"  # the GPU path: it reads counts on the device
        router = layer.gate.router
        route = router.forward
        monkeypatch.setattr(
            router, "forward", lambda x, f=every_slot_used, r=route: replace(r(x), every_slot_used=f)
        )
        host_reads.clear()
        monkeypatch.setattr(torch.Tensor, "tolist", counted_tolist)
        res = run_layer(layer, make_case(scenario, 1), 0)
        monkeypatch.setattr(torch.Tensor, "tolist", tolist)
        results[every_slot_used] = (res, [p.grad for p in layer.parameters()], len(host_reads))
    (fast, fast_grads, fast_reads), (slow, slow_grads, slow_reads) = results[True], results[False]
    assert fast_reads == 0 and slow_reads >= 1
    assert torch.equal(fast["y"], slow["y"]) and torch.equal(fast["x_grad"], slow["x_grad"])
    assert all(torch.equal(a, b) for a, b in zip(fast_grads, slow_grads))


@pytest.mark.slow
@pytest.mark.parametrize("world,ep_size", [(2, 2), (4, 4), (4, 2)], ids=["ep2", "ep4", "dp2xep2"])
def test_expert_parallel_matches_dense_reference(world: int, ep_size: int) -> None:
    results = run_on_ranks(_body, world, (ep_size,))
    check(results, world)
    if world == ep_size:  # one EP group: rank r's experts receive every rank's slots for them
        for scenario in SCENARIOS:
            counts = reference(scenario, make_case(scenario, world), world)["counts"]
            for res in (r[scenario["name"]] for r in results):
                lo, e = res["first_expert"], res["received"].shape[0]
                assert res["received"].tolist() == counts[lo : lo + e].tolist()
    skewed = [res["skewed"] for res in results]
    # skewed: only the rank(s) hosting experts 0 and 1 receive rows
    for res in skewed:
        if res["first_expert"] > 1:
            assert res["received"].sum() == 0 and res["grads"]["w13_eHG"].abs().sum() == 0


def test_init_does_not_depend_on_ep_size() -> None:
    """Global expert g gets the same weights whether it lives on a 1-, 2- or 4-way EP rank."""
    from moe_dist.layers.experts import GroupedExperts

    torch.manual_seed(3)
    full = GroupedExperts(E, H, FF, num_experts=E)
    after_full = torch.rand(3)
    for ep in (2, 4):
        e = E // ep
        for ep_rank in range(ep):
            torch.manual_seed(3)
            part = GroupedExperts(e, H, FF, num_experts=E, first_expert=ep_rank * e)
            assert torch.equal(part.w1_eHF, full.w1_eHF[ep_rank * e : (ep_rank + 1) * e])
            assert torch.equal(part.w3_eHF, full.w3_eHF[ep_rank * e : (ep_rank + 1) * e])
            assert torch.equal(part.w2_eFH, full.w2_eFH[ep_rank * e : (ep_rank + 1) * e])
            assert torch.equal(torch.rand(3), after_full)  # later draws unaffected too
    assert all(getattr(p, "expert_parallel", False) for p in full.parameters())
    assert full.w2_eFH.std() < full.w1_eHF.std()
    # the fused [w1 | w3] holds the draws of the earlier split layout: every w1, every w3, w2
    torch.manual_seed(3)
    split = [
        torch.stack([torch.empty(*shape).normal_(0.0, std) for _ in range(E)])
        for shape, std in (((H, FF), 0.02), ((H, FF), 0.02), ((FF, H), 0.02 / 2**0.5))
    ]
    assert torch.equal(full.w13_eHG, torch.cat(split[:2], dim=-1)) and torch.equal(full.w2_eFH, split[2])
