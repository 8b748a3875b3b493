"""What each backend would run: argument lists, quoting, generated hostfiles and sbatch scripts.

A hostile value (``"; rm -rf /"``, ``$(...)``) from the YAML or the command line must stay one
argument everywhere: in argument lists, in the printed dry-run line, in the DeepSpeed pdsh
path and in the sbatch script (checked by running the script's own bash on it).
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from moe_dist.commands.launch import build_plan, main
from moe_dist.launcher import load_cluster_config
from moe_dist.launcher.cluster_loading import cluster_from_dict

ROOT = Path(__file__).resolve().parents[2]
EVIL = '"; rm -rf / #'
EVIL_ARG = "run.name=$(touch PWNED)`touch PWNED`;x"
TRAIN = ["train", "cfg.yaml", "--set", EVIL_ARG]


def cluster(tmp: Path, **data: object):
    return cluster_from_dict(data, None, tmp)


def option(argv: list[str], name: str) -> str:
    """The value after ``name`` in ``argv`` (fails if absent)."""
    assert name in argv, (name, argv)
    return argv[argv.index(name) + 1]


def test_local_is_torchrun_standalone(tmp_path: Path) -> None:
    c = load_cluster_config(ROOT / "configs/cluster/local.yaml")
    plan = build_plan(c, ["train", "cfg.yaml"])
    assert plan.argv[:3] == [sys.executable, "-m", "torch.distributed.run"]
    assert "--standalone" in plan.argv and option(plan.argv, "--nproc-per-node") == "2"
    cut = plan.argv.index("-m", 3)
    assert plan.argv[cut : cut + 4] == ["-m", "moe_dist.cli", "train", "cfg.yaml"]
    assert plan.argv[cut + 4 :] == [
        "--set",
        "telemetry.port_base=9400",
        "--set",
        'telemetry.file_sd_path="runs/prometheus/targets/"',
    ]
    assert plan.env == {"OMP_NUM_THREADS": "1"}


def test_torchrun_multinode_c10d(tmp_path: Path) -> None:
    c = load_cluster_config(ROOT / "configs/cluster/torchrun-2node.yaml", ["node_rank=1"])
    argv = build_plan(c, TRAIN).argv
    assert "--standalone" not in argv
    assert option(argv, "--nnodes") == "2" and option(argv, "--nproc-per-node") == "8"
    assert option(argv, "--rdzv-backend") == "c10d"
    assert option(argv, "--rdzv-endpoint") == "node001:29400"
    assert option(argv, "--rdzv-id") == "moe-2node"
    assert option(argv, "--rdzv-conf") == "join_timeout=900,last_call_timeout=30"
    assert option(argv, "--max-restarts") == "3" and option(argv, "--node-rank") == "1"
    assert EVIL_ARG in argv  # one argument, untouched
    # restarts need a fresh store per attempt (pytorch/pytorch#135712)
    assert build_plan(c, TRAIN).env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    # the user's own --set wins over the cluster's telemetry override
    argv = build_plan(c, ["train", "cfg.yaml", "--set", "telemetry.port_base=9999"]).argv
    assert "telemetry.port_base=9400" not in argv and argv.count("--set") == 3
    # hosts alone: the first one serves the rendezvous on rendezvous.port
    c = cluster(tmp_path, backend="torchrun", nodes=2, hosts=["n1", "n2"], rendezvous={"port": 1234})
    assert option(build_plan(c, TRAIN).argv, "--rdzv-endpoint") == "n1:1234"


def test_dry_run_prints_a_copy_pasteable_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(yaml.safe_dump({"backend": "torchrun", "procs_per_node": 2, "env": {"EVIL": EVIL}}))
    train = ["train", str(ROOT / "tests/assets/tiny.yaml"), "--set", EVIL_ARG]
    assert main([str(cfg), "--dry-run", "--", *train]) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1]
    words = shlex.split(line)
    assert words[:2] == ["env", f"EVIL={EVIL}"]
    assert words[2:] == build_plan(load_cluster_config(cfg), train).argv
    assert not (tmp_path / "PWNED").exists()


def test_mpirun_command(tmp_path: Path) -> None:
    c = cluster(tmp_path, backend="mpirun", nodes=2, procs_per_node=2, hosts=["a", "b"], env={"EVIL": EVIL})
    argv = build_plan(c, TRAIN).argv
    assert argv[:3] == ["mpirun", "-np", "4"]
    assert option(argv, "--host") == "a:2,b:2" and option(argv, "--map-by") == "ppr:2:node"
    exported = [argv[i + 1] for i, a in enumerate(argv) if a == "-x"]
    assert exported == ["MASTER_ADDR=a", "MASTER_PORT=29400", f"EVIL={EVIL}"]
    assert ("--allow-run-as-root" in argv) == (os.geteuid() == 0) == ("--oversubscribe" in argv)
    assert argv[-7:] == [sys.executable, "-m", "moe_dist.cli", *TRAIN]
    one = build_plan(load_cluster_config(ROOT / "configs/cluster/mpirun.yaml"), TRAIN).argv
    assert "--host" not in one and "--map-by" not in one and option(one, "--bind-to") == "none"
    assert option(one, "-x").startswith("MASTER_ADDR=127.0.0.1")


def test_deepspeed_single_node_no_ssh(tmp_path: Path) -> None:
    c = cluster(tmp_path, backend="deepspeed", procs_per_node=2, launch_dir=str(tmp_path), env={"EVIL": EVIL})
    plan = build_plan(c, TRAIN)
    hostfile = tmp_path / "moe_dist" / "hostfile"
    assert plan.files == {hostfile: "localhost slots=2\n"}
    argv = plan.argv
    assert argv[:3] == [sys.executable, "-m", "deepspeed.launcher.runner"]
    assert option(argv, "--hostfile") == str(hostfile)
    assert "--no_ssh" in argv and option(argv, "--node_rank") == "0"
    assert option(argv, "--master_addr") == "127.0.0.1"
    assert argv[-7:] == ["--module", "--no_local_rank", "moe_dist.cli", *TRAIN]
    assert plan.env == {"EVIL": EVIL}


def test_deepspeed_multinode_pdsh_quotes_for_the_remote_shell(tmp_path: Path) -> None:
    c = load_cluster_config(
        ROOT / "configs/cluster/deepspeed-2node.yaml", [f"launch_dir={tmp_path}", f"env={{EVIL: '{EVIL}'}}"]
    )
    plan = build_plan(c, TRAIN)
    run_dir = tmp_path / "moe-ds-2node"
    assert plan.files[run_dir / "hostfile"] == "node001 slots=8\nnode002 slots=8\n"
    assert "--no_ssh" not in plan.argv and option(plan.argv, "--launcher") == "pdsh"
    assert option(plan.argv, "--master_addr") == "node001" and option(plan.argv, "--master_port") == "29500"
    # pdsh pastes `export K=V;` and the program's arguments into a shell line: both arrive quoted
    env_lines = dict(line.split("=", 1) for line in plan.files[run_dir / "deepspeed_env"].splitlines())
    assert shlex.split(env_lines["EVIL"]) == [EVIL]
    assert plan.env == {"DS_ENV_FILE": str(run_dir / "deepspeed_env")}
    program = plan.argv[plan.argv.index("moe_dist.cli") + 1 :]
    assert shlex.split(" ".join(program))[:4] == TRAIN


def test_docker_wrapped_agent(tmp_path: Path) -> None:
    c = cluster(
        tmp_path,
        backend="torchrun",
        procs_per_node=2,
        devices="gpu",
        env={"EVIL": EVIL},
        container={"image": "moe_dist:gpu", "mounts": ["/data:/data:ro"], "workdir": "/work"},
    )
    argv = build_plan(c, TRAIN).argv
    assert argv[:3] == ["docker", "run", "--rm"]
    assert option(argv, "--network") == "host" and option(argv, "--gpus") == "all"
    assert option(argv, "-v") == "/data:/data:ro" and option(argv, "-w") == "/work"
    assert option(argv, "-e") == f"EVIL={EVIL}"
    i = argv.index("--entrypoint")
    assert argv[i : i + 5] == ["--entrypoint", "python", "moe_dist:gpu", "-m", "torch.distributed.run"]


# ---------------------------------------------------------------- SLURM


def render(tmp: Path, config: str, overrides: list[str], train: list[str]) -> tuple[Path, str]:
    c = load_cluster_config(ROOT / "configs/cluster" / config, [f"launch_dir={tmp}", *overrides])
    plan = build_plan(c, train, config)
    assert plan.argv[:2] == ["sbatch", "--parsable"]
    ((script, text),) = plan.files.items()
    assert plan.argv[-1] == str(script)
    return script, text


def test_sbatch_script_for_two_nodes(tmp_path: Path) -> None:
    _, text = render(tmp_path, "slurm-2node-8gpu.yaml", [], ["train", "cfg.yaml"])
    lines = text.splitlines()
    assert lines[0] == "#!/bin/bash"
    for d in ("--nodes=2", "--ntasks-per-node=1", "--gpus-per-node=8", "--job-name=moe-slurm", "--exclusive"):
        assert f"#SBATCH {d}" in lines, d
    assert "set -euo pipefail" in lines
    assert 'head_node=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n1)' in lines
    assert 'rdzv_endpoint="${head_node}:29400"' in lines
    assert "export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1" in lines  # max_restarts: 2
    srun = " ".join(
        line.rstrip("\\").strip()
        for line in lines[lines.index(next(x for x in lines if x.startswith("srun"))) :]
    )
    assert srun.startswith("srun --nodes=2 --ntasks-per-node=1 --kill-on-bad-exit=1 --container-image=")
    assert (
        'python -m torch.distributed.run --nnodes 2 --rdzv-backend c10d --rdzv-endpoint "$rdzv_endpoint" '
        '--rdzv-id "$SLURM_JOB_ID" --rdzv-conf join_timeout=600,last_call_timeout=30 --nproc-per-node 8 '
        "--max-restarts 2 -m moe_dist.cli train cfg.yaml"
    ) in srun
    assert subprocess.run(["bash", "-n"], input=text, text=True).returncode == 0


RECORDER = """#!{python}
import json, os, sys
with open(os.environ["RECORD"], "a") as f:
    f.write(json.dumps({{"argv": sys.argv[1:], "EVIL": os.environ.get("EVIL")}}) + "\\n")
