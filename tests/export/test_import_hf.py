"""``moe-dist import-hf``: tiny Mixtral and Qwen3-MoE checkpoints written by ``transformers`` itself
(``save_pretrained``, no hub), imported through the CLI entry point; the logits must equal
transformers' at EP 1 and EP 2 (2 gloo processes, both checkpoint formats, replicate and fsdp),
export o import o export must give the same bytes, and training must continue from the import."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch as safetensors_torch  # noqa: E402 - the dev extra installs both
import torch
import transformers  # noqa: E402
from rank_processes import run_on_ranks
from train_helpers import TINY_TEXT

from moe_dist.cli import main
from moe_dist.data.tokenizer import train_bpe
from moe_dist.training.trained_model import load_trained_model

VOCAB = 300
COMMON = dict(
    vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=64
)
# Mixtral: GQA 4/2, untied output, RoPE 1e6, one safetensors file, no tokenizer files.
MIXTRAL = dict(
    COMMON,
    num_key_value_heads=2,
    intermediate_size=24,
    num_local_experts=4,
    num_experts_per_tok=2,
    rope_theta=1e6,
    tie_word_embeddings=False,
    router_aux_loss_coef=0.02,
)
# Qwen3-MoE: QK-norm, GQA 4/1, a head dim other than hidden / heads (16 vs 8: Qwen3-30B-A3B has 128
# vs 64), a dense first layer, norm_topk_prob false, tied, sharded, a tokenizer.
QWEN3 = dict(
    COMMON,
    num_hidden_layers=3,
    num_key_value_heads=1,
    head_dim=16,
    intermediate_size=40,
    moe_intermediate_size=24,
    num_experts=4,
    num_experts_per_tok=2,
    mlp_only_layers=[0],
    norm_topk_prob=False,
    tie_word_embeddings=True,
    rms_norm_eps=1e-6,
)


def _write_hf(out: Path, arch: str, tokenizer: Path | None) -> None:
    torch.manual_seed(0)
    if arch == "mixtral":
        model = transformers.MixtralForCausalLM(transformers.MixtralConfig(**MIXTRAL))
    else:
        model = transformers.Qwen3MoeForCausalLM(transformers.Qwen3MoeConfig(**QWEN3))
    with torch.no_grad():  # weights of every kind visibly different from their init (norms too)
        for name, p in model.named_parameters():
            p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    model.save_pretrained(out, max_shard_size="40KB" if arch == "qwen3_moe" else "10GB")
    if tokenizer is not None:
        shutil.copyfile(tokenizer, out / "tokenizer.json")


@pytest.fixture(scope="module")
def hf_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("hf")
    (tmp / "corpus.txt").write_text(TINY_TEXT)
    tok = tmp / "tok.json"
    train_bpe([TINY_TEXT], VOCAB, tok)
    dirs = {"mixtral": tmp / "mixtral", "qwen3_moe": tmp / "qwen3_moe", "corpus": tmp / "corpus.txt"}
    _write_hf(dirs["mixtral"], "mixtral", None)
    _write_hf(dirs["qwen3_moe"], "qwen3_moe", tok)
    assert (dirs["qwen3_moe"] / "model.safetensors.index.json").is_file()  # really sharded
    return dirs


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    rc = main(list(args))
    out = capsys.readouterr()
    return rc, out.out, out.err


def imported(capsys: pytest.CaptureFixture[str], hf: Path, run: Path, *args: str) -> Path:
    rc, out, err = cli(capsys, "import-hf", str(hf), "-o", str(run), *args)
    assert rc == 0, err
    assert f"wrote {run}" in out
    return run


def hf_logits(hf: Path, tokens_BS: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> torch.Tensor:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        hf, local_files_only=True, dtype=torch.float32, output_loading_info=True
    )
    assert not any(info.values()), info
    with torch.no_grad():
        return model.eval()(tokens_BS).logits


TOKENS = torch.randint(0, VOCAB, (3, 64), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_logits_equal_transformers_at_ep1(
    arch: str, hf_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    run = imported(capsys, hf_dirs[arch], tmp_path / "run")
    trained = load_trained_model(run)  # what export-hf, generate and compare read
    assert trained.step == 0
    with torch.no_grad():
        ours_BSV = trained.model(TOKENS)[0]
    theirs_BSV = hf_logits(hf_dirs[arch], TOKENS, monkeypatch)
    diff = (ours_BSV - theirs_BSV).abs().max().item()
    print(f"{arch}: EP 1 max |logit difference| {diff:.2e} (logits up to {theirs_BSV.abs().max():.2f})")
    assert diff <= 1e-5
    cfg = trained.cfg
    if arch == "qwen3_moe":
        assert cfg.model.dense_layers == 1 and cfg.model.qk_norm and not cfg.model.moe.router.renormalize
        assert (
            cfg.data.tokenizer.kind == "hf"
            and Path(cfg.data.tokenizer.path) == run / "tokenizer" / "tokenizer.json"
        )
        assert cfg.checkpoint.resolved_format(cfg.parallel.data_parallel) == "torch"
    else:  # HF's aux loss: one Switch loss over all layers, f = counts / tokens
        (loss,) = cfg.model.moe.losses
        assert (loss.name, loss.coef, loss.scope, loss.normalize) == ("switch", 0.02, "model", "tokens")
        assert cfg.data.tokenizer.kind == "bytes" and not (run / "tokenizer").exists()


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(path.glob("*.safetensors")):
        out |= safetensors_torch.load_file(f)
    return out


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe", "qwen3_moe_lpr"])
def test_export_import_export_is_bitwise(
    arch: str, hf_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    source = hf_dirs["qwen3_moe" if arch == "qwen3_moe_lpr" else arch]
    lpr = ("--router", "lpr", "--set", "model.moe.router.latent_dim=8") if arch == "qwen3_moe_lpr" else ()
    run1 = imported(capsys, source, tmp_path / "run1", *lpr)
    assert cli(capsys, "export-hf", str(run1), "-o", str(tmp_path / "hf1"))[0] == 0
    run2 = imported(capsys, tmp_path / "hf1", tmp_path / "run2")
    assert cli(capsys, "export-hf", str(run2), "-o", str(tmp_path / "hf2"))[0] == 0
    first, second = (tmp_path / d / "model.safetensors" for d in ("hf1", "hf2"))
    assert first.read_bytes() == second.read_bytes()
    assert (
        json.loads((tmp_path / "hf1" / "config.json").read_text())["architectures"][0]
        .lower()
        .startswith(arch.split("_")[0])
    )
    original, exported = _tensors(source), _tensors(tmp_path / "hf1")
    if arch == "qwen3_moe_lpr":  # experts and attention are transformers' own, the router is new
        assert exported["model.layers.1.mlp.experts.gate_up_proj"].shape == (4, 48, 32)
        assert not any(".mlp.gate.weight" in name for name in exported)
        exported = {k: v for k, v in exported.items() if ".mlp." not in k}
        original = {k: v for k, v in original.items() if ".mlp." not in k}
    assert sorted(exported) == sorted(original)  # the names transformers wrote, no more, no fewer
    assert all(torch.equal(exported[k], original[k]) for k in original)


def ep2_body(rank: int, world_size: int, runs: dict[str, Path], train_cfg: Any) -> dict[str, Any]:
    """Load each imported checkpoint as ``moe-dist train --resume`` does, at EP 2 under replicate
    and fsdp, and return the logits; then train the training run (resumed from its import)."""
    from train_helpers import train_body

    from moe_dist.config import load_config
    from moe_dist.parallel.groups import ParallelGroups
    from moe_dist.training.checkpoint_choice import choose
    from moe_dist.training.native_engine import NativeEngine

    logits = {}
    groups = ParallelGroups.build(2)
    for name, run in runs.items():
        for mode in ("replicate", "fsdp"):
            sets = ["parallel.ep_size=2", "parallel.backend=gloo", f"parallel.data_parallel={mode}"]
            cfg = load_config(run / "config.yaml", sets)
            engine = NativeEngine(cfg, groups, torch.device("cpu"))
            loaded = engine.load(choose(run / "checkpoints", groups))
            assert loaded.step == 0
            with torch.no_grad():
                logits[f"{name}/{mode}"] = engine.model.eval()(TOKENS)[0]
    return {"logits": logits, "train": train_body(rank, world_size, train_cfg, resume="")}


@pytest.mark.slow  # 2 processes: load at EP 2 in both formats and modes, then 8 training steps
def test_ep2_logits_and_training_after_import(
    hf_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    from moe_dist.config import load_config

    runs = {
        "mixtral": imported(capsys, hf_dirs["mixtral"], tmp_path / "mixtral"),  # torch format
        "qwen3_moe": imported(
            capsys, hf_dirs["qwen3_moe"], tmp_path / "qwen3", "--set", "parallel.data_parallel=fsdp"
        ),  # dcp format
    }
    assert (runs["qwen3_moe"] / "checkpoints" / "step_000000" / ".metadata").is_file()
    assert (runs["mixtral"] / "checkpoints" / "step_000000" / "model.pt").is_file()
    # SimBal on the pretrained experts: a fresh orthogonal softmax router plus its loss, at EP 2
    simbal = imported(
        capsys,
        hf_dirs["qwen3_moe"],
        tmp_path / "simbal",
        *("--router", "topk_softmax", "--set", "model.moe.router.init=orthogonal"),
        *("--set", "model.moe.losses=[{name: simbal, coef: 0.1}]", "--set", "parallel.ep_size=2"),
    )
    train_sets = [
        f"data.paths=[{hf_dirs['corpus']}]",
        "data.micro_batch_size=4",
        "data.seq_len=32",
        "schedule.steps=8",
        "schedule.warmup_steps=2",
        "eval.batches=1",
        "parallel.backend=gloo",
        "run.threads=1",
    ]
    train_cfg = load_config(simbal / "config.yaml", train_sets)
    results = run_on_ranks(ep2_body, 2, (runs, train_cfg))
    for name in runs:
        theirs = hf_logits(hf_dirs[name], TOKENS, monkeypatch)
        for mode in ("replicate", "fsdp"):
            for rank in (0, 1):
                diff = (results[rank]["logits"][f"{name}/{mode}"] - theirs).abs().max().item()
                assert diff <= 1e-5, (name, mode, rank, diff)
            print(f"{name}: EP 2 ({mode}) max |logit difference| {diff:.2e}")
    trained = results[0]["train"]
    assert f"resumed from {simbal / 'checkpoints' / 'step_000000'} at step 0" in trained["log"]
    losses = [trained["losses"][s] for s in sorted(trained["losses"])]
    print("losses after import:", [round(x, 3) for x in losses])
    assert len(losses) == 8 and sum(losses[-3:]) / 3 < losses[0] - 0.3


def refused(capsys: pytest.CaptureFixture[str], hf: Path, tmp_path: Path, *args: str) -> str:
    """Import into ``tmp_path/out/run``; check the refusal's form and return its message."""
    parent = tmp_path / "out"
    parent.mkdir(parents=True)
    rc, out, err = cli(capsys, "import-hf", str(hf), "-o", str(parent / "run"), *args)
    assert rc == 2, out + err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert list(parent.iterdir()) == []  # no RUN_DIR, no temporary directory
    return lines[0]


