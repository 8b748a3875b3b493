"""``export_hf(path, out_dir, arch)``: a trained run as a Hugging Face ``transformers`` model directory.

1. Load the run's newest usable checkpoint into one EP=1 model (``load_trained_model``: a missing
   path or checkpoint is a ``CheckpointError``).
2. Choose the target (``hf_support.choose_arch``) and refuse, in one line, whatever it cannot
   express (``hf_support.check_exportable``: ``ExportError``). Nothing has been written yet.
3. Write ``config.json`` (``hf_config``), ``model.safetensors`` (``hf_weights``, fp32), the
   tokenizer files (``hf_tokenizer``) and, for ``qwen3_moe_lpr``, the remote code (``hf_lpr``)
   into ``.<name>.tmp-<pid>`` beside ``out_dir``, then rename it to ``out_dir``: a failure at any
   point leaves nothing at ``out_dir``. An existing non-empty ``out_dir`` is refused unless
   ``overwrite`` (then it is replaced after the new directory is complete).

The result loads with ``AutoModelForCausalLM.from_pretrained(out_dir)`` and no network; its fp32
logits equal ours within 1e-5 (``tests/export/test_export_hf.py``); ``qwen3_moe_lpr`` exports need
``trust_remote_code=True`` (``tests/export/test_export_lpr.py``).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from moe_dist.data.tokenizer import load_tokenizer
from moe_dist.export.hf_config import hf_config
from moe_dist.export.hf_lpr import write_remote_code
from moe_dist.export.hf_support import Arch, ExportError, check_exportable, choose_arch
from moe_dist.export.hf_tokenizer import write_tokenizer_files
from moe_dist.export.hf_weights import hf_state_dict
from moe_dist.training.trained_model import load_trained_model


@dataclass
class ExportResult:
    out_dir: Path
    arch: Arch
    checkpoint: Path
    step: int
    files: list[str]


def export_hf(
    path: str | Path, out_dir: str | Path, arch: str | None = None, overwrite: bool = False
) -> ExportResult:
    from safetensors.torch import save_file

    out_dir = Path(out_dir)
    if out_dir.exists() and not (out_dir.is_dir() and not any(out_dir.iterdir())) and not overwrite:
        raise ExportError(
            f"-o: {out_dir} exists and is not an empty directory (choose another, or --overwrite)"
        )
    trained = load_trained_model(path)
    cfg = trained.cfg
    target = choose_arch(cfg.model, arch)
    check_exportable(cfg.model, target)
    tok_cfg = cfg.data.tokenizer
    tokenizer = load_tokenizer(tok_cfg.kind, tok_cfg.path)
    provenance = {
        "run_dir": str(trained.run_dir),
        "checkpoint": str(trained.checkpoint),
        "step": trained.step,
        "router": cfg.model.moe.router.model_dump(mode="json"),
        "losses": [loss.model_dump(mode="json") for loss in cfg.model.moe.losses],
        "tokenizer": tok_cfg.kind,
    }
    config = hf_config(cfg.model, target, tokenizer.eos_id, provenance)
    tensors = hf_state_dict(trained.model, target)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        (tmp / "config.json").write_text(json.dumps(config, indent=1) + "\n")
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        # safetensors creates its file 0600; give it the mode every other file gets (0666 - umask)
        (tmp / "model.safetensors").chmod(0o666 & ~current_umask())
        files = ["config.json", "model.safetensors"]
        files += write_tokenizer_files(tokenizer, tok_cfg.path, cfg.model.max_seq_len, tmp)
        if target == "qwen3_moe_lpr":
            files += write_remote_code(tmp)
        _replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ExportResult(out_dir, target, trained.checkpoint, trained.step, files)


def current_umask() -> int:
    """This process's umask: from /proc (Linux, no side effect), else set and restored at once."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except OSError:
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _replace_dir(new: Path, dest: Path) -> None:
    """Put the complete directory ``new`` at ``dest``; an existing ``dest`` is removed only after."""
    if dest.is_dir() and not any(dest.iterdir()):
        dest.rmdir()
    if not dest.exists():
        os.replace(new, dest)
        return
    old = dest.parent / f".{dest.name}.old-{os.getpid()}"
    os.replace(dest, old)
    os.replace(new, dest)
    shutil.rmtree(old, ignore_errors=True)
