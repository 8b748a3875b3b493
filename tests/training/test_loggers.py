"""TensorBoard and W&B loggers: what they hold equals metrics.jsonl, and a failing logger never
stops training."""

from __future__ import annotations

import json
import os
import struct
import threading
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from rank_processes import run_on_ranks
from train_helpers import tiny_config, train_body

from moe_dist.training.loggers import GuardedLoggers, record_histograms, record_scalars

STATS = ("gini", "min_max", "cv", "max_violation", "dead_experts", "dropped_fraction")
# tag -> the metrics.jsonl field of each layer it comes from
LAYER_FIELD = {"min_max": "min_max_ratio"}


def _records(run_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def logged_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 2-rank EP=2 run with TensorBoard and W&B (offline, no network) on; its run directory."""
    tmp = tmp_path_factory.mktemp("loggers")
    env = {
        "WANDB_MODE": "offline",
        "WANDB_SILENT": "true",
        "WANDB_DIR": str(tmp / "wandb_env"),
        "WANDB_CONFIG_DIR": str(tmp / "wandb_config"),
        "WANDB_CACHE_DIR": str(tmp / "wandb_cache"),
        "WANDB_DATA_DIR": str(tmp / "wandb_data"),
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        cfg = tiny_config(
            tmp,
            "run.name=logged",
            "schedule.steps=6",
            "eval.every=3",
            "logging.tensorboard.enabled=true",
            "logging.wandb.enabled=true",
            "logging.wandb.project=test",
        )
        run_on_ranks(train_body, 2, (cfg,))
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    return cfg.run_dir


def expected_tags(record: dict[str, Any]) -> dict[str, float]:
    """The tags of one record written out by hand (independent of ``records.py``)."""
    out = {
        "train/loss": record["loss"],
        "train/lr": record["lr"],
        "train/grad_norm": record["grad_norm"],
        "train/tokens_per_s": record["tokens_per_s"],
        **{f"train/aux/{k}": v for k, v in record["aux"].items()},
        **{f"system/peak_memory_bytes/rank_{r}": v for r, v in enumerate(record["peak_memory_bytes"])},
    }
    if "val_loss" in record:
        out["val/loss"] = record["val_loss"]
    for layer in record["layers"]:
        for stat in STATS:
            out[f"moe/layer_{layer['layer']}/{stat}"] = layer[LAYER_FIELD.get(stat, stat)]
    return out


@pytest.mark.slow
def test_tensorboard_holds_the_metrics_log(logged_run: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = _records(logged_run)
    assert [r["step"] for r in records] == list(range(1, 7))
    assert all(len(r["peak_memory_bytes"]) == 2 and min(r["peak_memory_bytes"]) > 0 for r in records)
    tb = logged_run / "tensorboard"
    assert len(list(tb.glob("events.out.tfevents.*"))) == 1  # rank 0 only
    acc = EventAccumulator(str(tb), size_guidance={"scalars": 0, "histograms": 0})
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    for layer in (0, 1):
        assert {f"moe/layer_{layer}/{s}" for s in STATS} <= tags
    wanted: dict[str, dict[int, float]] = {}
    for r in records:
        assert set(expected_tags(r)) <= set(record_scalars(r))
        for tag, value in record_scalars(r).items():
            wanted.setdefault(tag, {})[r["step"]] = value
    assert tags == set(wanted)
    for tag, by_step in wanted.items():
        got = {e.step: e.value for e in acc.Scalars(tag)}
        assert got == pytest.approx(by_step, rel=1e-6, abs=1e-30), tag  # TensorBoard stores float32
    assert set(wanted["val/loss"]) == {3, 6}
    for r in records:
        for tag, value in expected_tags(r).items():
            assert wanted[tag][r["step"]] == pytest.approx(value)
    # tokens-per-expert histograms: one bucket per expert, holding its count
    hist_tags = {f"moe/layer_{i}/tokens_per_expert" for i in (0, 1)}
    assert set(acc.Tags()["histograms"]) == hist_tags
    for tag in hist_tags:
        layer = int(tag.split("/")[1].removeprefix("layer_"))
        for event in acc.Histograms(tag):
            counts = records[event.step - 1]["layers"][layer]["counts"]
            assert event.histogram_value.bucket == pytest.approx(counts)
            assert event.histogram_value.num == pytest.approx(sum(counts))


def read_wandb_history(run_file: Path) -> list[dict[str, Any]]:
    """The history rows of an offline run's ``.wandb`` file, read with wandb's own protobufs.

    The file is W&B's record log (LevelDB log framing: 7-byte file header, 32 KiB blocks,
    records of ``crc32 u32, length u16, type u8`` + payload, split across blocks as FIRST /
    MIDDLE / LAST); the Python reader ``wandb.sdk.internal.datastore`` left wandb with its Go core.
    """
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, buf, rows = run_file.read_bytes(), 32768, 7, b"", []
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, n, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0 and n == 0:  # zero padding up to the block end
            pos += left
            continue
        chunk, pos = data[pos + 7 : pos + 7 + n], pos + 7 + n
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):  # FULL or LAST: one whole record
            record = pb.Record()
            record.ParseFromString(buf)
            if record.WhichOneof("record_type") == "history":
                rows.append(
                    {i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in record.history.item}
                )
            buf = b""
    return rows


@pytest.mark.slow
def test_wandb_offline_run_holds_the_metrics_log(logged_run: Path) -> None:
    records = _records(logged_run)
    run_files = list((logged_run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(run_files) == 1, run_files  # rank 0 only, offline
    rows = {row["_step"]: row for row in read_wandb_history(run_files[0])}
    assert sorted(rows) == [r["step"] for r in records]
    for r in records:
        row = rows[r["step"]]
        for tag, value in record_scalars(r).items():
            assert row[tag] == pytest.approx(value, rel=1e-12), tag
        for tag, value in expected_tags(r).items():
            assert row[tag] == pytest.approx(value, rel=1e-12), tag
        for tag, counts in record_histograms(r).items():
            assert row[f"{tag}/values"] == counts
            assert row[f"{tag}/bins"] == [e - 0.5 for e in range(len(counts) + 1)]


class _Broken:
    name = "broken"

    def __init__(self) -> None:
        self.calls = 0

    def log(self, step: int, scalars: dict[str, float], histograms: dict[str, list[float]]) -> None:
        self.calls += 1
        raise OSError(28, "No space left on device")

    def close(self) -> None:
        raise OSError(28, "No space left on device")


class _Keeper:
    name = "keeper"

    def __init__(self) -> None:
        self.steps: list[int] = []

    def log(self, step: int, scalars: dict[str, float], histograms: dict[str, list[float]]) -> None:
        self.steps.append(step)

    def close(self) -> None:
        pass


def test_a_failing_logger_warns_once_and_the_others_go_on() -> None:
    broken, keeper = _Broken(), _Keeper()
    guard = GuardedLoggers([broken, keeper])
    with pytest.warns(RuntimeWarning, match="logging.broken: failed at step 1") as caught:
        for step in (1, 2, 3):
            guard.write({"step": step, "loss": 1.0, "aux": {}, "layers": []})
        guard.close()
    assert len(caught) == 1 and broken.calls == 1
    assert keeper.steps == [1, 2, 3] and guard.failed == ["broken"]


class _Hung:
    name = "hung"

    def __init__(self) -> None:
        self.release = threading.Event()

    def log(self, step: int, scalars: dict[str, float], histograms: dict[str, list[float]]) -> None:
        self.release.wait(10)

    def close(self) -> None:
        pass


def test_a_hung_logger_never_blocks_a_step() -> None:
    hung = _Hung()
    guard = GuardedLoggers([hung], max_pending=2, close_timeout_s=0.2)
    t0 = time.perf_counter()
    with pytest.warns(RuntimeWarning) as caught:
        for step in range(1, 11):
            guard.write({"step": step, "loss": 1.0, "aux": {}, "layers": []})
        guard.close()
    assert time.perf_counter() - t0 < 5
    messages = [str(w.message) for w in caught]
    assert any("records behind" in m for m in messages) and any("did not finish" in m for m in messages)
    assert guard.skipped_records >= 7
    hung.release.set()


@pytest.fixture
def threads_restored() -> Any:
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.mark.slow
def test_tensorboard_writer_failure_mid_run_warns_once_and_training_finishes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, threads_restored: None
) -> None:
    from torch.utils.tensorboard.writer import FileWriter

    from moe_dist.training.engines import engine_for
    from moe_dist.training.run import train

    calls = {"n": 0}
    real = FileWriter.add_summary

    def full_disk(self: FileWriter, *args: Any, **kwargs: Any) -> None:
        calls["n"] += 1  # one summary per step
        if calls["n"] > 2:  # from step 3 on
            raise OSError(28, "No space left on device")
        real(self, *args, **kwargs)

    monkeypatch.setattr(FileWriter, "add_summary", full_disk)
    cfg = tiny_config(tmp_path, "parallel.ep_size=1", "schedule.steps=5", "logging.tensorboard.enabled=true")
    import io

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(cfg, engine_for(cfg), stream=io.StringIO())
    ours = [w for w in caught if "logging.tensorboard" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in caught]
    assert "No space left on device" in str(ours[0].message) and "step 3" in str(ours[0].message)
    assert calls["n"] == 3  # dropped after the failure
    assert sorted(result.losses) == [1, 2, 3, 4, 5]
    assert [r["step"] for r in _records(cfg.run_dir)] == [1, 2, 3, 4, 5]


def test_loggers_off_import_nothing(tmp_path: Path) -> None:
    import subprocess
    import sys

    code = (
        "import sys; from moe_dist.training import run; from moe_dist.training.loggers import open_loggers;"
        "from moe_dist.config import Config;"
        "assert open_loggers(Config(), True, None) is None;"
        "bad = [m for m in ('wandb', 'tensorboard', 'torch.utils.tensorboard') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[2])


@pytest.mark.slow
def test_tensorboard_after_resume_reads_as_one_run(tmp_path: Path, threads_restored: None) -> None:
    import io

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from moe_dist.training.engines import engine_for
    from moe_dist.training.run import train

    cfg = tiny_config(
        tmp_path,
        "parallel.ep_size=1",
        "schedule.steps=6",
        "checkpoint.every=3",
        "checkpoint.format=torch",
        "logging.tensorboard.enabled=true",
    )
    train(cfg, engine_for(cfg), stop_after=5, stream=io.StringIO())  # killed after step 5, saved at 3
    train(cfg, engine_for(cfg), resume="", stream=io.StringIO())
    records = _records(cfg.run_dir)
    acc = EventAccumulator(str(cfg.run_dir / "tensorboard"), size_guidance={"scalars": 0})
    acc.Reload()
    events = acc.Scalars("train/loss")
    assert [e.step for e in events] == [1, 2, 3, 4, 5, 6]  # steps 4, 5 of the first attempt purged
    assert [e.value for e in events] == pytest.approx([r["loss"] for r in records], rel=1e-6)
