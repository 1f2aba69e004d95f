"""What the trainers on a fixed dataset (DPO, KTO) share around their loss.

:class:`OfflineRun` holds the policy, what trains (:mod:`sparsejax.trainable`), the mesh,
the base (reference) policy and the checkpoints, and runs the parts of a step that do not
depend on the loss: scoring a dataset in fixed chunks (so a value never depends on which
other values are needed), the micro-batches of a step with the gradient accumulator
donated to each, the optimizer step and the step's record. A subclass gives the loss of
a micro-batch (:meth:`OfflineRun._batch_loss`), encodes its data and builds its
micro-batches.
"""

from __future__ import annotations

import functools
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx

from sparsejax.models.decoder import reconfigure
from sparsejax.parallel import sharding as sharding_lib
from sparsejax.parallel.distributed import host_array, to_host
from sparsejax.runs import checkpoint as ckpt_lib
from sparsejax.runs.reporting import compile_seconds, peak_memory_bytes
from sparsejax.runs.run import PolicyRun
from sparsejax.trainable import reference as reference_lib
from sparsejax.trainable.base import Trainable, trainer_mesh, zero_gradient
from sparsejax.trainable.build import build_trainable
from sparsejax.types import PyTree


class OfflineRun(PolicyRun):
    """The policy, what trains, the reference and the step machinery of an offline run.

    Args:
        graphdef, params: ``nnx.split`` of the policy; these are also the reference.
        tokenizer: a transformers tokenizer (encoding the data, saving the model).
        config: the run's settings (a :class:`~sparsejax.config.RunConfig` with
            ``batch_size``, ``micro_batch_size``, ``eval_limit`` and ``needs_reference``).
        trainable_config: the :class:`~sparsejax.config.TrainableConfig`.
        out_dir: where metrics, checkpoints, plots and the final evaluation go.
        mask: a mask to train (default: built from ``trainable_config``).
        trainable: what trains, built beforehand (e.g. a LoRA adapter); default: built
            from ``trainable_config`` (and ``mask``).
        chat_template: format prompts with the chat template (None: if the tokenizer
            has one).
        mesh: a mesh spec or :class:`jax.sharding.Mesh` (default ``config.mesh``).
    """

    def __init__(self, graphdef: nnx.GraphDef, params: PyTree, tokenizer: Any, config: Any,
                 trainable_config: Any, out_dir: str | os.PathLike, mask: PyTree | None = None,
                 *, chat_template: bool | None = None, trainable: Trainable | None = None,
                 mesh: Any = None):
        self.graphdef = reconfigure(graphdef, params, remat=config.remat)
        self.tokenizer = tokenizer
        self.cfg, self.trainable_cfg = config, trainable_config
        self.chat_template = chat_template
        self.out_dir = os.fspath(out_dir)
        os.makedirs(self.out_dir, exist_ok=True)
        self.mesh = trainer_mesh(mesh, config.mesh, trainable)
        if self.mesh is not None:
            sharding_lib.check_batch("micro_batch_size", config.micro_batch_size, self.mesh)
        self.trainable = (build_trainable(trainable_config, params, mask=mask, mesh=self.mesh,
                                          total_steps=config.steps)
                          if trainable is None else trainable)
        self.params = params = self.trainable.policy_params(params)
        self.opt_state = self.trainable.init(params)
        # The reference, kept as the variant keeps it: the base values of the k trained
        # entries, or (full finetuning) the params themselves until they first change,
        # then a host copy.
        self.base_policy = (self.trainable.base_policy(params, self.opt_state, on_host=True)
                            if config.needs_reference else None)
        self.step = 0
        self.checkpoints = ckpt_lib.CheckpointManager(
            os.path.join(self.out_dir, "checkpoints"), keep=config.keep_checkpoints)
        self._grad_fn = jax.jit(self._micro_batch_grads, donate_argnums=3)
        self._zero_grads = jax.jit(functools.partial(zero_gradient, self.trainable))

    # ------------------------------------------------------------------ the loss

    def _batch_loss(self, params: PyTree, batch: Mapping[str, jax.Array]
                    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """``(loss, metrics)`` of one micro-batch, differentiable in ``params``."""
        raise NotImplementedError

    def _micro_batch_grads(self, params, opt_state, batch, acc, weight):
        """Loss and metrics of one micro-batch; ``acc + weight * gradient`` (compressed)."""
        (loss, metrics), grads = self.trainable.value_and_grad(
            lambda p: self._batch_loss(p, batch), params, opt_state)
        acc = jax.tree.map(lambda a, g: a + (weight * g).astype(a.dtype), acc, grads)
        return {"loss": loss, **metrics}, acc

    # ------------------------------------------------------------------ scoring

    def _score(self, params: PyTree, enc: Any, needed: np.ndarray | None = None,
               fn: Any = None) -> Any:
        """``fn(params, batch)`` (default ``self._logps_fn``) for every row of ``enc`` (a
        NamedTuple of ``[N, ...]`` arrays with ``take``), ``micro_batch_size`` rows at a
        time, on the host (float32).

        Chunks are fixed slices of ``enc`` (the last padded by repeating its last row), so
        a row's value never depends on ``needed``; rows not needed are NaN.
        """
        fn = self._logps_fn if fn is None else fn
        n, mb = len(enc[0]), self.cfg.micro_batch_size
        out = treedef = None
        for start in range(0, n, mb):
            idx = np.arange(start, min(start + mb, n))
            if needed is not None and not needed[idx].any():
                continue
            padded = np.concatenate([idx, np.full(mb - len(idx), idx[-1])])
            got = fn(params, sharding_lib.put_batch(enc.take(padded)._asdict(), self.mesh))
            treedef = jax.tree.structure(got)
            got = [host_array(x)[:len(idx)] for x in jax.tree.leaves(got)]
            if out is None:
                out = [np.full((n, *x.shape[1:]), np.nan, np.float32) for x in got]
            for o, g in zip(out, got):
                o[idx] = g
        return None if out is None else jax.tree.unflatten(treedef, out)

    def _score_reference(self, enc: Any, needed: np.ndarray | None = None) -> Any:
        """:meth:`_score` under the base model (as the variant keeps it: sparse runs swap
        the base values of the active entries in and back out, in place; dense runs use
        the params while untouched, else the host copy)."""
        with reference_lib.scoring(self, self.base_policy) as params:
            return self._score(params, enc, needed)

    def _keep_base(self) -> None:
        """Before the params first change (the base policy keeps what it needs)."""
        if self.base_policy is not None:
            self.base_policy.before_change(self.params)

    # ------------------------------------------------------------------ steps

    def _combine_metrics(self, micro_metrics: list[dict[str, np.ndarray]]) -> dict[str, float]:
        """The step's value of each metric from its micro-batches' (their mean)."""
        return {k: float(np.mean([m[k] for m in micro_metrics])) for k in micro_metrics[0]}

    def _run_step(self, micro_batches: Sequence[Mapping[str, np.ndarray]], tokens: int
                  ) -> dict[str, Any]:
        """One optimizer step over ``micro_batches`` (host arrays; their gradients averaged
        into one donated accumulator); returns the step's train record. ``tokens``: the
        real tokens the step scored (its throughput)."""
        t0, c0 = time.perf_counter(), compile_seconds()
        acc = self._zero_grads(self.params, self.opt_state)
        weight = np.float32(1.0 / len(micro_batches))
        micro_metrics = []
        for batch in micro_batches:
            metrics, acc = self._grad_fn(self.params, self.opt_state,
                                         sharding_lib.put_batch(dict(batch), self.mesh), acc,
                                         weight)
            micro_metrics.append(metrics)
        micro_metrics = to_host(micro_metrics)
        self._keep_base()
        lr = float(self.trainable.schedule(self.step))
        self.params, self.opt_state, report = self.trainable.apply(self.params, acc,
                                                                 self.opt_state)
        jax.block_until_ready(self.params)
        step_time = time.perf_counter() - t0
        record = {"kind": "train", "step": self.step, **self._combine_metrics(micro_metrics),
                  "grad_norm": float(report.grad_norm), "skipped": bool(report.skipped),
                  "learning_rate": lr, "step_time": step_time, "tokens": tokens,
                  "compile_time": compile_seconds() - c0,
                  # steady-state speed: the step's compilation is reported on its own
                  "tokens_per_s": tokens / max(step_time - (compile_seconds() - c0), 1e-9)}
        peak = peak_memory_bytes()
        if peak is not None:
            record["peak_memory_bytes"] = peak
        self.step += 1
        return record

    def _eval_subset(self, rows: Sequence[Any]) -> Sequence[Any]:
        limit = self.cfg.eval_limit
        return rows if limit is None else rows[:limit]

    # ------------------------------------------------------------------ checkpoints

    def _extra_state(self) -> dict[str, Any]:
        return {"data_position": np.asarray(self.step * self.cfg.batch_size, np.int64)}

    def _load_extra_state(self, tree: dict[str, Any]) -> None:
        del tree
        self._keep_base()  # the params are about to stop being the base

    def save_model(self, folder: str | os.PathLike) -> str:
        """The current policy in Hugging Face format (safetensors + config + tokenizer)."""
        return self.trainable.save_model(folder, self.graphdef, self.params, self.tokenizer)
