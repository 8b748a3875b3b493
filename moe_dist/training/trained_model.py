"""The trained model of a run, in one process: what compare, export-hf and generate read.

``load_trained_model(path)``:

1. ``path`` is a run directory (``config.json`` + ``checkpoints/``), its checkpoint root, or one
   ``step_*`` directory; the run's ``config.json`` is found beside or above it.
2. The model is rebuilt from that config at EP=1 (``build_model`` with the run's seed) and the
   newest usable checkpoint under ``path`` (``checkpoint_choice.choose``: ``latest`` first, a
   corrupt one reported and skipped) is loaded: the whole model, every expert, whatever EP size
   the run used (checkpoints store experts in the global layout).
3. Both native layouts load: ``model.pt`` (``checkpoint.load``) and DCP shards
   (``dcp_checkpoint``'s keys ``model.<name>``, read without a process group; the optimizer's
   entries are left on disk). DeepSpeed checkpoints are refused by ``read_meta``.

A missing directory, a missing ``config.json`` or no usable checkpoint is a ``CheckpointError``
(one line; the CLI exits 2).
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from moe_dist.config import Config, config_from_dict
from moe_dist.models import MoETransformer, build_model
from moe_dist.parallel.groups import ParallelGroups
from moe_dist.training import checkpoint
from moe_dist.training.checkpoint_choice import CheckpointError, choose, read_meta


@dataclass
class TrainedModel:
    cfg: Config
    model: MoETransformer
    run_dir: Path
    checkpoint: Path
    step: int


def run_dir_of(path: Path) -> Path:
    """The run directory holding ``config.json`` for a run dir, checkpoint root or ``step_*`` dir."""
    for candidate in (path, path.parent, path.parent.parent):
        if (candidate / "config.json").is_file() and (candidate / "checkpoints").is_dir():
            return candidate
    raise CheckpointError(f"{path}: not a run directory (no config.json beside a checkpoints/ folder)")


def load_trained_model(path: str | Path, device: str = "cpu") -> TrainedModel:
    """The newest usable checkpoint of the run at ``path``, loaded into a fresh EP=1 model in eval mode."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such checkpoint or run directory")
    run_dir = run_dir_of(path)
    cfg = config_from_dict(json.loads((run_dir / "config.json").read_text()), str(run_dir / "config.json"))
    groups = ParallelGroups.single()
    model = build_model(cfg.model, groups, seed=cfg.run.seed)
    ckpt_root = path if path != run_dir else run_dir / "checkpoints"
    chosen = choose(ckpt_root, groups)
    meta = read_meta(chosen, "native")
    if meta.get("layout", "torch") == "dcp":
        step = _load_dcp_model(chosen, model)
    else:
        step = checkpoint.load(chosen, model, None, groups).step
    return TrainedModel(cfg=cfg, model=model.to(device).eval(), run_dir=run_dir, checkpoint=chosen, step=step)


def _load_dcp_model(path: Path, model: MoETransformer) -> int:
    """The model entries of a DCP checkpoint (``dcp_checkpoint``'s ``model.<name>`` keys, global shapes)
    into an EP=1 model, in this process alone; the step from meta.json."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    reader = FileSystemReader(str(path))
    saved = {
        k: md.size
        for k, md in reader.read_metadata().state_dict_metadata.items()
        if isinstance(md, TensorStorageMetadata)
    }
    params = dict(model.named_parameters())
    state = {}
    for name, t in model.state_dict().items():
        key = f"model.{name}"
        if key not in saved or saved[key] != t.shape:
            if name not in params:
                continue  # per-rank statistics buffers: keep ours
            raise CheckpointError(f"{path}: model does not match the checkpoint ({key})")
        state[key] = t.detach().clone()
    with warnings.catch_warnings():  # "assuming the intent is to load in a single process": it is
        warnings.filterwarnings("ignore", message="torch.distributed is disabled", category=UserWarning)
        dcp.load(state, storage_reader=reader, no_dist=True)
    with torch.no_grad():
        current = model.state_dict()
        for key, t in state.items():
            current[key.removeprefix("model.")].copy_(t)
    return int(json.loads((path / "meta.json").read_text())["step"])
