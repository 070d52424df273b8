"""Single-process MoE model core: config, maths, checkpoints, KV cache, generation."""
