"""The toy RLVR experiment's runs: the task, the SFT base model, and one GRPO run.

:class:`Experiment` holds what every run shares (splits, tokenizer, the SFT base
params, the GRPO settings); :meth:`Experiment.run` is one GRPO run from that base
through the trainers' own seam: full finetuning, a mask (``TrainableConfig`` /
``mask=``), or any ``trainable=`` (e.g. :class:`sparsejax.trainable.LoraAdapter`), and
returns its curve and final accuracy (greedy exact match on the held-out test split).
"""

from __future__ import annotations

import dataclasses
import os
import re
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm import tqdm

from sparsejax.data import toy_task as tt
from sparsejax.models import init_model
from sparsejax.trainers import GRPOConfig, GRPOTrainer, TrainableConfig

# ----------------------------------------------------------------------------- helpers


def host_copy(tree: Any) -> Any:
    """A host (NumPy) copy of a pytree: safe from buffer donation by the trainer."""
    return jax.tree.map(lambda x: np.array(x, copy=True), tree)


def device_copy(tree: Any) -> Any:
    """Fresh device arrays for a trainer to own (it donates its params)."""
    return jax.tree.map(jnp.array, tree)


def total_params(tree: Any) -> int:
    return int(sum(np.size(x) for x in jax.tree.leaves(tree)))


def fmt_pct(x: float | None, digits: int = 1) -> str:
    return "n/a" if x is None else f"{100 * x:.{digits}f}%"


def sparsity_name(s: float) -> str:
    return "full" if s == 0 else f"{100 * s:g}%"


# ----------------------------------------------------------------------------- runs


# Kinds of run whose mask (or adapter) is drawn from a seed.
MASK_SEEDED = ("random", "lora", "masked_lora", "partial_lora", "targeted_lora")


