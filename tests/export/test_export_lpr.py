"""``moe-dist export-hf --arch qwen3_moe_lpr``: an LPR run trained through the CLI, exported with its
remote code, loaded by ``transformers`` from local files (``trust_remote_code=True``); logits and
greedy continuations must equal ours."""

from __future__ import annotations

import ast
import json
from collections.abc import Callable
from importlib.resources import files
from pathlib import Path

import pytest
import torch
from cli_helpers import run_cli

from moe_dist.data.tokenizer import load_tokenizer
from moe_dist.export.remote_code import REMOTE_CODE_FILES
from moe_dist.models.generation import generate
from moe_dist.training.trained_model import load_trained_model

transformers = pytest.importorskip("transformers")

# Qwen3-like LPR model: QK-norm, GQA 4/2, one dense layer first, latent size 8.
LPR_RUN = (
    "model.n_layers=3",
    "model.n_heads=4",
    "model.n_kv_heads=2",
    "model.qk_norm=true",
    "model.dense_layers=1",
    "model.dense_ffn_hidden_size=48",
    "model.moe.router.name=lpr",
    "model.moe.router.latent_dim=8",
)
TEXT = "class Counter:\n    def tick(self):\n"


@pytest.fixture(scope="module")
def lpr_run(trained_run: Callable[..., Path]) -> Path:
    return trained_run("lpr_qwen3", *LPR_RUN)


def test_remote_code_imports_only_torch_and_transformers() -> None:
    """The templates run inside transformers without moe_dist installed."""
    for name in REMOTE_CODE_FILES["qwen3_moe_lpr"]:
        tree = ast.parse(files("moe_dist.export.remote_code").joinpath(name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                assert all(a.name.split(".")[0] in ("torch", "transformers") for a in node.names), name
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                assert node.module.split(".")[0] in ("torch", "transformers"), (name, node.module)


@pytest.mark.slow
def test_lpr_remote_code_logits_and_generate(
    lpr_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "hf"
    proc = run_cli("export-hf", str(lpr_run), "-o", str(out))  # lpr router: qwen3_moe_lpr by default
    assert proc.returncode == 0, proc.stderr
    assert "(qwen3_moe_lpr," in proc.stdout and "trust_remote_code=True" in proc.stdout
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "configuration_qwen3_moe_lpr.py",
        "model.safetensors",
        "modeling_qwen3_moe_lpr.py",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "qwen3_moe_lpr" and config["lpr_latent_dim"] == 8
    assert config["auto_map"]["AutoModelForCausalLM"] == "modeling_qwen3_moe_lpr.Qwen3MoeLPRForCausalLM"
    assert config["mlp_only_layers"] == [0]

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hf, info = transformers.AutoModelForCausalLM.from_pretrained(
        out, trust_remote_code=True, local_files_only=True, dtype=torch.float32, output_loading_info=True
    )
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    hf.eval()
    assert type(hf).__name__ == "Qwen3MoeLPRForCausalLM"
    assert not type(hf).__module__.startswith("moe_dist")  # the copy in OUT_DIR, not our template

    trained = load_trained_model(lpr_run)
    ours, cfg = trained.model, trained.cfg.model
    tokens_BS = torch.randint(
        0, cfg.vocab_size, (3, cfg.max_seq_len), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        ours_BSV = ours(tokens_BS)[0]
        theirs_BSV = hf(tokens_BS).logits
        # the decoded latent is part of the forward: without it the logits move
        for layer in hf.model.layers[1:]:
            layer.mlp.gate.add_decoded_latent = False
        without_BSV = hf(tokens_BS).logits
        for layer in hf.model.layers[1:]:
            layer.mlp.gate.add_decoded_latent = True
    diff = (ours_BSV - theirs_BSV).abs().max().item()
    print(
        f"qwen3_moe_lpr: max |logit difference| {diff:.3e} (logits up to {ours_BSV.abs().max().item():.3f})"
    )
    assert diff <= 1e-5
    assert (without_BSV - ours_BSV).abs().max().item() > 100 * max(diff, 1e-7)

    tok = load_tokenizer(trained.cfg.data.tokenizer.kind, trained.cfg.data.tokenizer.path)
    prompt_ids = tok.encode_batch([TEXT])[0][:8]
    theirs = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=12, do_sample=False)
    ids = generate(ours, prompt_ids, 12, eos_id=hf.config.eos_token_id)
    assert len(ids) > 0 and theirs[0, len(prompt_ids) :].tolist() == ids


def refused(run: Path, tmp_path: Path, *args: str) -> str:
    parent = tmp_path / "out"
    parent.mkdir(parents=True)
    proc = run_cli("export-hf", str(run), "-o", str(parent / "hf"), *args)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert list(parent.iterdir()) == []
    return lines[0]


@pytest.mark.slow
def test_lpr_refusals(
    lpr_run: Path, mixtral_run: Path, trained_run: Callable[..., Path], tmp_path: Path
) -> None:
    msg = refused(lpr_run, tmp_path / "a", "--arch", "qwen3_moe")
    assert "model.moe.router.name: lpr (LPR's latent encoder" in msg and "--arch qwen3_moe_lpr" in msg
    msg = refused(mixtral_run, tmp_path / "b", "--arch", "qwen3_moe_lpr")
    assert "model.moe.router.name: topk_softmax; qwen3_moe_lpr is the remote code of the lpr router" in msg
    no_qk_norm = trained_run("lpr", "model.moe.router.name=lpr", steps=1)  # the default arch for lpr
    msg = refused(no_qk_norm, tmp_path / "c")
    assert msg.startswith("error: cannot export as qwen3_moe_lpr: ") and "model.qk_norm: false" in msg
