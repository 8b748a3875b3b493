"""``parallel.data_parallel: fsdp`` and ``ddp`` against ``replicate`` on real gloo processes; DCP checkpoints.

- 20 steps at world 2 (EP 2) and world 4 (DP 2 x EP 2): same losses and final weights as replicate;
- DCP resharding: an fsdp EP=2 checkpoint resumes at EP 1 (one process, replicate), EP 4 and DP 2;
- async save + kill: the previous checkpoint stays ``latest`` and resumes exactly; a missing
  shard file of the newest checkpoint falls back to the previous one in one line;
- bad input: another model shape names the first mismatched parameter and both shapes; fsdp on
  one process is a config error.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from rank_processes import run_on_ranks
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
from train_helpers import tiny_config, train_body

from moe_dist.config import ConfigError
from moe_dist.training import checkpoint_choice

STEPS = 20


def _final_weights(run: Path, step: int) -> dict[str, torch.Tensor]:
    """The global weights of a run's checkpoint ``step``, whichever format wrote it."""
    d = run / "checkpoints" / f"step_{step:06d}"
    if (d / "model.pt").exists():
        return torch.load(d / "model.pt", weights_only=True)
    dcp_to_torch_save(d, d.parent / "converted.pt")
    full = torch.load(d.parent / "converted.pt", weights_only=True)
    return {k.removeprefix("model."): v for k, v in full.items() if k.startswith("model.")}


def _assert_same(a: dict, b: dict, what: str) -> None:
    assert sorted(a["losses"]) == sorted(b["losses"])
    for step in a["losses"]:
        assert a["losses"][step] == pytest.approx(b["losses"][step], rel=1e-5), (what, step)


@pytest.mark.slow
def test_fsdp_and_ddp_equal_replicate_and_dcp_reshards(tmp_path: Path) -> None:
    def cfg(name: str, mode: str, ep: int, *more: str):  # noqa: ANN202
        return tiny_config(
            tmp_path,
            f"run.name={name}",
            f"parallel.data_parallel={mode}",
            f"parallel.ep_size={ep}",
            f"schedule.steps={STEPS}",
            *more,
        )

    rep2 = run_on_ranks(train_body, 2, (cfg("rep2", "replicate", 2),))[0]
    fsdp2 = run_on_ranks(train_body, 2, (cfg("fsdp2", "fsdp", 2, "checkpoint.every=8", "eval.every=8"),))[0]
    _assert_same(fsdp2, rep2, "fsdp world 2")
    rep4 = run_on_ranks(train_body, 4, (cfg("rep4", "replicate", 2),))[0]
    fsdp4 = run_on_ranks(train_body, 4, (cfg("fsdp4", "fsdp", 2),))[0]
    ddp4 = run_on_ranks(train_body, 4, (cfg("ddp4", "ddp", 2),))[0]
    _assert_same(fsdp4, rep4, "fsdp world 4")
    _assert_same(ddp4, rep4, "ddp world 4")
    for a, b in (("rep2", "fsdp2"), ("rep4", "fsdp4"), ("rep4", "ddp4")):
        wa, wb = _final_weights(tmp_path / "runs" / a, STEPS), _final_weights(tmp_path / "runs" / b, STEPS)
        assert wa.keys() == wb.keys()
        for k in wa:
            torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-6, msg=f"{b} {k}")

    # resharding: the fsdp EP=2 checkpoint of step 8 at EP 1 (1 process), EP 4, DP 2 x EP 1
    step8 = str(tmp_path / "runs" / "fsdp2" / "checkpoints" / "step_000008")
    ep1 = train_body(0, 1, cfg("ep1", "replicate", 1, "schedule.steps=8"), step8)
    ep4 = run_on_ranks(train_body, 4, (cfg("ep4", "fsdp", 4, "schedule.steps=8"), step8))[0]
    assert ep1["losses"] == {} and ep4["losses"] == {}
    assert ep1["val"][8] == pytest.approx(fsdp2["val"][8], rel=1e-5)
    assert ep4["val"][8] == pytest.approx(fsdp2["val"][8], rel=1e-5)
    dp2 = run_on_ranks(train_body, 2, (cfg("dp2", "fsdp", 1), step8))[0]
    assert sorted(dp2["losses"]) == list(range(9, STEPS + 1))
    for step, loss in dp2["losses"].items():
        assert loss == pytest.approx(fsdp2["losses"][step], rel=1e-5), step
    # today's format (replicate's model.pt) loads into fsdp and continues the same run
    rep_ckpt = tmp_path / "runs" / "rep2" / "checkpoints" / f"step_{STEPS:06d}"
    again = run_on_ranks(train_body, 2, (cfg("from_torch", "fsdp", 2), str(rep_ckpt)))[0]
    assert again["val"][STEPS] == pytest.approx(rep2["val"][STEPS], rel=1e-5)


