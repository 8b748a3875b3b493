"""Cluster launch: cluster YAML -> the real command for torchrun, deepspeed, mpirun or SLURM.

``moe-dist launch CLUSTER.yaml -- train CONFIG.yaml`` (see ``command.py``); one file per
backend; ``cluster_config.py`` holds the schema.
"""

from moe_dist.launcher.cluster_config import ClusterConfig, load_cluster_config
from moe_dist.launcher.command import build_plan, main
from moe_dist.launcher.plan import LaunchPlan

__all__ = ["ClusterConfig", "LaunchPlan", "build_plan", "load_cluster_config", "main"]
