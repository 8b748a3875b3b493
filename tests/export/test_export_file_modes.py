"""``export-hf`` files all get the mode the umask gives (issue 28): safetensors wrote
``model.safetensors`` 0600 beside 0644 files."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from moe_dist.export.hf_export import export_hf


@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_every_exported_file_respects_the_umask(mixtral_run: Path, tmp_path: Path, umask: int) -> None:
    old = os.umask(umask)
    try:
        result = export_hf(mixtral_run, tmp_path / "hf", arch="mixtral")
    finally:
        os.umask(old)
    files = sorted(p for p in result.out_dir.rglob("*") if p.is_file())
    assert "model.safetensors" in [p.name for p in files]
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in files}
    assert set(modes.values()) == {0o666 & ~umask}, {k: oct(v) for k, v in modes.items()}