@pytest.mark.slow
def test_async_save_kill_resume_and_missing_shard(tmp_path: Path) -> None:
    def cfg(name: str):  # noqa: ANN202
        return tiny_config(
            tmp_path,
            f"run.name={name}",
            "parallel.data_parallel=fsdp",
            "parallel.ep_size=2",
            "checkpoint.every=8",
            "checkpoint.async=true",
        )

    full = run_on_ranks(train_body, 2, (cfg("full"),))[0]
    # killed right after the async save of step 16 began: step 8 is the usable one
    run_on_ranks(train_body, 2, (cfg("killed"), None, 16))
    root = tmp_path / "runs" / "killed" / "checkpoints"
    assert (root / "latest").read_text().strip() == "step_000008"
    assert [p.name for p in checkpoint_choice.list_checkpoints(root)] == ["step_000008"]
    assert (root / ".tmp-step_000016").is_dir()
    resumed = run_on_ranks(train_body, 2, (cfg("killed"), ""))[0]
    assert "step_000008" in resumed["log"] and sorted(resumed["losses"]) == list(range(9, 25))
    for step, loss in resumed["losses"].items():
        assert loss == full["losses"][step], step  # exact: weights, moments, batches, RNG
    assert resumed["val"][24] == full["val"][24]

    # a missing shard file in the newest checkpoint: one line, then the previous one
    shutil.copytree(tmp_path / "runs" / "full", tmp_path / "runs" / "copy")
    (tmp_path / "runs" / "copy" / "checkpoints" / "step_000024" / "__1_0.distcp").unlink()
    back = run_on_ranks(train_body, 2, (cfg("copy"), str(tmp_path / "runs" / "copy" / "checkpoints")))[0]
    assert "step_000024 is unusable: __1_0.distcp missing; trying the previous one" in back["log"]
    assert sorted(back["losses"]) == list(range(17, 25))
    for step, loss in back["losses"].items():
        assert loss == full["losses"][step], step

    # another model shape: the first mismatched parameter and both shapes
    wider = tiny_config(
        tmp_path,
        "run.name=wider",
        "parallel.data_parallel=fsdp",
        "parallel.ep_size=2",
        "model.moe.experts.ffn_hidden_size=96",
    )
    ckpt = str(tmp_path / "runs" / "full" / "checkpoints")
    with pytest.raises(
        RuntimeError,
        match=r"blocks\.0\.ffn\.experts\.w13_eHG: checkpoint has shape \(4, 32, 128\), "
        r"this model \(4, 32, 192\)",
    ):
        run_on_ranks(train_body, 2, (wider, ckpt))


def test_fsdp_on_one_process_is_a_config_error(tmp_path: Path) -> None:
    cfg = tiny_config(tmp_path, "parallel.data_parallel=fsdp", "parallel.ep_size=1")
    with pytest.raises(ConfigError, match="fsdp shards over the data-parallel ranks"):
        train_body(0, 1, cfg)


def test_the_ep_dp_mesh_rows_are_the_expert_dp_groups() -> None:
    """Row i of the (ep, dp) mesh is EP shard i's replicas: groups.py's expert-DP group i."""
    from moe_dist.parallel.groups import ep_layout
    from moe_dist.parallel.mesh import ep_dp_ranks

    assert ep_dp_ranks(4, 2) == [[0, 2], [1, 3]]
    for world, ep in ((1, 1), (2, 1), (2, 2), (4, 1), (4, 4), (8, 2)):
        assert ep_dp_ranks(world, ep) == ep_layout(world, ep)[1]


def test_mpich_variables_map_to_an_mpi_launch() -> None:
    from moe_dist.parallel.startup import launch_info

    info = launch_info({"PMI_RANK": "1", "PMI_SIZE": "4", "MPI_LOCALRANKID": "1"})
    assert (info.rank, info.world_size, info.local_rank, info.launcher) == (1, 4, 1, "mpirun")
