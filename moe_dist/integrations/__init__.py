"""Our router and balancing-loss plugins inside other MoE stacks.

- `moe_dist.integrations.deepspeed_moe`: `MoeDistGate` (a DeepSpeed ``TopKGate``) and
  `build_deepspeed_moe` (a ``deepspeed.moe.layer.MoE`` with it); `deepspeed_engine`: training
  through ``deepspeed.initialize`` (``parallel.engine: deepspeed``).
- `moe_dist.integrations.megatron`: `MoeDistRouter` (a Megatron-Core ``TopKRouter``),
  `get_gpt_layer_spec_with_router` and `after_step`.

Both adapters hold one ``moe_dist.layers.gate.Gate`` as ``.gate`` (router + losses + statistics,
the native ``MoELayer``'s), so ``moe_dist.training.step_hook.finish_step`` and telemetry take them
as they take our layers.

Submodules are not imported here: each needs its framework installed (extras ``deepspeed``, ``megatron``).
"""
