"""moe_dist routers and losses inside DeepSpeed MoE (CPU accelerator, gloo), against the native MoELayer.

Shape legend: B batch, S sequence, T tokens, H hidden, E experts, K slots, C capacity.
The first multi-process launch JIT-builds DeepSpeed's shm op (~30-40 s, cached afterwards).
"""

from __future__ import annotations

import os
from pathlib import Path

os.environ.setdefault("DS_ACCELERATOR", "cpu")  # before deepspeed is imported here or in workers

import pytest  # noqa: E402
import torch  # noqa: E402
from integration_helpers import H, moe_config, valid_losses  # noqa: E402
from rank_processes import run_on_ranks  # noqa: E402

from moe_dist.config import MoEConfig  # noqa: E402
from moe_dist.integrations.deepspeed_moe import (  # noqa: E402
    build_deepspeed_moe,
    copy_from_native,
    deepspeed_capacity,
    slot_locations,
)
from moe_dist.layers.moe_layer import MoELayer  # noqa: E402
from moe_dist.registry import ROUTERS  # noqa: E402


def native_and_deepspeed(cfg: MoEConfig, groups=None, ep_size: int = 1, **kw):  # noqa: ANN001, ANN201
    torch.manual_seed(0)
    native = MoELayer(cfg, H, groups)
    moe = build_deepspeed_moe(cfg, H, ep_size=ep_size, **kw)
    if ep_size > 1:
        moe.set_deepspeed_parallelism()
    copy_from_native(moe, native)
    return native, moe


def run_both(native: MoELayer, moe, x: torch.Tensor, seed: int = 7):  # noqa: ANN001, ANN201
    """Forward + backward of both on the same input and the same RNG state (LPR samples)."""
    xs = [x.clone().requires_grad_(True) for _ in range(2)]
    torch.manual_seed(seed)
    y, aux = native(xs[0])
    (y.square().sum() + sum(aux.values())).backward()
    torch.manual_seed(seed)
    out, l_aux, counts = moe(xs[1])
    (out.square().sum() + l_aux).backward()
    return (y, aux, xs[0].grad), (out, l_aux, moe.aux_terms, counts, xs[1].grad)


