"""Typed configuration: the schema (``schema.py``, plugin sections resolved in ``plugins.py``),
its loading from YAML with ``--set`` overrides (``loading.py``) and its errors (``errors.py``).

``from moe_dist.config import Config, ConfigError, load_config`` is the public surface.
"""

from moe_dist.config.errors import ConfigError, format_pydantic_errors
from moe_dist.config.loading import apply_overrides, config_from_dict, config_to_dict, load_config, read_yaml
from moe_dist.config.schema import (
    CheckpointConfig,
    Config,
    DataConfig,
    EpTransport,
    EvalConfig,
    ExpertsConfig,
    HFDataConfig,
    ModelConfig,
    MoEConfig,
    OptimizerConfig,
    ParallelConfig,
    RunConfig,
    ScheduleConfig,
    Section,
    SharedExpertsConfig,
    TelemetryConfig,
    TokenizerConfig,
    check_world_size,
    cross_field_errors,
    deepspeed_engine_errors,
    validate_moe,
    world_size_errors,
)

__all__ = [
    "CheckpointConfig",
    "Config",
    "ConfigError",
    "DataConfig",
    "EpTransport",
    "EvalConfig",
    "ExpertsConfig",
    "HFDataConfig",
    "ModelConfig",
    "MoEConfig",
    "OptimizerConfig",
    "ParallelConfig",
    "RunConfig",
    "ScheduleConfig",
    "Section",
    "SharedExpertsConfig",
    "TelemetryConfig",
    "TokenizerConfig",
    "apply_overrides",
    "check_world_size",
    "config_from_dict",
    "config_to_dict",
    "cross_field_errors",
    "deepspeed_engine_errors",
    "format_pydantic_errors",
    "load_config",
    "read_yaml",
    "validate_moe",
    "world_size_errors",
]
