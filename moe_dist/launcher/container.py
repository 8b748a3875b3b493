"""Wrap a node's launcher command in ``docker run`` (backends local and torchrun).

Host networking and IPC: NCCL/gloo and the rendezvous need the node's real addresses, and
PyTorch's shared-memory transport needs more than Docker's 64 MB ``/dev/shm``. The image's
ENTRYPOINT is ``moe-dist``; we override it with the interpreter so the same argument list runs.
"""

from __future__ import annotations

from moe_dist.launcher.cluster_config import ClusterConfig


def docker_wrap(cluster: ClusterConfig, argv: list[str], env: dict[str, str]) -> list[str]:
    """``docker run ... IMAGE argv[1:]`` with ``argv[0]`` as entrypoint and ``env`` as ``-e``."""
    c = cluster.container
    assert c is not None and c.runtime == "docker"
    out = ["docker", "run", "--rm", "--network", "host", "--ipc", "host", "--init"]
    if cluster.devices == "gpu":
        out += ["--gpus", "all", "--ulimit", "memlock=-1", "--ulimit", "stack=67108864"]
    for m in c.mounts:
        out += ["-v", m]
    if c.workdir:
        out += ["-w", c.workdir]
    for k, v in env.items():
        out += ["-e", f"{k}={v}"]
    return [*out, "--entrypoint", argv[0], c.image, *argv[1:]]
