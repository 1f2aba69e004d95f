"""The ``grpo`` part of ``experiments/gpu_check.py``: steps of the real GRPO trainer.

Random-init Qwen2.5-0.5B (a one-layer toy with ``--tiny``), the paper's step at a reduced
shape (8 prompts x 8 samples, 256 new tokens), beta > 0 so that the reference pass runs.
Each phase is timed at the trainer's own seams (sampling, reference log-probs, the
micro-batch gradient, the optimizer step), device work waited for inside the phase.
``sparse`` (99%, fused sparse AdamW) and ``full`` (dense AdamW) run in separate processes,
so each peak device memory is its own.
"""

from __future__ import annotations

import time
from collections import defaultdict


class IdTokenizer:
    """What the GRPO trainer needs of a tokenizer, for a random model: ids as characters.

    Any id decodes (a random model samples the whole vocabulary), ``len`` is the
    vocabulary size, and id 0 is both end-of-sequence and padding.
    """

    eos_token_id = 0
    pad_token_id = 0

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def __len__(self) -> int:
        return self.vocab_size

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        del skip_special_tokens
        return "".join(chr(33 + int(i) % 90) for i in ids if int(i) != 0)


def distinct_chars_reward(completions, answers):
    """A reward with spread on a random model: distinct characters / 8."""
    del answers
    return [len(set(c)) / 8.0 for c in completions]


def run_grpo(ctx, variant: str) -> None:
    """Steps of the real GRPOTrainer, random-init Qwen2.5-0.5B (tiny model with --tiny)."""
    import jax
    import numpy as np
    from flax import nnx

    from sparsejax.models import config as model_config
    from sparsejax.models.decoder import init_model
    from sparsejax.runs.reporting import peak_memory_bytes
    from sparsejax.trainable.base import tree_bytes
    from sparsejax.trainers import GRPOConfig, GRPOTrainer, TrainableConfig

    if ctx.tiny:
        cfg = model_config.DecoderConfig(
            model_type="qwen2", vocab_size=256, hidden_size=32, intermediate_size=64,
            num_layers=1, num_heads=2, num_kv_heads=1, head_dim=16, qkv_bias=True)
        shape = dict(prompts_per_step=2, num_generations=2, max_new_tokens=8,
                     micro_batch_size=2, generation_batch_size=4)
        lengths = (3, 9)
    else:
        cfg = model_config.preset("Qwen2.5-0.5B")
        shape = dict(prompts_per_step=8, num_generations=8, max_new_tokens=256,
                     micro_batch_size=16, generation_batch_size=64)
        lengths = (90, 180)  # GSM8K prompts in the Qwen2.5 chat template
    sparsity = 0.99 if variant == "sparse" else 0.0
    steps = 2
    # beta > 0, so that the reference phase runs; remat as the trainer's default on a GPU
    gcfg = GRPOConfig(steps=steps, beta=0.04, seed=0, remat="none" if ctx.tiny else "layer",
                      **shape)
    scfg = TrainableConfig(sparsity=sparsity, learning_rate=1e-4 if sparsity else 1e-6)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(1, cfg.vocab_size, rng.integers(*lengths)).tolist()
               for _ in range(shape["prompts_per_step"])]
    graphdef, params = nnx.split(init_model(cfg, seed=0))
    trainer = GRPOTrainer(graphdef, params, IdTokenizer(cfg.vocab_size),
                          distinct_chars_reward, gcfg, scfg, ctx.out / f"grpo_{variant}")
    ctx.result.update(model="tiny" if ctx.tiny else "Qwen2.5-0.5B", variant=variant,
                      sparsity=sparsity, param_dtype=cfg.param_dtype,
                      trainable=int(trainer.trainable.num_trainable(trainer.params)),
                      optimizer_state_bytes=int(tree_bytes(trainer.opt_state)),
                      shape=shape, beta=gcfg.beta)
    ctx.flush()
    phases = defaultdict(float)

    def timed(name, fn, block=False):
        def call(*args, **kwargs):
            t0 = time.perf_counter()
            out = fn(*args, **kwargs)
            if block:
                jax.block_until_ready(out)
            phases[name] += time.perf_counter() - t0
            return out
        return call

    # The trainer's own seams, one per phase (instance attributes, so nothing global).
    for obj, attr, phase, block in ((trainer, "_sample", "generation", False),
                                    (trainer, "_scored_logprobs", "reference", False),
                                    (trainer, "_grad_fn", "backward", True),
                                    (trainer.trainable, "apply", "optimizer", True)):
        try:
            setattr(obj, attr, timed(phase, getattr(obj, attr), block))
        except AttributeError:
            ctx.result["notes"].append(f"phase {phase} not timed: {type(obj).__name__} "
                                       f"has no settable {attr}")
    for step in range(steps):
        phases.clear()
        rec = trainer.train_step(prompts, ["0"] * len(prompts))
        row = {"step": step, "includes_compile": step == 0, **{
            f"{k}_s": phases.get(k, 0.0) for k in ("generation", "reference", "backward",
                                                     "optimizer")}}
        row["step_s"] = rec["step_time"]
        row["other_s"] = rec["step_time"] - sum(phases.values())
        for k in ("tokens_per_s", "generation_compile_time", "completion_length",
                  "decode_steps", "slot_occupancy", "loss", "reward_mean", "grad_norm"):
            if k in rec:
                row[k] = rec[k]
        row["peak_memory_bytes"] = peak_memory_bytes()
        ctx.result["rows"].append(row)
        ctx.flush()
    last = ctx.result["rows"][-1]
    peak = last["peak_memory_bytes"]
    ctx.result["summary"] = (
        f"{variant}: step {last['step_s']:.3g} s (gen {last['generation_s']:.3g}, ref "
        f"{last['reference_s']:.3g}, bwd {last['backward_s']:.3g}, opt "
        f"{last['optimizer_s']:.3g}), first step {ctx.result['rows'][0]['step_s']:.3g} s"
        + (f", peak {peak / 2**30:.2f} GiB" if peak else ", peak memory not reported"))


