"""Cluster launch: cluster YAML -> the real command for torchrun, deepspeed, mpirun or SLURM.

``moe-dist launch CLUSTER.yaml -- train CONFIG.yaml`` (see ``moe_dist/commands/launch.py``); one file per
backend; ``cluster_config.py`` holds the schema.
"""

from moe_dist.launcher.cluster_config import ClusterConfig, load_cluster_config
from moe_dist.launcher.plan import LaunchPlan

__all__ = ["ClusterConfig", "LaunchPlan", "load_cluster_config"]
