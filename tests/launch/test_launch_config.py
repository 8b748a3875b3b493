"""Cluster YAML validation: every shipped config loads; bad ones exit 2 with dotted paths."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from moe_dist.commands.launch import main
from moe_dist.config import ConfigError
from moe_dist.launcher import load_cluster_config
from moe_dist.launcher.cluster_loading import cluster_from_dict
from moe_dist.launcher.hostfile import parse_hostfile

ROOT = Path(__file__).resolve().parents[2]
CLUSTER_CONFIGS = sorted((ROOT / "configs" / "cluster").glob("*.yaml"))


def errors_of(data: dict, base: Path | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        cluster_from_dict(data, "c.yaml", base)
    return info.value.errors


def write(tmp: Path, data: dict) -> Path:
    p = tmp / "cluster.yaml"
    p.write_text(yaml.safe_dump(data))
    return p


def test_every_shipped_cluster_config_loads() -> None:
    names = {p.stem for p in CLUSTER_CONFIGS}
    assert {"local", "torchrun-2node", "deepspeed-2node", "mpirun", "slurm-2node-8gpu"} <= names
    for p in CLUSTER_CONFIGS:
        c = load_cluster_config(p)
        assert c.world_size == c.nodes * c.procs_per_node
    local = load_cluster_config(ROOT / "configs/cluster/local.yaml")
    assert (local.backend, local.nodes, local.procs_per_node) == ("local", 1, 2)


@pytest.mark.parametrize(
    "data, expected",
    [
        ({"backend": "torchrun", "nodes": 0}, "nodes: Input should be greater than or equal to 1, got 0"),
        (
            {"backend": "kubernetes"},
            "backend: Input should be 'local', 'torchrun', 'deepspeed', 'mpirun' or 'slurm'",
        ),
        ({"backend": "mpirun", "hostfile": "nowhere/hosts"}, "hostfile: file not found: "),
        ({"backend": "local", "nodes": 2}, "nodes: backend local runs on this machine only"),
        ({"backend": "torchrun", "nodes": 2}, "rendezvous.endpoint: required for torchrun with nodes > 1"),
        ({"backend": "torchrun", "nodes": 2, "hosts": ["a"]}, "hosts: lists 1 host(s), but nodes is 2"),
        (
            {"backend": "torchrun", "rendezvous": {"endpoint": "node1"}},
            "rendezvous.endpoint: Value error, must be",
        ),
        ({"backend": "mpirun", "max_restarts": 2}, "max_restarts: backend mpirun cannot restart ranks"),
        ({"backend": "slurm", "hosts": ["a"]}, "hosts: SLURM allocates the nodes"),
        ({"backend": "torchrun", "hosts": ["a b"]}, "hosts: Value error, not a host name or address: 'a b'"),
        (
            {"backend": "torchrun", "env": {"BAD-KEY": "1"}},
            "env: Value error, not an environment variable name",
        ),
        ({"backend": "torchrun", "procs": 2}, "procs: unknown key"),
        (
            {"backend": "slurm", "slurm": {"partition": "gpu\n#SBATCH --x"}},
            "slurm.partition: must not contain newlines",
        ),
        ({"backend": "slurm", "slurm": {"time": "1 day"}}, "slurm.time: Value error, must be one token"),
        ({"backend": "mpirun", "container": {"image": "x"}}, "container: backend mpirun starts ranks itself"),
        ({"backend": "slurm", "container": {"image": "x"}}, "container.runtime: SLURM jobs use pyxis"),
        (
            {"backend": "deepspeed", "nodes": 2, "hosts": ["a", "b"], "deepspeed": {"no_ssh": True}},
            "node_rank: ",
        ),
    ],
)
def test_bad_cluster_config_names_the_field(data: dict, expected: str, tmp_path: Path) -> None:
    errors = errors_of(data, tmp_path)
    assert any(e.startswith(expected) for e in errors), errors


def test_all_errors_reported_at_once(tmp_path: Path) -> None:
    errors = errors_of({"backend": "local", "nodes": 0, "procs_per_node": -1, "colour": "red"}, tmp_path)
    assert [e.split(":")[0] for e in errors] == ["nodes", "procs_per_node", "colour"], errors


def test_hostfile_parsing_and_checks(tmp_path: Path) -> None:
    assert parse_hostfile("# two nodes\nnode1 slots=8\nnode2 slots=8  # gpu\n\n10.0.0.3\n") == [
        ("node1", 8),
        ("node2", 8),
        ("10.0.0.3", None),
    ]
    with pytest.raises(ValueError, match="line 1: expected `HOST slots=N`"):
        parse_hostfile("node1 slots=eight\n")
    (tmp_path / "hosts").write_text("node1 slots=4\n")
    errs = errors_of({"backend": "mpirun", "nodes": 2, "procs_per_node": 8, "hostfile": "hosts"}, tmp_path)
    assert any("lists 1 host(s), but nodes is 2" in e for e in errs), errs
    assert any("host node1 has fewer slots than procs_per_node (8)" in e for e in errs), errs
    c = cluster_from_dict({"backend": "mpirun", "nodes": 1, "hostfile": "hosts"}, None, tmp_path)
    assert c.node_hosts() == ["node1"]


def test_launch_exits_2_on_bad_configs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The four the brief names: nodes 0, unknown backend, missing hostfile, too few GPUs."""
    cases = [
        ({"backend": "torchrun", "nodes": 0}, "nodes: Input should be greater than or equal to 1"),
        ({"backend": "slurmish"}, "backend: Input should be"),
        (
            {"backend": "deepspeed", "hostfile": "missing.txt"},
            f"hostfile: file not found: {tmp_path}/missing.txt",
        ),
        (
            {"backend": "local", "procs_per_node": 4, "devices": "gpu"},
            "procs_per_node: 4 processes need 4 GPUs",
        ),
    ]
    for data, expected in cases:
        code = main([str(write(tmp_path, data)), "--", "train", str(ROOT / "tests/assets/tiny.yaml")])
        err = capsys.readouterr().err
        assert code == 2, (data, err)
        assert expected in err, err
        assert "Traceback" not in err