def _edited(src: Path, dest: Path, **changes: Any) -> Path:
    shutil.copytree(src, dest)
    config = json.loads((dest / "config.json").read_text()) | changes
    (dest / "config.json").write_text(json.dumps(config))
    return dest


def test_bad_inputs_are_refused_with_nothing_written(
    hf_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    qwen3, mixtral = hf_dirs["qwen3_moe"], hf_dirs["mixtral"]
    cases: list[tuple[Path, tuple[str, ...], tuple[str, ...]]] = [
        (
            _edited(mixtral, tmp_path / "qwen2", architectures=["Qwen2MoeForCausalLM"]),
            (),
            (
                "architectures ['Qwen2MoeForCausalLM']",
                "shared_expert_gate",
                "import-hf reads MixtralForCausalLM",
            ),
        ),
        (
            _edited(qwen3, tmp_path / "shape", moe_intermediate_size=20),
            (),
            ("shape mismatches", "mlp.experts.0.gate_proj.weight is [24, 32]", "config.json gives [20, 32]"),
        ),
        (
            _edited(
                mixtral,
                tmp_path / "window",
                sliding_window=16,
                rope_scaling={"rope_type": "yarn", "factor": 4.0},
            ),
            (),
            ("sliding_window: 16 < max_position_embeddings 64", "RoPE scaling ['yarn']"),
        ),
        (mixtral, ("--router", "nope"), ("--router: unknown router 'nope' (known: ", "lpr")),
        (mixtral, ("--set", "model.dim=64"), ("model.dim: 64, but the checkpoint has 32",)),
    ]
    missing = shutil.copytree(qwen3, tmp_path / "missing")
    shard = sorted(missing.glob("model-*.safetensors"))[1]
    shard.unlink()
    cases.append((missing, (), (f"missing shard(s) {shard.name}", "model.safetensors.index.json names them")))
    for i, (hf, args, expected) in enumerate(cases):
        msg = refused(capsys, hf, tmp_path / f"case{i}", *args)
        for what in expected:
            assert what in msg, msg
