"""GRPO (Shao et al., DeepSeekMath) with sparse or full finetuning.

One step::

    prompts --sampler(policy, KV cache)--> completions --reward fn--> rewards
      --group--> advantages --> log-probs (policy [, reference]) --> grpo_loss
      --> gradients at the active entries (micro-batched, accumulated)
      --> fused sparse AdamW step (or dense optax.adamw) --> next step

Everything a step needs is a function of the step number and the checkpoint (prompt
order, PRNG keys), so ``resume`` continues exactly as an uninterrupted run would.
A sparse run's checkpoint holds the ``k`` trained values and the optimizer state; the
rest of the model comes from the base weights the run was started from.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsejax import losses
from sparsejax.config import GRPOConfig, TrainableConfig
from sparsejax.data.order import prompt_order
from sparsejax.generation.rollouts import rollout
from sparsejax.generation.sampler import SamplingParams, bucket_length, left_pad
from sparsejax.models.decoder import reconfigure
from sparsejax.models.logprobs import completion_logprobs
from sparsejax.parallel import sharding as sharding_lib
from sparsejax.parallel.distributed import host_array
from sparsejax.rewards.arguments import call_reward, check_columns, check_reward_arguments, repeat_rows
from sparsejax.runs import checkpoint as ckpt_lib
from sparsejax.runs.reporting import compile_count, compile_seconds, peak_memory_bytes, plot_curves
from sparsejax.runs.run import PolicyRun, tree_digest
from sparsejax.trainable import reference as reference_lib
from sparsejax.trainable.base import Trainable, trainer_mesh, zero_gradient
from sparsejax.trainable.build import build_trainable
from sparsejax.trainers import generation_batch
from sparsejax.trainers.generation_batch import GenerationBatch
from sparsejax.trainers.grpo_step import accumulate_micro_batch
from sparsejax.types import PyTree

RewardFn = Callable[[Sequence[str], Sequence[Any]], Sequence[float]]


class GRPOTrainer(PolicyRun):
    """Trains a :class:`~sparsejax.models.Decoder` with GRPO.

    Args:
        graphdef, params: ``nnx.split`` of the policy (the base model).
        tokenizer: a transformers tokenizer (decoding completions, saving the model).
        reward_fn: ``reward_fn(completions, answers, **kwargs) -> rewards`` (one float
            each), given as keyword arguments those of ``prompts`` (each completion's
            prompt text), ``completion_ids`` and the data's ``columns`` (see :meth:`train`)
            that its signature takes (:func:`sparsejax.rewards.arguments.call_reward`);
            ``accuracy`` in the metrics is the fraction of rewards >= 1. A reward that
            keeps a ``last_means`` dict after each call (a
            :class:`sparsejax.rewards.CombinedReward` does: each term's batch mean) adds
            ``reward/<name>`` (train) and ``eval_reward/<name>`` (eval) to the metrics.
        config, trainable_config: the run's :class:`GRPOConfig` and :class:`TrainableConfig`.
        out_dir: where metrics, checkpoints, plots and the final model go.
        stop_token_ids: tokens that end a completion (the tokenizer's EOS by default).
        mesh: a mesh spec or :class:`jax.sharding.Mesh` (default ``config.mesh``): params,
            mask, optimizer state and reference values are placed by
            :mod:`sparsejax.parallel.sharding`, rollouts and micro-batches split along the batch.
    """

    def __init__(self, graphdef: nnx.GraphDef, params: PyTree, tokenizer: Any,
                 reward_fn: RewardFn, config: GRPOConfig, trainable_config: TrainableConfig,
                 out_dir: str | os.PathLike, *, stop_token_ids: Sequence[int] | None = None,
                 mask: PyTree | None = None, trainable: Trainable | None = None,
                 mesh: Any = None):
        self.graphdef, self.params = graphdef, params
        self.graphdef = reconfigure(graphdef, params, remat=config.remat)
        self.tokenizer, self.reward_fn = tokenizer, reward_fn
        self.cfg, self.trainable_cfg = config, trainable_config
        self.out_dir = os.fspath(out_dir)
        os.makedirs(self.out_dir, exist_ok=True)
        if stop_token_ids is None:
            stop_token_ids = [tokenizer.eos_token_id]
        self.stop_token_ids = tuple(int(t) for t in stop_token_ids if t is not None)
        pad = tokenizer.pad_token_id
        self.pad_id = int(self.stop_token_ids[0] if pad is None else pad)
        self.mesh = trainer_mesh(mesh, config.mesh, trainable)
        if self.mesh is not None:
            for name, size in (("micro_batch_size", config.micro_batch_size),
                               ("prompts_per_step", config.prompts_per_step),
                               ("generation_batch_size", min(
                                   config.generation_batch_size,
                                   generation_batch.rows_per_generation(config)))):
                sharding_lib.check_batch(name, size, self.mesh)
        # What trains: given (e.g. a sparsejax.trainable.LoraAdapter) or built from the config.
        self.trainable = (build_trainable(trainable_config, params, mask=mask, mesh=self.mesh,
                                          total_steps=config.steps)
                          if trainable is None else trainable)
        self.params = params = self.trainable.policy_params(params)
        self.opt_state = self.trainable.init(params)
        # The reference model of the KL term (only when beta > 0), kept as the variant
        # keeps it: the base values of the trained entries, or a device copy of the params.
        self.base_policy = (self.trainable.base_policy(params, self.opt_state)
                            if config.beta > 0 else None)
        self.step = 0
        self.generation: GenerationBatch | None = None  # the batch being trained on
        self.prompt_capacity = 8  # the widest prompt's padded width (set by train)
        self.base_key = jax.random.key(config.seed)
        self.checkpoints = ckpt_lib.CheckpointManager(
            os.path.join(self.out_dir, "checkpoints"), keep=config.keep_checkpoints)
        # (loss, metrics, acc + grads) of a micro-batch, summed into the donated
        # accumulator; the accumulator starts from zeros shaped and placed like a gradient.
        self._grad_fn = jax.jit(functools.partial(accumulate_micro_batch, self.graphdef,
                                                  self.trainable, config), donate_argnums=0)
        self._zero_grads = jax.jit(functools.partial(zero_gradient, self.trainable))
        self._mean_grads = jax.jit(lambda acc, n: jax.tree.map(lambda g: g / n, acc),
                                   donate_argnums=0, static_argnums=1)
        self._logps_fn = jax.jit(self._policy_logprobs)

    # ------------------------------------------------------------------ pieces

    def _policy_logprobs(self, params, prompt_tokens, prompt_mask, tokens, mask):
        return completion_logprobs(
            self.graphdef, params, prompt_tokens, prompt_mask, tokens, mask,
            temperature=self.cfg.temperature, chunk_size=self.cfg.logprob_chunk_size)

    def _sample(self, prompt_ids: list[list[int]], key: jax.Array, sampling: SamplingParams,
                *, num_samples: int, num_slots: int, prompts_per_call: int,
                prompt_capacity: int | None = None
                ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
        """``num_samples`` completions of each prompt (prompt-major rows) and their cost.

        Prompts go to :func:`sparsejax.generation.rollouts.rollout` ``prompts_per_call`` at a time
        (each prefilled once, its samples decoded in ``num_slots`` slots); the last
        call is padded to the same count (no recompiles) and the padding dropped.
        ``prompt_capacity`` (default: the longest of ``prompt_ids``) sizes the decode
        program, so that calls with shorter prompts reuse it.
        Returns the samples and ``{compile_s, run_s, decode_steps, slot_steps,
        useful_tokens}`` summed over the calls.
        """
        if prompt_capacity is None:
            prompt_capacity = max(len(p) for p in prompt_ids)
        chunks, cost = [], dict.fromkeys(("compile_s", "run_s", "decode_steps",
                                          "slot_steps", "useful_tokens"), 0.0)
        for i, start in enumerate(range(0, len(prompt_ids), prompts_per_call)):
            ids = prompt_ids[start:start + prompts_per_call]
            real = len(ids) * num_samples
            ids = ids + [ids[-1]] * (prompts_per_call - len(ids))
            tokens, mask = left_pad(ids, self.pad_id)
            split = (self.mesh is not None
                     and num_slots % sharding_lib.batch_size_of(self.mesh) == 0)
            out = rollout(self.graphdef, self.params, tokens, mask, jax.random.fold_in(key, i),
                          sampling, num_samples=num_samples, num_slots=num_slots,
                          pad_id=self.pad_id, prompt_capacity=prompt_capacity,
                          batch_sharding=(
                              sharding_lib.batch_sharding(self.mesh) if split else None))
            chunks.append({k: v[:real] for k, v in out._asdict().items() if k != "stats"})
            for k in cost:
                cost[k] += getattr(out.stats, k)
        # Calls may bucket their prompts to different widths: left pad to the widest.
        width = max(c["prompt_tokens"].shape[1] for c in chunks)
        for c in chunks:
            extra = width - c["prompt_tokens"].shape[1]
            c["prompt_tokens"] = np.pad(c["prompt_tokens"], ((0, 0), (extra, 0)),
                                        constant_values=self.pad_id)
            c["prompt_mask"] = np.pad(c["prompt_mask"], ((0, 0), (extra, 0)))
        return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}, cost

    def _reward_terms(self, prefix: str) -> dict[str, float]:
        """``{prefix + name: mean}`` of the reward's ``last_means`` (empty without)."""
        means = getattr(self.reward_fn, "last_means", None)
        if not isinstance(means, dict):
            return {}
        return {f"{prefix}{name}": float(v) for name, v in means.items()}

    def _rewards(self, texts: list[str], answers: list[Any], prompt_ids: Sequence[Sequence[int]],
                 rows: Sequence[int], repeat: int, columns: dict[str, list[Any]] | None,
                 samples: dict[str, np.ndarray]) -> np.ndarray:
        """The reward of each completion (``repeat`` per prompt ``rows[j]``, prompt-major):
        ``reward_fn(texts, answers, prompts=..., completion_ids=..., **columns)``, each
        keyword one value per completion, passed as far as the reward's signature takes it."""
        prompts = [self.tokenizer.decode([int(t) for t in prompt_ids[i]], skip_special_tokens=False)
                   for i in rows]
        kwargs = {"prompts": [p for p in prompts for _ in range(repeat)],
                  "completion_ids": [t[m.astype(bool)].tolist()
                                     for t, m in zip(samples["tokens"], samples["mask"])],
                  **repeat_rows(columns or {}, rows, repeat)}
        return np.asarray(call_reward(self.reward_fn, texts, answers, kwargs), np.float32)

    def _decode(self, tokens: np.ndarray, mask: np.ndarray) -> list[str]:
        return [self.tokenizer.decode(t[m.astype(bool)].tolist(), skip_special_tokens=True)
                for t, m in zip(tokens, mask)]

    def _scored_logprobs(self, params: PyTree, samples: dict[str, np.ndarray]) -> np.ndarray:
        """Per-token log-probs of the samples under ``params``, micro-batch by micro-batch."""
        out = []
        mb = self.cfg.micro_batch_size
        for s in range(0, len(samples["tokens"]), mb):
            out.append(host_array(self._logps_fn(params, *sharding_lib.put_batch(
                [samples[k][s:s + mb] for k in ("prompt_tokens", "prompt_mask",
                                                "tokens", "mask")], self.mesh))))
        return np.concatenate(out)

    def _zero_gradient_micro_batches(self, advantages: np.ndarray) -> list[bool]:
        """Per micro-batch: is its gradient exactly zero, so that its pass can be skipped?

        With ``beta = 0`` the loss of every type is the advantage times a function of the
        log-probs, so rows whose advantage is 0 (e.g. a group whose rewards are all equal)
        contribute exactly zero to the gradient, whatever the normalisation (which counts
        them all the same). A micro-batch of such rows only is skipped.
        """
        cfg, mb = self.cfg, self.cfg.micro_batch_size
        if not cfg.skip_zero_advantage or cfg.beta > 0 or cfg.entropy_coef:
            return [False] * (len(advantages) // mb)
        zero = np.asarray(advantages) == 0
        return [bool(zero[s:s + mb].all()) for s in range(0, len(zero), mb)]

    # ------------------------------------------------------------------ steps

    def _generate(self, index: int, prompt_ids: Sequence[list[int]], answers: Sequence[Any],
                  columns: dict[str, list[Any]] | None
                  ) -> tuple[GenerationBatch, dict[str, Any]]:
        """Generation batch ``index``: the prompts of its optimizer steps, sampled,
        scored and turned into training rows; with the generation's metrics."""
        cfg = self.cfg
        t0 = time.perf_counter()
        steps = cfg.steps_per_generation_batch
        order = np.concatenate([
            prompt_order(len(prompt_ids), index * steps + j, cfg.prompts_per_step, cfg.seed)
            for j in range(steps)])
        group_answers = [answers[i] for i in order for _ in range(cfg.num_generations)]
        sampling = SamplingParams(max_new_tokens=cfg.max_new_tokens,
                                  temperature=cfg.temperature, top_p=cfg.top_p,
                                  top_k=cfg.top_k, stop_token_ids=self.stop_token_ids)
        key = jax.random.fold_in(self.base_key, index)
        total = len(order) * cfg.num_generations
        step_prompts = [list(prompt_ids[i]) for i in order]
        samples, gen = self._sample(step_prompts, key, sampling,
                                    num_samples=cfg.num_generations,
                                    num_slots=min(cfg.generation_batch_size, total),
                                    prompts_per_call=len(step_prompts),
                                    prompt_capacity=max(len(p) for p in prompt_ids))
        t_gen = time.perf_counter() - t0
        # Train on the longest completion's bucket, not all max_new_tokens positions:
        # short completions cost less, and bucketing bounds the recompiles.
        longest = int(samples["mask"].sum(axis=1).max(initial=1))
        width = min(cfg.max_new_tokens, bucket_length(longest))
        for name in ("tokens", "logprobs", "mask"):
            samples[name] = samples[name][:, :width]

        texts = self._decode(samples["tokens"], samples["mask"])
        rewards = self._rewards(texts, group_answers, prompt_ids, order, cfg.num_generations,
                                columns, samples)
        if rewards.shape != (total,):
            raise ValueError(f"reward_fn returned {rewards.shape} rewards for {total} "
                             "completions")
        advantages = np.asarray(losses.group_advantages(
            jnp.asarray(rewards), cfg.num_generations, scale=cfg.advantage_scale,
            estimator=cfg.advantage_estimator, normalize=cfg.normalize_advantages))
        arrays = {"prompt_tokens": samples["prompt_tokens"],
                  "prompt_mask": samples["prompt_mask"], "tokens": samples["tokens"],
                  "mask": samples["mask"], "advantages": advantages}
        if cfg.steps_per_rollout > 1:
            # Trained on after updates: record the log-probs of the policy that sampled
            # them (TRL's old_per_token_logps), so the importance ratio is live.
            arrays["old_logps"] = self._scored_logprobs(self.params, samples)
        if cfg.beta > 0:
            with reference_lib.scoring(self, self.base_policy) as params:
                arrays["ref_logps"] = self._scored_logprobs(params, samples)
        kept = True  # completions in the loss: all, or those that stopped within the budget
        if cfg.mask_truncated_completions:
            stopped = np.isin(samples["tokens"], self.stop_token_ids) & (samples["mask"] > 0)
            arrays["truncated"] = ~stopped.any(axis=1)
            kept = ~arrays["truncated"][:, None]
        if steps > 1:  # spread each group over the steps, as TRL shuffles its batch
            rows = np.random.default_rng([cfg.seed, index]).permutation(total)
            arrays = {k: v[rows] for k, v in arrays.items()}
            rewards = rewards[rows]
        # The token-count losses divide by the tokens of one optimizer step's share of
        # the batch, per micro-batch (TRL: num_items_in_batch / steps per generation).
        num_items = (float((samples["mask"] * kept).sum()) / steps
                     / cfg.micro_batches_per_step)
        lengths = samples["mask"].sum(axis=1)
        info = {"tokens_per_s": gen["useful_tokens"] / max(gen["run_s"], 1e-9),
                "generation_time": t_gen, "generation_compile_time": gen["compile_s"],
                "decode_steps": int(gen["decode_steps"]),
                "slot_occupancy": gen["useful_tokens"] / max(gen["slot_steps"], 1),
                "completion_length": float(lengths.mean()), **self._reward_terms("reward/")}
        return GenerationBatch(index, arrays, rewards, num_items), info

    def train_step(self, prompt_ids: Sequence[list[int]], answers: Sequence[Any],
                   columns: dict[str, list[Any]] | None = None) -> dict[str, Any]:
        """One optimizer step (sampling a new generation batch first when its turn
        comes); returns its metrics. ``columns`` (name -> one value per prompt) go to
        the reward as keyword arguments."""
        cfg = self.cfg
        t0, c0, n0 = time.perf_counter(), compile_seconds(), compile_count()
        index, position = divmod(self.step, cfg.steps_per_rollout)
        info = {"generation_time": 0.0, "generation_compile_time": 0.0}
        if self.generation is None or self.generation.index != index:
            self.generation, info = self._generate(index, prompt_ids, answers, columns)
        batch_all = self.generation.step_rows(position, cfg.steps_per_generation_batch)
        rewards = self.generation.rewards
        total = len(batch_all["advantages"])

        mb = cfg.micro_batch_size
        num_micro = total // mb
        skip = self._zero_gradient_micro_batches(batch_all["advantages"])
        acc, metric_sums, computed = None, {}, 0
        for i, s in enumerate(range(0, total, mb)):
            if skip[i]:
                continue
            batch = sharding_lib.put_batch({k: v[s:s + mb] for k, v in batch_all.items()},
                                           self.mesh)
            # The sum starts from +0.0, so a skipped micro-batch (whose gradient is +-0.0)
            # would have added nothing: skipping leaves every bit, signed zeros included.
            if acc is None:
                acc = self._zero_grads(self.params, self.opt_state)
            loss, metrics, acc = self._grad_fn(acc, self.params, self.opt_state, batch,
                                               self.generation.num_items)
            computed += 1
            for k, v in {"loss": loss, **metrics}.items():
                metric_sums[k] = metric_sums.get(k, 0.0) + v
        if acc is None:
            acc = self._zero_grads(self.params, self.opt_state)
        acc = self._mean_grads(acc, num_micro)
        self.params, self.opt_state, report = self.trainable.apply(self.params, acc,
                                                                 self.opt_state)
        jax.block_until_ready(self.params)
        step_time = time.perf_counter() - t0

        record = {
            "kind": "train", "step": self.step,
            "reward_mean": float(rewards.mean()), "reward_std": float(rewards.std()),
            "accuracy": float((rewards >= 1.0).mean()),
            "completion_length": float(self.generation.arrays["mask"].sum(axis=1).mean()),
            # steady-state sampling speed: compilation is reported on its own
            **info,
            "step_time": step_time, "compile_time": compile_seconds() - c0,
            "compiles": compile_count() - n0,
            "grad_norm": float(report.grad_norm), "skipped": bool(report.skipped),
            # the loss of a skipped micro-batch is exactly 0; the other metrics average
            # the micro-batches that ran
            "loss": float(metric_sums.get("loss", 0.0)) / num_micro,
            **{k: float(v) / computed for k, v in metric_sums.items() if k != "loss"},
            "skipped_micro_batches": num_micro - computed,
        }
        if cfg.steps_per_rollout > 1:
            record.update(generation=index,
                          iteration=position // cfg.steps_per_generation_batch)
        peak = peak_memory_bytes()
        if peak is not None:
            record["peak_memory_bytes"] = peak
        self.step += 1
        return record

    def evaluate(self, prompt_ids: Sequence[list[int]], answers: Sequence[Any],
                 columns: dict[str, Sequence[Any]] | None = None) -> dict[str, Any]:
        """Accuracy on ``prompt_ids`` (greedy, or sampled at ``eval_temperature``); the
        reward gets ``columns`` (name -> one value per prompt) as in :meth:`train`."""
        cfg = self.cfg
        limit = len(prompt_ids) if cfg.eval_limit is None else min(cfg.eval_limit,
                                                                   len(prompt_ids))
        ids = [list(p) for p in prompt_ids[:limit]]
        sampling = SamplingParams(max_new_tokens=cfg.eval_max_new_tokens or cfg.max_new_tokens,
                                  temperature=cfg.eval_temperature, top_p=cfg.top_p,
                                  top_k=cfg.top_k, stop_token_ids=self.stop_token_ids)
        key = jax.random.fold_in(jax.random.key(cfg.seed + 1), self.step)
        samples, _ = self._sample(ids, key, sampling, num_samples=1,
                                  num_slots=min(cfg.eval_batch_size, limit),
                                  prompts_per_call=min(cfg.eval_batch_size, limit))
        texts = self._decode(samples["tokens"], samples["mask"])
        rewards = self._rewards(texts, list(answers[:limit]), prompt_ids, range(limit), 1,
                                check_columns(columns, len(prompt_ids), "eval_columns"), samples)
        return {"kind": "eval", "step": self.step, "eval_accuracy": float((rewards >= 1).mean()),
                "eval_reward_mean": float(rewards.mean()), "eval_examples": limit,
                **self._reward_terms("eval_reward/"),
                "eval_completion_length": float(samples["mask"].sum(axis=1).mean()),
                "eval_samples": [{"completion": t, "answer": str(a), "reward": float(r)}
                                 for t, a, r in list(zip(texts, answers, rewards))[:3]]}

    # ------------------------------------------------------------------ checkpoints

    def identity(self, data: str | None = None) -> dict[str, Any]:
        # steps_per_generation counts micro-batches, whose size a resume may change
        return {**super().identity(data),
                "steps_per_generation_batch": self.cfg.steps_per_generation_batch}

    def identity_defaults(self) -> dict[str, Any]:
        return {**super().identity_defaults(), "steps_per_generation_batch": 1}

    def _extra_state(self) -> dict[str, Any]:
        cfg = self.cfg
        generations = -(-self.step // cfg.steps_per_rollout)
        state = {"key": jax.random.key_data(self.base_key),
                 "data_position": np.asarray(generations * cfg.steps_per_generation_batch
                                             * cfg.prompts_per_step, np.int64)}
        if cfg.steps_per_rollout > 1:  # a resume continues on the same generation batch
            state["generation"] = generation_batch.storable(self.generation, cfg,
                                                             self.prompt_capacity)
        return state

    def _load_extra_state(self, tree: dict[str, Any]) -> None:
        self.base_key = jax.random.wrap_key_data(jnp.asarray(tree["key"]))
        if "generation" in tree:
            self.generation = generation_batch.from_storable(tree["generation"], self.cfg)

    # ------------------------------------------------------------------ the run

    def train(self, prompt_ids: Sequence[list[int]], answers: Sequence[Any], *,
              eval_prompt_ids: Sequence[list[int]] | None = None,
              eval_answers: Sequence[Any] | None = None, resume: bool = False,
              progress: bool = True, overwrite: bool = False,
              final_model_dir: str | os.PathLike | None = None,
              run_info: dict[str, Any] | None = None, writer: Any = None,
              columns: dict[str, Sequence[Any]] | None = None,
              eval_columns: dict[str, Sequence[Any]] | None = None) -> dict[str, Any]:
        """Runs ``config.steps`` steps (continuing from a checkpoint with ``resume``).

        ``columns`` (``eval_columns``): more data of each prompt, name -> one value per
        prompt (e.g. :attr:`sparsejax.data.dataset.PromptData.columns`); the reward gets
        each as a keyword argument, one value per completion in the completions' order,
        with ``prompts`` and ``completion_ids``. A reward parameter (without a default)
        that names none of them is a one-line ``ValueError`` before the first step.

        Writes ``metrics.jsonl``, checkpoints, ``curves.png``, ``final_eval.json``, the
        final model (with ``final_model_dir``) and ``finished.json`` under ``out_dir``
        (see :class:`PolicyRun` for the run's life cycle: lock, identity check, verified
        restore, clean stops); returns the last evaluation (or the last train record).
        ``run_info`` (e.g. the model's name) joins the run's identity. ``writer`` (a
        :mod:`sparsejax.runs.metric_writers` writer, e.g. TensorBoard) also receives every
        train and eval record; the caller closes it.
        """
        if len(prompt_ids) != len(answers) or not prompt_ids:
            raise ValueError("need as many answers as prompts, and at least one prompt")
        columns = check_columns(columns, len(prompt_ids))
        check_reward_arguments(self.reward_fn, ["prompts", "completion_ids", *columns])
        if eval_prompt_ids is not None and eval_answers is not None:
            eval_columns = check_columns(eval_columns, len(eval_prompt_ids), "eval_columns")
            check_reward_arguments(self.reward_fn, ["prompts", "completion_ids", *eval_columns])
        self.prompt_capacity = bucket_length(max(len(p) for p in prompt_ids))
        data = tree_digest([np.asarray(p, np.int64) for p in prompt_ids]
                           + [np.asarray([str(a) for a in answers])])
        evaluate = None
        if eval_prompt_ids is not None and eval_answers is not None:
            evaluate = lambda: self.evaluate(eval_prompt_ids, eval_answers, eval_columns)

        def prepare():
            return lambda: self.train_step(prompt_ids, answers, columns), evaluate, {}

        return self.run_loop(data, prepare, resume=resume, overwrite=overwrite,
                             progress=progress, final_model_dir=final_model_dir,
                             run_info=run_info, writer=writer)

    name = "GRPO"

    def progress_postfix(self, record: dict[str, Any]) -> dict[str, str]:
        return {"reward": f"{record['reward_mean']:.3f}", "acc": f"{record['accuracy']:.3f}",
                "len": f"{record['completion_length']:.0f}"}

    def plot(self, rows: list[dict[str, Any]], path: str) -> None:
        plot_curves(rows, path,
                    title=f"GRPO, {self.trainable.num_trainable(self.params):,} trainable")

    def save_model(self, folder: str | os.PathLike) -> str:
        """The current policy in Hugging Face format (safetensors + config + tokenizer)."""
        return self.trainable.save_model(folder, self.graphdef, self.params, self.tokenizer)