def run_grpo_step(ctx) -> None:
    """``bench_grpo_step.py``: whole GRPO steps of TRL and sparsejax (99% sparse, full).

    The CPU benchmark's workload (8 prompts x 8 samples, 128 new tokens, ``dapo``, micro-
    batch 8) on a random SmolLM2-135M-shaped model in bfloat16, every micro-batch's
    forward/backward computed as TRL's are. TRL runs when ``trl`` is installed (its arm
    left out and said so otherwise).
    """
    import importlib.util

    from gpu_check_parts import run_script
    arms = ["sparse", "full"]
    if importlib.util.find_spec("trl") and importlib.util.find_spec("torch"):
        arms.insert(0, "trl")
    else:
        ctx.result["notes"].append("trl or torch not installed: the TRL arm is left out "
                                   "(carry the trl wheel: docs/gpu.md)")
    wanted = [(("--arms",), ",".join(arms))]
    if ctx.tiny:
        wanted.append((("--tiny",), None))
    else:
        # A random model's rewards have no spread: without --no-skip the exact skip of
        # zero-advantage micro-batches would drop every backward of sparsejax's arms.
        wanted += [(("--random-preset",), "SmolLM2-135M"), (("--dtype",), "bfloat16"),
                   (("--steps",), "3"), (("--no-skip",), None)]
    record = run_script(ctx, "bench_grpo_step", wanted)
    ctx.result.update(model=record.get("settings", {}).get("model_dir"),
                      device=record.get("device"))
    for arm, r in record.get("arms", {}).items():
        ctx.result["rows"].append({"arm": arm, **{k: r.get(k) for k in (
            "step_s_median", "first_step_s", "sample_s_median", "compile_s_first",
            "compile_s_later", "completion_tokens_per_s", "ratio_to_trl")}})
    ctx.result["summary"] = ", ".join(
        f"{r['arm']} {r['completion_tokens_per_s']:.0f} tok/s"
        + (f" ({r['ratio_to_trl']:.2f}x TRL)" if r.get("ratio_to_trl") else "")
        for r in ctx.result["rows"])
