"""``moe-dist export-hf``: runs trained through the CLI, exported, loaded by ``transformers`` from
local files only; the logits, greedy continuations and tokenizers must equal ours."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from cli_helpers import run_cli

from moe_dist.data.tokenizer import load_tokenizer
from moe_dist.models.generation import generate
from moe_dist.training.trained_model import load_trained_model

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow  # each test runs the CLI (seconds); the session's runs train through it first

HF_CLASS = {"mixtral": "MixtralForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
TEXT = "class Counter:\n    def tick(self):\n"


def export(run: Path, out: Path, *args: str) -> None:
    proc = run_cli("export-hf", str(run), "-o", str(out), *args)
    assert proc.returncode == 0, proc.stderr
    assert f"wrote {out}" in proc.stdout


def load_hf(out: Path, monkeypatch: pytest.MonkeyPatch) -> torch.nn.Module:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        out, local_files_only=True, dtype=torch.float32, output_loading_info=True
    )
    assert not any(info.values()), info  # no missing, unexpected or mismatched weights
    return model.eval()


@pytest.mark.parametrize("arch", ["mixtral", "qwen3_moe"])
def test_transformers_logits_equal_ours(
    arch: str, mixtral_run: Path, qwen3_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    run = mixtral_run if arch == "mixtral" else qwen3_run
    out = tmp_path / "hf"
    export(run, out)  # the architecture follows from the model (QK-norm: Qwen3-MoE)
    assert sorted(p.name for p in out.iterdir()) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
    ]
    hf = load_hf(out, monkeypatch)
    assert type(hf).__name__ == HF_CLASS[arch]
    trained = load_trained_model(run)
    ours, cfg = trained.model, trained.cfg.model
    tokens_BS = torch.randint(
        0, cfg.vocab_size, (3, cfg.max_seq_len), generator=torch.Generator().manual_seed(1)
    )
    with torch.no_grad():
        ours_BSV = ours(tokens_BS)[0]
        theirs_BSV = hf(tokens_BS).logits
    diff = (ours_BSV - theirs_BSV).abs().max().item()
    print(f"{arch}: max |logit difference| {diff:.3e} (logits up to {ours_BSV.abs().max().item():.3f})")
    assert diff <= 1e-5
    # transformers' generate (its own KV cache) continues a prompt as our greedy decoding does
    prompt = load_tokenizer(trained.cfg.data.tokenizer.kind, trained.cfg.data.tokenizer.path).encode_batch(
        [TEXT]
    )
    prompt_ids = prompt[0][:8]
    theirs = hf.generate(torch.tensor([prompt_ids]), max_new_tokens=12, do_sample=False)
    ids = generate(ours, prompt_ids, 12, eos_id=hf.config.eos_token_id)
    assert len(ids) > 0 and theirs[0, len(prompt_ids) :].tolist() == ids


def test_qwen3_config_and_tokenizer(qwen3_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "hf"
    export(qwen3_run, out, "--arch", "qwen3_moe")
    config = json.loads((out / "config.json").read_text())
    assert config["mlp_only_layers"] == [0] and config["norm_topk_prob"] is False
    assert config["num_key_value_heads"] == 1 and config["tie_word_embeddings"] is True
    assert config["router_aux_loss_coef"] == 0.01  # tests/assets/tiny.yaml's switch coefficient
    assert config["moe_dist"]["step"] == 4
    hf = load_hf(out, monkeypatch)
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()  # tied
    tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    ours = load_tokenizer(
        "hf", json.loads((qwen3_run / "config.json").read_text())["data"]["tokenizer"]["path"]
    )
    assert tok(TEXT, add_special_tokens=False)["input_ids"] == ours.encode_batch([TEXT])[0]
    assert tok.eos_token == "<|endoftext|>" and tok.eos_token_id == ours.eos_id == config["eos_token_id"]


def test_byte_tokenizer_exported_as_bytes(mixtral_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    export(mixtral_run, out, "--arch", "mixtral")
    tok = transformers.AutoTokenizer.from_pretrained(out, local_files_only=True)
    text = "déf añd(x):\n\treturn x ≠ 1 \U0001f600"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode("utf-8"))
    assert tok.decode(ids) == text


def test_overwrite_replaces_an_existing_export(mixtral_run: Path, tmp_path: Path) -> None:
    out = tmp_path / "hf"
    out.mkdir()
    (out / "old.txt").write_text("keep me")
    proc = run_cli("export-hf", str(mixtral_run), "-o", str(out))
    assert proc.returncode == 2 and "exists and is not an empty directory" in proc.stderr
    assert [p.name for p in out.iterdir()] == ["old.txt"]
    export(mixtral_run, out, "--overwrite")
    assert not (out / "old.txt").exists() and (out / "model.safetensors").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary directory left beside it
