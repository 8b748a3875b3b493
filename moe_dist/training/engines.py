"""Which engine trains a config: ``parallel.engine`` -> what ``training.run.train`` is given.

DeepSpeed is imported only when a config asks for it; the loop itself imports neither engine.
"""

from __future__ import annotations

from moe_dist.config import Config
from moe_dist.training.native_engine import NativeEngine
from moe_dist.training.run import EngineFactory


def engine_for(cfg: Config) -> EngineFactory:
    if cfg.parallel.engine == "deepspeed":
        from moe_dist.integrations.deepspeed_engine import DeepSpeedEngine  # noqa: PLC0415 - only when asked

        return DeepSpeedEngine
    return NativeEngine
