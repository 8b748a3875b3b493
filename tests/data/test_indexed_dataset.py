"""Megatron's indexed dataset: our reader and writer, megatron-core's both ways, bad and interrupted files."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from cli_helpers import ROOT

from moe_dist.data.errors import DataError
from moe_dist.data.indexed_dataset import IndexedDatasetWriter, read_indexed, token_dtype

DOCS = [[5, 6, 7, 0], [8, 0], [9, 10, 11, 12, 13, 0]]


def write(prefix: Path, docs: list[list[int]], dtype: type[np.integer] = np.uint16) -> None:
    with IndexedDatasetWriter(prefix, np.dtype(dtype)) as w:
        for d in docs:
            w.add_document(d)


def test_round_trip_and_megatron_dtype_choice(tmp_path: Path) -> None:
    assert (
        token_dtype(50_000) == np.uint16
        and token_dtype(65_500) == np.int32
        and token_dtype(200_000) == np.int32
    )
    write(tmp_path / "d", DOCS)
    data = read_indexed(tmp_path / "d")
    assert isinstance(data.tokens, np.memmap) and data.tokens.dtype == np.uint16
    assert data.tokens.tolist() == sum(DOCS, [])
    assert data.doc_bounds.tolist() == [0, 4, 6, 12] and data.num_documents == 3
    assert (tmp_path / "d.bin").stat().st_size == 12 * 2
    write(tmp_path / "w", [[70_000, 1]], np.dtype(np.int32))
    assert read_indexed(tmp_path / "w").tokens.tolist() == [70_000, 1]
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "d.bin",
        "d.idx",
        "w.bin",
        "w.idx",
    ]  # no temporaries


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # megatron-core's numpy 2 copy= warning
def test_megatron_core_reads_ours_and_we_read_megatron_cores(tmp_path: Path) -> None:
    mc = pytest.importorskip("megatron.core.datasets.indexed_dataset")
    # ours -> megatron-core
    write(tmp_path / "ours", DOCS)
    theirs = mc.IndexedDataset(str(tmp_path / "ours"))
    assert len(theirs) == 3 and theirs.index.dtype == np.uint16
    assert [theirs[i].tolist() for i in range(3)] == DOCS
    assert theirs.document_indices.tolist() == [0, 1, 2, 3]
    # megatron-core -> ours, both dtypes; a document of two sequences counts as one document
    for dtype in (np.uint16, np.int32):
        prefix = str(tmp_path / f"mc_{np.dtype(dtype).name}")
        builder = mc.IndexedDatasetBuilder(prefix + ".bin", dtype=dtype)
        for d in DOCS:
            builder.add_document(torch.tensor(d), [len(d)])
        builder.add_item(torch.tensor([1, 2]))
        builder.add_item(torch.tensor([3, 0]))
        builder.end_document()
        builder.finalize(prefix + ".idx")
        ours = read_indexed(prefix)
        assert ours.tokens.dtype == dtype
        assert ours.tokens.tolist() == sum(DOCS, []) + [1, 2, 3, 0]
        assert ours.doc_bounds.tolist() == [0, 4, 6, 12, 16]


@pytest.mark.parametrize(
    ("case", "message"),
    [
        ("no_bin", "has no data file"),
        ("no_idx", "has no index"),
        ("truncated_bin", "has 20 bytes, its index"),
        ("bad_header", "is not a Megatron index"),
        ("truncated_idx", "is truncated"),
    ],
)
def test_bad_pairs_are_one_clear_error(tmp_path: Path, case: str, message: str) -> None:
    prefix = tmp_path / "d"
    write(prefix, DOCS)
    bin_, idx = Path(f"{prefix}.bin"), Path(f"{prefix}.idx")
    if case == "no_bin":
        bin_.unlink()
    elif case == "no_idx":
        idx.unlink()
    elif case == "truncated_bin":
        bin_.write_bytes(bin_.read_bytes()[:20])
    elif case == "bad_header":
        idx.write_bytes(b"NOTANIDX!" + idx.read_bytes()[9:])
    else:
        idx.write_bytes(idx.read_bytes()[:40])
    with pytest.raises(DataError, match=message) as info:
        read_indexed(prefix)
    assert str(prefix) in str(info.value)


def test_an_error_while_writing_leaves_the_old_pair_and_no_temporaries(tmp_path: Path) -> None:
    write(tmp_path / "d", DOCS)
    with pytest.raises(KeyboardInterrupt), IndexedDatasetWriter(tmp_path / "d", np.dtype(np.uint16)) as w:
        w.add_document([1, 2, 3])
        raise KeyboardInterrupt
    assert read_indexed(tmp_path / "d").tokens.tolist() == sum(DOCS, [])  # untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.bin", "d.idx"]


def test_prepare_data_killed_midway_leaves_nothing_that_looks_complete(tmp_path: Path) -> None:
    """SIGKILL (no cleanup runs): at most a hidden temporary remains; PREFIX itself does not open."""
    src = tmp_path / "big.txt"
    src.write_text("the quick brown fox jumps over the lazy dog\n" * 400_000)  # ~18 MB of bytes
    prefix = tmp_path / "out" / "big"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "moe_dist.cli",
            "prepare-data",
            str(src),
            str(src),
            str(src),
            "-o",
            str(prefix),
        ],
        cwd=ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    while not any((tmp_path / "out").glob(".big.*.tmp.bin")) and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert any((tmp_path / "out").glob(".big.*.tmp.bin"))  # it was killed while writing
    assert not Path(f"{prefix}.idx").exists()
    with pytest.raises(DataError):
        read_indexed(prefix)