@pytest.mark.parametrize("router_name", ["topk_softmax", "topk_sigmoid_bias", "lpr", "expert_choice"])
def test_every_router_and_loss_matches_native(router_name: str) -> None:
    assert router_name in ROUTERS.names()
    losses = valid_losses(router_name)
    assert losses, f"no registered loss accepts router {router_name}"
    cfg = moe_config({"name": router_name, "top_k": 2}, losses)
    native, moe = native_and_deepspeed(cfg)
    x = torch.randn(2, 6, H)
    (y, aux, gx), (out, l_aux, terms, counts, gx2) = run_both(native, moe, x)
    torch.testing.assert_close(out, y, rtol=1e-5, atol=1e-6)
    assert set(terms) == set(aux) and len(aux) >= len(losses)
    for name in aux:
        torch.testing.assert_close(terms[name], aux[name], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(l_aux, sum(aux.values()), rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(gx2, gx, rtol=1e-4, atol=1e-6)
    g_native, g_ds = native.gate.router.state_dict(), moe.deepspeed_moe.gate.gate.router.state_dict()
    assert g_native.keys() == g_ds.keys()
    torch.testing.assert_close(
        counts.float(), native.gate.tokens_per_expert_E
    )  # exp_counts = slots before drops
    torch.testing.assert_close(
        moe.deepspeed_moe.gate.gate.tokens_per_expert_E, native.gate.tokens_per_expert_E
    )


def test_dense_and_sparse_gate_returns_agree_and_drop_like_native() -> None:
    """<= 0.19.3 calls the gate for [S,E,C] tensors, >= 0.19.4 for [K,S] routes: same decision."""
    from deepspeed.moe.sharded_moe import _capacity

    cfg = moe_config(
        {"name": "topk_softmax", "top_k": 2}, [{"name": "switch", "coef": 0.01}], capacity_factor=1.0
    )
    native, moe = native_and_deepspeed(cfg, min_capacity=0)
    gate = moe.deepspeed_moe.gate
    x_TH = torch.randn(20, H)
    torch.manual_seed(1)
    l_aux, combine_SEC, dispatch_SEC, counts_E = gate(x_TH)
    l2, C, E, idx_KT, loc_KT, gates_KT, counts2 = gate(x_TH, None, True)
    # capacity as TopKGate computes it: ceil(T / E * cf * K)
    gates_TE = torch.zeros(20, 4)
    assert (
        C
        == combine_SEC.shape[2]
        == deepspeed_capacity(20, 4, 2, 1.0, 0)
        == int(_capacity(gates_TE, torch.tensor(2.0), torch.tensor(0)))
    )
    assert E == 4 and torch.equal(counts_E, counts2) and torch.equal(l_aux, l2)
    rebuilt = torch.zeros_like(combine_SEC)
    for k in range(idx_KT.shape[0]):
        for t in range(20):
            if idx_KT[k, t] >= 0:
                rebuilt[t, idx_KT[k, t], loc_KT[k, t]] += gates_KT[k, t]
    torch.testing.assert_close(rebuilt, combine_SEC)
    assert torch.equal(dispatch_SEC, combine_SEC > 0)
    assert int(dispatch_SEC.sum(dim=(0, 2)).max()) <= C and int((idx_KT < 0).sum()) > 0  # something dropped
    # the <= 0.19.3 dense dispatch/combine gives what 0.19.8's sparse one gives
    experts = moe.deepspeed_moe.experts
    expert_in_ECH = torch.einsum("sec,sm->ecm", dispatch_SEC.float(), x_TH)
    expert_out = experts(expert_in_ECH.reshape(1, 4, C, H)).reshape(4, C, H)
    dense_y = torch.einsum("sec,ecm->sm", combine_SEC, expert_out)
    torch.manual_seed(1)
    sparse_y, _, _ = moe(x_TH)
    torch.testing.assert_close(sparse_y, dense_y, rtol=1e-5, atol=1e-6)
    # same drop policy as the native dispatcher (capacity ceil(cf * T * K / E) = 10 here too)
    torch.manual_seed(1)
    y_native, _ = native(x_TH)
    torch.testing.assert_close(sparse_y, y_native, rtol=1e-5, atol=1e-6)
    assert float(gate.gate.dropped_tokens) / 3 == float(native.gate.dropped_tokens) > 0  # three gate calls


def test_slot_locations_worked_example() -> None:
    kept, loc, counts = slot_locations(torch.tensor([0, 1, 0, -1]), torch.tensor([0.2, 0.9, 0.7, 0.0]), 2, 1)
    assert kept.tolist() == [False, True, True, False]
    assert loc[kept].tolist() == [0, 0] and counts.tolist() == [1, 1]
    kept, loc, counts = slot_locations(
        torch.tensor([1, 0, 1, 1]), torch.tensor([0.1, 0.5, 0.3, 0.2]), 2, None
    )
    assert kept.all() and loc.tolist() == [0, 0, 1, 2] and counts.tolist() == [1, 3]


def test_lpr_delta_needs_the_moe_wrapper() -> None:
    cfg = moe_config({"name": "lpr", "top_k": 2}, [])
    _, moe = native_and_deepspeed(cfg)
    with pytest.raises(RuntimeError, match="changes the experts' input"):
        moe.deepspeed_moe(torch.randn(6, H), None)


def _ep2_body(rank: int, world_size: int, router: dict, losses: list[dict]) -> dict:
    import deepspeed

    from moe_dist.parallel.groups import ParallelGroups

    deepspeed.init_distributed(dist_backend="gloo")
    groups = ParallelGroups.build(2)
    cfg = moe_config(router, losses)
    native, moe = native_and_deepspeed(cfg, groups, ep_size=2)
    torch.manual_seed(100 + rank)
    x = torch.randn(2, 5, H)
    (y, aux, gx), (out, l_aux, terms, counts, gx2) = run_both(native, moe, x)
    gate = moe.deepspeed_moe.gate
    # the step hook: the adapter's statistics and router update equal the native layer's
    from moe_dist.training.step_hook import finish_step

    want, got = finish_step([native], groups), finish_step([gate], groups)
    step = {
        "counts": float((want.counts_E[0] - got.counts_E[0]).abs().max()),
        "received": float((want.received_E[0] - got.received_E[0]).abs().max()),
        "local_received": (float(want.local_received[0]), float(got.local_received[0])),
        "dropped": (float(want.dropped[0]), float(got.dropped[0])),
        "bias": float((native.gate.router.expert_bias_E - gate.gate.router.expert_bias_E).abs().max()),
        "bias_moved": float(gate.gate.router.expert_bias_E.abs().sum()),
        "reset": float(gate.gate.tokens_per_expert_E.abs().sum()),
    }
    torch.manual_seed(3)
    _, C, _, idx_KT, _, gates_KT, _ = gate(x.reshape(-1, H), None, True)
    max_count = torch.bincount(idx_KT.reshape(-1).long(), minlength=4).max().reshape(1)
    torch.distributed.all_reduce(max_count, op=torch.distributed.ReduceOp.MAX)
    return {
        "dy": float((out - y).abs().max()),
        "dgx": float((gx2 - gx).abs().max()),
        "aux": {k: float(v) for k, v in aux.items()},
        "terms": {k: float(v) for k, v in terms.items()},
        "l_aux": float(l_aux),
        "C": int(C),
        "max_count": int(max_count),
        "dropped": int((idx_KT < 0).sum()),
        "w_native": native.gate.router(x.reshape(-1, H)).weights_TK.detach(),
        "w_gate": gates_KT.t().detach(),
        "ep_group_size": torch.distributed.get_world_size(gate.ep_group),
        "step": step,
    }


@pytest.mark.slow
def test_ep2_two_processes_match_native() -> None:
    losses = [
        {"name": "switch", "coef": 0.01},
        {"name": "global_batch", "coef": 0.01},
        {"name": "z_loss", "coef": 0.001},
    ]
    results = run_on_ranks(_ep2_body, 2, ({"name": "topk_sigmoid_bias", "top_k": 2}, losses))
    for r in results:
        assert r["ep_group_size"] == 2
        assert r["dy"] < 1e-5 and r["dgx"] < 1e-5
        assert r["terms"].keys() == r["aux"].keys() == {"switch", "global_batch", "z_loss"}
        for k in r["aux"]:
            assert abs(r["terms"][k] - r["aux"][k]) < 1e-7
        assert abs(r["l_aux"] - sum(r["aux"].values())) < 1e-6
        # dropless: capacity = the largest per-expert count over the EP group, nothing dropped
        assert r["C"] == r["max_count"] and r["dropped"] == 0
        torch.testing.assert_close(r["w_gate"], r["w_native"])
        st = r["step"]
        assert st["counts"] == 0 and st["received"] == 0 and st["reset"] == 0
        assert st["local_received"][0] == st["local_received"][1] > 0 and st["dropped"] == (0.0, 0.0)
        assert st["bias"] == 0 and st["bias_moved"] > 0  # the aux-loss-free bias moved identically


def _engine_body(rank: int, world_size: int) -> dict:
    from moe_dist.config import config_from_dict
    from moe_dist.integrations.deepspeed_engine import DeepSpeedEngine
    from moe_dist.training.run import train

    cfg = config_from_dict(
        {
            "run": {"name": "ds", "out_dir": os.environ["MOE_DIST_TEST_OUT"], "device": "cpu", "seed": 3},
            "model": {
                "vocab_size": 256,
                "dim": 32,
                "n_layers": 2,
                "n_heads": 2,
                "max_seq_len": 32,
                "moe": {
                    "num_experts": 4,
                    "router": {"name": "topk_softmax", "top_k": 2},
                    "losses": [{"name": "switch", "coef": 0.01}],
                    "experts": {"ffn_hidden_size": 32},
                },
            },
            "parallel": {"ep_size": 2, "engine": "deepspeed", "zero_stage": 1},
            "optim": {"lr": 1e-2},
            "schedule": {"steps": 12, "warmup_steps": 2},
            "data": {"seq_len": 32, "micro_batch_size": 4, "grad_accum": 2, "max_bytes": 200_000},
            "eval": {"every": 0, "batches": 2},
        }
    )
    result = train(cfg, DeepSpeedEngine)
    records = []
    if rank == 0:
        import json

        lines = (result.run_dir / "metrics.jsonl").read_text().splitlines()
        records = [json.loads(line) for line in lines]
        assert json.loads((result.run_dir / "summary.json").read_text())["engine"] == "deepspeed"
    return {
        "losses": result.losses,
        "counts": result.counts_per_layer,
        "val": result.final_val_loss,
        "records": records,
    }


@pytest.mark.slow
def test_engine_training_lowers_the_loss(tmp_path) -> None:  # noqa: ANN001
    os.environ["MOE_DIST_TEST_OUT"] = str(tmp_path)
    results = run_on_ranks(_engine_body, 2)
    losses = results[0]["losses"]
    assert results[0]["losses"] == results[1]["losses"]  # group means
    first, last = sum(losses[s] for s in (1, 2)) / 2, sum(losses[s] for s in (11, 12)) / 2
    assert last < first - 0.3, losses
    # whole-run counts per layer: 12 steps x 2 ranks x 2 micro-batches x 4 x 32 tokens x top-2
    assert (
        len(results[0]["counts"]) == 2 and abs(sum(results[0]["counts"][0]) - 12 * 2 * 2 * 4 * 32 * 2) < 1e-3
    )
    records = results[0]["records"]
    assert [r["step"] for r in records] == list(range(1, 13))
    assert set(records[0]["aux"]) == {"switch"} and len(records[0]["layers"]) == 2
    assert sum(records[0]["layers"][0]["counts"]) == 2 * 2 * 4 * 32 * 2 and records[-1]["val_loss"] > 0


def test_sequence_first_input_gives_the_batch_first_result() -> None:
    """Megatron-DeepSpeed feeds [S, B, H]: sequence-wise losses must still see whole sequences."""
    cfg = moe_config({"name": "topk_softmax", "top_k": 2}, [{"name": "seq_aux", "coef": 0.1}])
    native, moe = native_and_deepspeed(cfg, sequence_first=True)
    x_BSH = torch.randn(3, 5, H)
    y_BSH, aux = native(x_BSH)
    out_SBH, l_aux, _ = moe(x_BSH.transpose(0, 1).contiguous())
    torch.testing.assert_close(out_SBH.transpose(0, 1), y_BSH, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(l_aux, aux["seq_aux"])
    # the same tokens read batch-first as if sequence-first give another seq_aux value
    batch_first = build_deepspeed_moe(cfg, H)
    copy_from_native(batch_first, native)
    _, other, _ = batch_first(x_BSH.transpose(0, 1).contiguous())
    assert abs(float(other) - float(aux["seq_aux"])) > 1e-6


def test_used_token_mask_keeps_masked_tokens_out() -> None:
    cfg = moe_config({"name": "topk_softmax", "top_k": 2}, [{"name": "switch", "coef": 0.01}])
    _, moe = native_and_deepspeed(cfg)
    gate = moe.deepspeed_moe.gate
    used_T = torch.tensor([1.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    _, C, _, idx_KT, _, gates_KT, counts_E = gate(torch.randn(6, H), used_T, True)
    assert (idx_KT[:, used_T == 0] == -1).all() and (gates_KT[:, used_T == 0] == 0).all()
    assert (idx_KT[:, used_T == 1] >= 0).all() and int(counts_E.sum()) == 4 * 2 and C == int(counts_E.max())


def _engine_resume_body(
    rank: int, world_size: int, out: str, stop_after: int | None, resume: str | None
) -> dict:
    """8 steps, a checkpoint every 4, through the engine; DeepSeek router (its ``expert_bias_E``
    buffer) and a shared expert: both carry "expert" in their state-dict keys."""
    import json

    from moe_dist.config import config_from_dict
    from moe_dist.integrations.deepspeed_engine import DeepSpeedEngine
    from moe_dist.training.run import train

    cfg = config_from_dict(
        {
            "run": {"name": "dsr", "out_dir": out, "device": "cpu", "seed": 5},
            "model": {
                "dim": 32,
                "n_layers": 2,
                "n_heads": 2,
                "max_seq_len": 32,
                "moe": {
                    "num_experts": 4,
                    "router": {"name": "topk_sigmoid_bias", "top_k": 2},
                    "losses": [{"name": "seq_aux", "coef": 0.01}],
                    "experts": {"ffn_hidden_size": 32},
                    "shared_experts": {"count": 1, "ffn_hidden_size": 32},
                },
            },
            "parallel": {"ep_size": 2, "engine": "deepspeed", "zero_stage": 1},
            "optim": {"lr": 1e-2},
            "schedule": {"steps": 8, "warmup_steps": 2},
            "data": {"seq_len": 32, "micro_batch_size": 4, "grad_accum": 1, "max_bytes": 200_000},
            "eval": {"every": 0, "batches": 2},
            "checkpoint": {"every": 4, "keep": 2},
        }
    )
    result = train(cfg, DeepSpeedEngine, resume=resume, stop_after=stop_after)
    steps_logged = []
    if rank == 0:
        lines = (result.run_dir / "metrics.jsonl").read_text().splitlines()
        steps_logged = [json.loads(line)["step"] for line in lines]
    return {"losses": result.losses, "start": result.start_step, "logged": steps_logged}


@pytest.mark.slow
def test_engine_checkpoint_kill_and_resume_equals_uninterrupted(tmp_path) -> None:  # noqa: ANN001
    full = run_on_ranks(_engine_resume_body, 2, (str(tmp_path / "full"), None, None))
    # the job dies after step 6: the checkpoint of step 4 is the newest
    run_on_ranks(_engine_resume_body, 2, (str(tmp_path / "killed"), 6, None))
    assert (tmp_path / "killed/dsr/checkpoints/latest").read_text().strip() == "step_000004"
    resumed = run_on_ranks(_engine_resume_body, 2, (str(tmp_path / "killed"), None, ""))
    assert resumed[0]["start"] == 4
    assert {s: resumed[0]["losses"][s] for s in range(5, 9)} == {s: full[0]["losses"][s] for s in range(5, 9)}
    assert resumed[0]["logged"] == list(range(1, 9))  # the dead run's steps 5-6 are not logged twice
    kept = sorted(p.name for p in (tmp_path / "killed/dsr/checkpoints").glob("step_*"))
    assert kept == ["step_000004", "step_000008"]


def test_gate_called_flat_refuses_a_per_sequence_loss() -> None:
    """DeepSpeed's own MOELayer hands the gate [T, H] without the batch shape: a per-sequence loss
    (seq_aux) would treat the micro-batch as one sequence, so the gate refuses; with the shape
    (``route``, as ``build_deepspeed_moe`` does) it runs."""
    from moe_dist.integrations.deepspeed_moe import MoeDistGate

    cfg = moe_config({"name": "topk_softmax", "top_k": 2}, [{"name": "seq_aux", "coef": 0.01}])
    gate = MoeDistGate(cfg, H, drop_tokens=False)
    x = torch.randn(12, H)
    with pytest.raises(RuntimeError, match="seq_aux is computed per sequence"):
        gate(x)
    gate.route(x, 2, 6)
    assert gate(x)[0] is not None


def _bf16_engine_body(rank: int, world_size: int, out: str) -> dict:
    import io

    from moe_dist.config import load_config
    from moe_dist.integrations.deepspeed_engine import DeepSpeedEngine
    from moe_dist.training.run import train

    sets = ["parallel.ep_size=1", "parallel.engine=deepspeed", "run.precision=bf16", f"run.out_dir={out}",
            "schedule.steps=8", "optim.lr=1e-2", "data.max_bytes=200000"]  # fmt: skip
    cfg = load_config(Path(__file__).resolve().parents[1] / "assets" / "tiny.yaml", sets)
    engines: list[DeepSpeedEngine] = []

    def make(*args):  # noqa: ANN002, ANN202
        engines.append(DeepSpeedEngine(*args))
        return engines[-1]

    stream = io.StringIO()
    result = train(cfg, make, stream=stream)
    return {
        "dtypes": sorted({str(p.dtype) for p in engines[0].engine.module.parameters()}),
        "losses": result.losses,
        "log": stream.getvalue(),
    }


@pytest.mark.slow
def test_engine_honours_bf16(tmp_path: Path) -> None:
    """``run.precision: bf16`` under the DeepSpeed engine: DeepSpeed's bf16 mode (bf16 weights, fp32
    master copies in its optimizer wrapper); the run trains."""
    (res,) = run_on_ranks(_bf16_engine_body, 1, (str(tmp_path),))
    assert res["dtypes"] == ["torch.bfloat16"], res["dtypes"]
    assert "ZeRO 0, bf16" in res["log"]
    losses = res["losses"]
    assert all(v == v for v in losses.values()) and losses[8] < losses[1], losses
