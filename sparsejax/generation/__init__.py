"""Sampling from the decoder: the batch sampler and chat encoding
(:mod:`sparsejax.generation.sampler`) and the slot sampler of GRPO rollouts
(:mod:`sparsejax.generation.rollouts`)."""