@dataclasses.dataclass
class RunResult:
    """One GRPO run: its settings, its curve and where it ended."""

    name: str
    kind: str  # full | random | diff_mask | entropy | lora | masked_lora | partial_lora | ...
    sparsity: float
    learning_rate: float
    trainable: int
    trainable_fraction: float
    final_accuracy: float
    curve: list[tuple[int, float]]
    train_reward: list[float]
    seconds: float
    mask_seed: int | None = None
    top_entropy_quantile: float = 1.0
    strategy: str = "per_tensor"
    sampling_seed: int = 0

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Experiment:
    """Holds the task, the SFT base model and the GRPO settings shared by every run."""

    def __init__(self, preset: Any, seed: int, progress: bool, workdir: str):
        self.p, self.seed, self.progress, self.workdir = preset, seed, progress, workdir
        self.writer = None  # a sparsejax.runs.metric_writers writer (--report-to), or None
        self.tokenizer = tt.build_tokenizer()
        self.sft_dev = tt.make_problems(preset.sft_dev, seed=seed * 1000 + 1,
                                        digits=preset.digits)
        self.test = tt.make_problems(preset.test, seed=seed * 1000 + 2, digits=preset.digits,
                                     exclude=self.sft_dev)
        self.train = tt.make_problems(preset.train_prompts, seed=seed * 1000 + 3,
                                      digits=preset.digits, exclude=self.sft_dev + self.test)
        self.train_ids = tt.encode_prompts(self.tokenizer, self.train)
        self.train_answers = [q.answer for q in self.train]
        self.test_ids = tt.encode_prompts(self.tokenizer, self.test)
        self.test_answers = [q.answer for q in self.test]
        self.model_cfg = tt.model_config(self.tokenizer, hidden_size=preset.hidden_size,
                                         num_layers=preset.num_layers)
        self.graphdef, params = nnx.split(init_model(self.model_cfg, seed=seed))
        self.base = None  # host params after SFT
        self.sft_history: list[dict[str, Any]] = []
        self.sft_seconds = 0.0
        self.base_accuracy = None
        self.total = total_params(params)
        self._init_params = params

    def run_sft(self) -> None:
        """Supervised warm-up into the accuracy band; sets ``self.base``."""
        t0 = time.perf_counter()
        bar = tqdm(total=self.p.sft.max_steps, desc="SFT", disable=not self.progress)

        def report(rec: dict[str, Any]) -> None:
            self.log(rec["step"], {"sft/loss": rec["loss"], "sft/dev_accuracy": rec["accuracy"]})
            bar.update(rec["step"] - bar.n)
            bar.set_postfix(loss=f"{rec['loss']:.3f}", dev_acc=f"{rec['accuracy']:.3f}")

        sft_cfg = dataclasses.replace(self.p.sft, seed=self.seed)
        params, self.sft_history = tt.sft_warmup(self.graphdef, self._init_params,
                                                 self.tokenizer, self.sft_dev, sft_cfg,
                                                 digits=self.p.digits, progress=report)
        bar.close()
        self.base = host_copy(params)
        self.sft_seconds = time.perf_counter() - t0
        self.base_accuracy = self.accuracy(self.base)

    def log(self, step: int, scalars: dict[str, Any]) -> None:
        if self.writer is not None:
            self.writer.write_scalars(step, scalars)

    @staticmethod
    def tag(name: str) -> str:
        """A run's name as a metric prefix ("random 99% seed 0" -> "random_99pct_seed_0")."""
        return re.sub(r"[^A-Za-z0-9.\-]+", "_", name.replace("%", "pct")).strip("_")

    def accuracy(self, params: Any) -> float:
        return tt.greedy_accuracy(self.graphdef, device_copy(params), self.tokenizer,
                                  self.test, digits=self.p.digits,
                                  batch_size=min(256, len(self.test)))

    def grpo_config(self, top_entropy_quantile: float = 1.0,
                    seed: int | None = None) -> GRPOConfig:
        p = self.p
        per_step = p.prompts_per_step * p.num_generations
        return GRPOConfig(
            steps=p.steps, prompts_per_step=p.prompts_per_step,
            num_generations=p.num_generations, max_new_tokens=tt.max_answer_tokens(p.digits),
            temperature=1.0, generation_batch_size=per_step, micro_batch_size=per_step,
            logprob_chunk_size=4096, eval_batch_size=min(256, len(self.test)),
            top_entropy_quantile=top_entropy_quantile,
            seed=self.seed if seed is None else seed)

    @staticmethod
    def sparse_config(sparsity: float, lr: float, *, mask_seed: int = 0,
                      strategy: str = "per_tensor") -> TrainableConfig:
        """The optimizer settings of every run (an trainable is built with these too)."""
        return TrainableConfig(sparsity=sparsity, mask_seed=mask_seed, mask_strategy=strategy,
                            learning_rate=lr, weight_decay=0.0, max_grad_norm=1.0,
                            backend="xla")

    def run(self, name: str, kind: str, sparsity: float, lr: float, *, mask_seed: int = 0,
            mask: Any = None, top_entropy_quantile: float = 1.0, strategy: str = "per_tensor",
            snapshot_steps: int = 0, trainable: Any = None, sampling_seed: int | None = None
            ) -> tuple[RunResult, Any, list[Any], Any]:
        """One GRPO run from the SFT base.

        ``trainable`` (e.g. a :class:`sparsejax.trainable.LoraAdapter` built on the base params)
        replaces the mask / full finetuning of ``sparsity``; ``sampling_seed`` replaces
        the experiment's seed as the GRPO sampling seed.

        Returns ``(result, final host params, snapshots, mask)``; ``snapshots`` holds
        host copies of the params after steps ``0..snapshot_steps`` (step 0 = base);
        with an adapter the final params hold its ``LoraWeight`` nodes.
        """
        t0 = time.perf_counter()
        cfg = self.grpo_config(top_entropy_quantile, sampling_seed)
        sparse = self.sparse_config(sparsity if trainable is None else 0.0, lr,
                                    mask_seed=mask_seed, strategy=strategy)
        if mask is not None:
            # A given mask takes the sparse path; ``sparsity`` only labels the run.
            sparse = dataclasses.replace(sparse, sparsity=min(max(sparsity, 1e-9), 1 - 1e-9))
        trainer = GRPOTrainer(self.graphdef, device_copy(self.base), self.tokenizer,
                              tt.reward_fn, cfg, sparse, os.path.join(self.workdir, name),
                              mask=mask, trainable=trainable)
        trainable = trainer.trainable.num_trainable(trainer.params)
        snapshots = [host_copy(self.base)] if snapshot_steps else []
        eval_at = set(np.linspace(0, cfg.steps, self.p.eval_points + 2).round().astype(int)
                      .tolist()[1:-1])
        curve = [(0, self.base_accuracy)]
        rewards = []
        bar = tqdm(range(cfg.steps), desc=f"GRPO {name}", disable=not self.progress,
                   leave=False)
        for _ in bar:
            if trainable:
                rec = trainer.train_step(self.train_ids, self.train_answers)
            else:  # nothing to train (e.g. 99.999% of a tiny model): the base model
                rec = {"reward_mean": float("nan")}
                trainer.step += 1
            rewards.append(rec["reward_mean"])
            self.log(trainer.step - 1, {f"{self.tag(name)}/reward_mean": rec["reward_mean"]})
            bar.set_postfix(reward=f"{rec['reward_mean']:.3f}")
            if trainer.step <= snapshot_steps:
                snapshots.append(host_copy(trainer.params))
            if trainer.step in eval_at:
                curve.append((trainer.step, self.accuracy(trainer.params)))
        final = host_copy(trainer.params)
        acc = self.accuracy(final)
        curve.append((cfg.steps, acc))
        for step, value in curve:
            self.log(step, {f"{self.tag(name)}/accuracy": value})
        result = RunResult(name=name, kind=kind, sparsity=sparsity, learning_rate=lr,
                           trainable=trainable, trainable_fraction=trainable / self.total,
                           final_accuracy=acc, curve=curve, train_reward=rewards,
                           seconds=time.perf_counter() - t0,
                           mask_seed=mask_seed if kind in MASK_SEEDED else None,
                           top_entropy_quantile=top_entropy_quantile,
                           strategy=strategy if kind == "random" else "-",
                           sampling_seed=cfg.seed)
        return result, final, snapshots, trainer.trainable.mask
