"""sparsejax: sparse RL finetuning of LLMs in JAX."""