def test_launch_cli_bad_config_no_traceback(tmp_path: Path) -> None:
    """Through the real console entry point, as a user runs it."""
    cfg = write(tmp_path, {"backend": "torchrun", "nodes": 0, "hostfile": "missing"})
    out = subprocess.run(
        [sys.executable, "-m", "moe_dist.cli", "launch", str(cfg), "--", "train", "x.yaml"],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=tmp_path,
    )
    assert out.returncode == 2, out
    assert "nodes: Input should be greater than or equal to 1, got 0" in out.stderr
    assert "hostfile: file not found" in out.stderr
    assert "Traceback" not in out.stderr


def test_launch_usage_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = str(write(tmp_path, {"backend": "local"}))
    assert main([cfg]) == 2
    assert "nothing to launch; put the command after --" in capsys.readouterr().err
    assert main([cfg, "--dry-run", "train", "x.yaml"]) == 2
    assert "put the command to launch after --" in capsys.readouterr().err
    assert main([str(tmp_path / "nope.yaml"), "--", "train", "x.yaml"]) == 2
    assert "config file not found" in capsys.readouterr().err
    assert main([cfg, "--set", "nodes=3", "--", "train", "x.yaml"]) == 2
    assert "nodes: backend local runs on this machine only" in capsys.readouterr().err


def test_train_config_checked_before_launch(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A bad train config (or EP not dividing the world) fails at launch time, not on the cluster."""
    cluster = str(write(tmp_path, {"backend": "torchrun", "procs_per_node": 3}))
    tiny = str(ROOT / "tests/assets/tiny.yaml")
    assert main([cluster, "--dry-run", "--", "train", tiny]) == 2
    assert "parallel.ep_size: must divide the world size (3), got 2" in capsys.readouterr().err
    assert main([cluster, "--dry-run", "--", "train", tiny, "--set", "model.moe.num_experts=0"]) == 2
    assert "model.moe.num_experts: Input should be greater than or equal to 1" in capsys.readouterr().err
    assert main([cluster, "--dry-run", "--", "train", tiny, "--set", "parallel.ep_size=1"]) == 0


def test_docs_list_every_cluster_key() -> None:
    from moe_dist.launcher.cluster_config import ClusterConfig

    doc = (ROOT / "docs" / "launch.md").read_text()
    missing = [k for k in ClusterConfig.model_fields if f"`{k}`" not in doc]
    assert not missing, f"docs/launch.md does not describe {missing}"