"""


def test_sbatch_script_quoting_under_bash(tmp_path: Path) -> None:
    """Run the rendered script with bash, with `srun` recording the argument list it gets."""
    script, text = render(
        tmp_path,
        "slurm-2node-8gpu.yaml",
        ["container=null", f"env={{EVIL: '{EVIL}'}}", "python=python3"],
        TRAIN,
    )
    script.parent.mkdir(parents=True, exist_ok=True)
    script.write_text(text)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text(RECORDER.format(python=sys.executable))
    (bin_dir / "scontrol").write_text("#!/bin/sh\nprintf 'gpu017\\ngpu018\\n'\n")
    for p in bin_dir.iterdir():
        p.chmod(0o755)
    record = tmp_path / "record.jsonl"
    env = {
        "PATH": f"{bin_dir}:{os.environ['PATH']}",
        "RECORD": str(record),
        "SLURM_JOB_NODELIST": "gpu[017-018]",
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NUM_NODES": "2",
    }
    out = subprocess.run(
        ["bash", str(script)], env=env, cwd=tmp_path, capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    assert "rendezvous at gpu017:29400" in out.stdout
    (got,) = [json.loads(line) for line in record.read_text().splitlines()]
    assert got["EVIL"] == EVIL
    argv = got["argv"]
    assert argv[:3] == ["--nodes=2", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
    assert option(argv, "--rdzv-endpoint") == "gpu017:29400" and option(argv, "--rdzv-id") == "4242"
    assert EVIL_ARG in argv and argv[argv.index("moe_dist.cli") + 1 :][:4] == TRAIN
    assert not (tmp_path / "PWNED").exists()


def test_sbatch_apptainer_and_extra_directives(tmp_path: Path) -> None:
    _, text = render(
        tmp_path,
        "slurm-2node-8gpu.yaml",
        [
            "container.runtime=apptainer",
            "container.image=/img/moe.sif",
            "slurm.directives=[--constraint=h100]",
            "slurm.account=proj1",
        ],
        ["train", "cfg.yaml"],
    )
    assert "#SBATCH --constraint=h100" in text and "#SBATCH --account=proj1" in text
    assert "apptainer exec --nv --bind /shared:/shared --pwd /shared/moe_dist /img/moe.sif python -m" in text
    assert "--container-image" not in text
