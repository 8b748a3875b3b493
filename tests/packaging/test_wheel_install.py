"""The built wheel works away from the source tree (issue 28): the templates, compare presets,
model, cluster and demo configs are package data, found with ``importlib.resources``.

The wheel is built from a copy of the package's files (the checkout stays untouched), installed
with ``pip --python`` into a fresh venv without pip; the venv sees the dependencies of ``.venv``
through a ``.pth`` line (a path line does not run ``.venv``'s editable-install hook, so
``moe_dist`` can only come from the wheel, which the test asserts). Every command runs from an
empty folder with a clean environment.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
PACKAGE_FILES = ("pyproject.toml", "README.md", "moe_dist", "configs", "launch")


def _run(argv: list[str], cwd: Path, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "RANK", "WORLD_SIZE")}
    return subprocess.run(argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The ``bin`` folder of a fresh venv holding only the wheel of this checkout."""
    tmp = tmp_path_factory.mktemp("wheel")
    src = tmp / "src"
    src.mkdir()
    for name in PACKAGE_FILES:
        p = ROOT / name
        if p.is_dir():
            shutil.copytree(p, src / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy2(p, src / name)
    pip = [sys.executable, "-m", "pip"]
    built = _run(
        [*pip, "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp / "dist"), "."], src
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = (tmp / "dist").glob("moe_dist-*.whl")
    env_dir = tmp / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = env_dir / "bin" / "python"
    done = _run([*pip, "--python", str(python), "install", "--no-deps", "-q", str(wheel)], tmp)
    assert done.returncode == 0, done.stderr
    site = _run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], tmp)
    Path(site.stdout.strip(), "deps_from_dev_venv.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    return env_dir / "bin"


@pytest.mark.slow
def test_installed_wheel_finds_its_files_from_an_empty_folder(installed: Path, tmp_path: Path) -> None:
    where = _run([str(installed / "python"), "-c", "import moe_dist; print(moe_dist.__file__)"], tmp_path)
    assert where.returncode == 0, where.stderr
    assert not Path(where.stdout.strip()).resolve().is_relative_to(ROOT), where.stdout
    moe_dist = str(installed / "moe-dist")

    launched = _run(
        [
            moe_dist,
            "launch",
            "configs/cluster/slurm-2node-8gpu.yaml",
            "--set",
            "container=null",
            "--dry-run",
            "--",
            "train",
            "configs/demo.yaml",
        ],
        tmp_path,
    )
    assert launched.returncode == 0, launched.stderr
    assert "srun" in launched.stdout and "#SBATCH --nodes=2" in launched.stdout
    assert "using the copy shipped with moe_dist" in launched.stderr

    preset = _run([moe_dist, "compare", "--preset", "lpr_paper", "--variants", "no_such_arm"], tmp_path)
    assert preset.returncode == 2
    assert "no preset" not in preset.stderr and "hf_lbl" in preset.stderr, preset.stderr

    checked = _run(
        [moe_dist, "check", "configs/models/qwen3_moe_tiny_lpr.yaml", "--world-size", "2"], tmp_path
    )
    assert checked.returncode == 0, checked.stderr
    assert "configs/models/qwen3_moe_tiny_lpr.yaml: OK" in checked.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) in ([], ["runs"])
