"""Cluster launch: cluster YAML -> the real command for torchrun, deepspeed, mpirun or SLURM.

``moe-dist launch CLUSTER.yaml -- train CONFIG.yaml`` (see ``moe_dist/commands/launch.py``); one file per
backend; ``cluster_config.py`` holds the schema, ``cluster_checks.py`` the checks across fields,
``cluster_loading.py`` the YAML and ``--set`` loading.
"""

from moe_dist.launcher.cluster_config import ClusterConfig
from moe_dist.launcher.cluster_loading import load_cluster_config
from moe_dist.launcher.plan import LaunchPlan

__all__ = ["ClusterConfig", "LaunchPlan", "load_cluster_config"]
