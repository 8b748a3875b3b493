"""Our router and balancing-loss plugins inside other MoE stacks.

- `moe_dist.integrations.deepspeed_moe`: `MoeDistGate` (a DeepSpeed ``TopKGate``) and
  `build_deepspeed_moe` (a ``deepspeed.moe.layer.MoE`` with it); `deepspeed_engine`: training
  through ``deepspeed.initialize`` (``parallel.engine: deepspeed``).
- `moe_dist.integrations.megatron`: `MoeDistRouter` (a Megatron-Core ``TopKRouter``) and
  `get_gpt_layer_spec_with_router`.
- `moe_dist.integrations.plugin_routing`: `PluginRouting`, the router + losses + statistics both
  adapters share, and `after_step`.

Submodules are not imported here: each needs its framework installed (extras ``deepspeed``, ``megatron``).
"""
