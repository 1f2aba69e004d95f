"""What every trainer run holds and checkpoints, and the life of a run around its steps.

A run (a unit that survives any stop) locks its output folder, refuses
an earlier run's outputs unless it resumes or overwrites them, stores its identity in
every checkpoint and checks it on resume, restores the newest intact checkpoint, stops
cleanly on SIGINT/SIGTERM (see :mod:`sparsejax.runs.signals`), and finishes with the
final evaluation, the plot, the final model and ``finished.json`` (written last). In a
run of several processes (:mod:`sparsejax.parallel.distributed`) every process writes its shards
of each checkpoint and process 0 alone writes everything else; a checkpoint restores
onto the run's current mesh, whatever mesh wrote it. A run
stopped anywhere, even after its last step, is completed by resuming it; resuming a
finished run changes nothing.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import sys
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
from tqdm import tqdm

from sparsejax.parallel import distributed
from sparsejax.runs import checkpoint as ckpt_lib
from sparsejax.runs import run_dir, signals
from sparsejax.runs.reporting import MetricsLog, read_metrics, release_host_memory
from sparsejax.trainable.base import Trainable, memory_record, tree_bytes
from sparsejax.types import PyTree


def tree_digest(tree: PyTree) -> str:
    """A short SHA-256 of the arrays (or JSON-able values) of ``tree``; the same for any
    layout of the arrays (sharded ones are gathered tensor by tensor: with several
    processes every process must call it)."""
    from sparsejax.models.hf_io import host_array
    h = hashlib.sha256()
    for leaf in jax.tree.leaves(tree):
        a = np.ascontiguousarray(host_array(leaf) if isinstance(leaf, jax.Array)
                                 else np.asarray(leaf))
        h.update(f"{a.dtype.str}{a.shape}".encode())
        h.update(a.view(np.uint8).reshape(-1) if a.size and a.dtype != object else
                 json.dumps(a.tolist()).encode())
    return h.hexdigest()[:16]


def _config_dict(cfg: Any) -> dict[str, Any]:
    d = cfg if isinstance(cfg, Mapping) else (
        dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else dict(vars(cfg)))
    return {k: v for k, v in d.items() if k not in run_dir.RESUMABLE}


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class PolicyRun:
    """Checkpointing and the run life cycle shared by the trainers.

    A subclass sets ``trainable``, ``params``, ``opt_state``, ``step``, ``cfg``,
    ``trainable_cfg``, ``out_dir`` and ``checkpoints`` (a
    :class:`~sparsejax.runs.checkpoint.CheckpointManager`) and may add its own state with
    :meth:`_extra_state` / :meth:`_load_extra_state`. A checkpoint holds the policy as
    :meth:`Trainable.checkpoint_tree` gives it (for a sparse run only the ``k`` trained
    values and the optimizer state), the step, and the extra state.
    """

    trainable: Trainable
    params: PyTree
    opt_state: PyTree
    step: int
    cfg: Any
    trainable_cfg: Any
    mesh: Any
    out_dir: str
    checkpoints: ckpt_lib.CheckpointManager
    run_info: Mapping[str, Any] | None = None
    _identity: dict[str, Any] | None = None

    # ------------------------------------------------------------------ identity

    def identity(self, data: str | None = None) -> dict[str, Any]:
        """The settings a resume must not change (stored in every checkpoint): the
        model's shapes and dtypes, the mask, the run's settings (all but
        :data:`sparsejax.runs.run_dir.RESUMABLE`), the data digest and ``run_info``."""
        leaves = jax.tree_util.tree_flatten_with_path(self.params)[0]
        shapes = [(jax.tree_util.keystr(p), list(x.shape), str(x.dtype)) for p, x in leaves]
        out = {"trainer": type(self).__name__,
               "dtype": sorted({str(x.dtype) for _, x in leaves}),
               "model_shapes": hashlib.sha256(json.dumps(shapes).encode()).hexdigest()[:16],
               "trainable": self.trainable.num_trainable(self.params),
               "mask": (None if self.trainable.mask is None
                        else tree_digest(self.trainable.mask)),
               "config": _config_dict(self.cfg), "trainable_config": _config_dict(self.trainable.settings()),
               "run": dict(self.run_info or {})}
        if data is not None:
            out["data"] = data
        return json.loads(json.dumps(out, default=str))

    def identity_defaults(self) -> dict[str, Any]:
        """Flattened identity key -> default, for the settings of the run's config
        dataclasses: a checkpoint written before a setting existed resumes while the
        setting keeps its default."""
        out = {}
        for prefix, cfg in (("config", self.cfg), ("trainable_config", self.trainable_cfg)):
            if dataclasses.is_dataclass(cfg):
                for f in dataclasses.fields(cfg):
                    if f.default is not dataclasses.MISSING:
                        out[f"{prefix}.{f.name}"] = json.loads(json.dumps(f.default, default=str))
        return out

    # ------------------------------------------------------------------ checkpoints

    def _extra_state(self) -> dict[str, Any]:
        """Arrays of the run's own state to checkpoint (e.g. PRNG key, data position)."""
        return {}

    def _load_extra_state(self, tree: dict[str, Any]) -> None:
        """Takes back :meth:`_extra_state` from a restored checkpoint; called before the
        policy's params and optimizer state are replaced."""

    def _checkpoint_tree(self) -> dict[str, Any]:
        return {**self.trainable.checkpoint_tree(self.params, self.opt_state),
                "step": np.asarray(self.step, np.int64), **self._extra_state()}

    def save_checkpoint(self) -> None:
        """Writes the checkpoint of ``self.step`` (verified on restore)."""
        if self._identity is None:
            self._identity = self.identity()
        release_host_memory()
        self.checkpoints.save(self.step, self._checkpoint_tree(), identity=self._identity)

    def _save_if_new(self) -> None:
        if self.step > 0 and self.checkpoints.latest_step() != self.step:
            self.save_checkpoint()

    def restore_checkpoint(self) -> int | None:
        """Restores the newest intact checkpoint whose identity matches this run's;
        returns its step (None if there is none).

        Raises:
            ValueError: the checkpoint's identity differs (names the settings).
            sparsejax.runs.checkpoint.CheckpointError: no checkpoint is intact.
        """
        if self._identity is None:
            self._identity = self.identity()
        got = self.checkpoints.restore_latest(
            self._checkpoint_tree(),
            check_identity=lambda ident, where: run_dir.check_identity(
                ident, self._identity, where, self.identity_defaults()))
        if got is None:
            return None
        _, tree = got
        self._load_extra_state(tree)
        self.params, self.opt_state = self.trainable.restore_policy(self.params, tree)
        self.step = int(tree["step"])
        return self.step

    # ------------------------------------------------------------------ the run

    def open_run(self, resume: bool, *, overwrite: bool = False, data: str | None = None
                 ) -> int | None:
        """Locks ``out_dir`` and checks what is there, before any heavy work.

        Returns the step of a finished run being resumed (nothing left to do), else
        None. Raises ValueError for a new run over an earlier run's outputs (unless
        ``overwrite``) and :class:`~sparsejax.runs.run_dir.RunError` if another run holds
        the folder.
        """
        run_dir.lock(self.out_dir)
        self._identity = self.identity(data)
        if not resume:
            run_dir.refuse_earlier_run(self.out_dir, overwrite=overwrite)
            return None
        done = run_dir.finished_step(self.out_dir)
        if done is not None and done >= self.cfg.steps:
            _say(f"{self.out_dir}: the run is finished (step {done}); nothing to do")
            return done
        return None

    def begin(self, resume: bool, *, overwrite: bool = False) -> int | None:
        """Starts a run: :meth:`open_run`, then restores the newest intact checkpoint
        with ``resume`` (returning its step; None when starting from step 0)."""
        if self.open_run(resume, overwrite=overwrite) is not None:
            return self.step
        return self.restore(resume)

    def restore(self, resume: bool) -> int | None:
        """The restore half of :meth:`begin` (after :meth:`open_run`)."""
        if not resume:
            return None
        restored = self.restore_checkpoint()
        if restored is None:
            _say(f"{self.out_dir}: no checkpoint to resume from; starting at step 0")
        elif restored > self.cfg.steps:
            raise ValueError(f"--steps {self.cfg.steps} is below the checkpoint's step "
                             f"{restored}; pass --steps {restored} or more")
        else:
            run_dir.clear_finished(self.out_dir)
        return restored

    def metrics_log(self, restored: int | None, writer: Any = None) -> MetricsLog:
        """``metrics.jsonl`` of the run (kept up to ``restored``), also fanned out to
        ``writer`` (see :class:`MetricsLog`)."""
        return MetricsLog(os.path.join(self.out_dir, "metrics.jsonl"), resume_step=restored,
                          final_step=self.cfg.steps, writer=writer)

    def finished_result(self) -> dict[str, Any]:
        """What :meth:`train` returns for a finished run: its final evaluation."""
        path = os.path.join(self.out_dir, "final_eval.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return json.load(f)
        return {}

    # ------------------------------------------------------------------ the loop

    name = "run"  # the progress bar's label

    def progress_postfix(self, record: dict[str, Any]) -> dict[str, str]:
        """What the progress bar shows of a train record."""
        del record
        return {}

    def plot(self, rows: list[dict[str, Any]], path: str) -> None:
        """Draws the run's curves from its metrics to ``path`` (``curves.png``)."""
        raise NotImplementedError

    def run_loop(self, data: str, prepare: Callable[[], tuple[Callable[[], dict[str, Any]],
                                                              Callable[[], dict[str, Any]] | None,
                                                              dict[str, Any]]],
                 *, resume: bool, overwrite: bool, progress: bool,
                 final_model_dir: str | os.PathLike | None, run_info: Mapping[str, Any] | None,
                 writer: Any) -> dict[str, Any]:
        """The whole run around its steps, the same for every trainer.

        Opens the run (:meth:`open_run`: a finished run returns its final evaluation),
        calls ``prepare() -> (step_fn, eval_fn, record)`` (work that needs the base
        params, before a checkpoint replaces them), restores the newest checkpoint with
        ``resume``, writes the config record (``record`` joins it) to ``metrics.jsonl``,
        runs :meth:`run_steps` under a progress bar and :meth:`finish`. ``data`` is the
        digest of the training data (part of the run's identity); returns the final
        evaluation (or the last train record).
        """
        self.run_info = run_info
        if self.open_run(resume, overwrite=overwrite, data=data) is not None:
            return self.finished_result()
        step_fn, eval_fn, record = prepare()
        restored = self.restore(resume)
        self.write_mask()
        log = self.metrics_log(restored, writer)
        log.write({"kind": "config", "step": -1,
                   "trainable": self.trainable.num_trainable(self.params),
                   "optimizer_state_bytes": tree_bytes(self.opt_state),
                   **memory_record(self.trainable, self.params, self.opt_state, self.mesh),
                   "resumed_from": restored, **record, **vars(self.cfg),
                   **{f"trainable_{k}": v for k, v in vars(self.trainable_cfg).items()}})
        bar = tqdm(total=self.cfg.steps, initial=self.step, desc=self.name,
                   disable=not progress)

        def on_step(rec: dict[str, Any]) -> None:
            bar.update(1)
            bar.set_postfix(self.progress_postfix(rec))

        last = self.run_steps(step_fn, eval_fn, log, on_step)
        bar.close()
        final = self.finish(log, eval_fn, self.plot, final_model_dir)
        return last if final is None else final

    def run_steps(self, step_fn: Callable[[], dict[str, Any]],
                  eval_fn: Callable[[], dict[str, Any]] | None, log: MetricsLog,
                  on_step: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
        """Steps to ``cfg.steps`` with periodic evaluations and checkpoints, then the
        final checkpoint (unless it exists). A SIGINT/SIGTERM (with
        :func:`signals.install`) stops after the current step and its checkpoint."""
        cfg = self.cfg
        last: dict[str, Any] = {}
        with signals.deferred():
            signals.check(self.step, self._save_if_new)
            if eval_fn is not None and getattr(cfg, "eval_on_start", False) and self.step == 0:
                log.write(eval_fn())
            while self.step < cfg.steps:
                last = step_fn()
                release_host_memory()
                log.write(last)
                if on_step is not None:
                    on_step(last)
                due = lambda every: every and self.step % every == 0 and self.step < cfg.steps
                if eval_fn is not None and due(cfg.eval_every):
                    log.write(eval_fn())
                if due(cfg.save_every):
                    self.save_checkpoint()
                if cfg.save_hf_every and self.step % cfg.save_hf_every == 0:
                    self.write_model(self.snapshot_dir(self.step))
                signals.check(self.step, self._save_if_new)
            self._save_if_new()
        return last

    def finish(self, log: MetricsLog, final_eval_fn: Callable[[], dict[str, Any]] | None,
               plot_fn: Callable[[list[dict[str, Any]], str], Any],
               final_model_dir: str | os.PathLike | None = None) -> dict[str, Any] | None:
        """The end of a run after its final checkpoint: final evaluation
        (``final_eval.json``), ``curves.png``, the final model (with
        ``final_model_dir``), then ``finished.json``; each written whole or not at all.

        With several processes all of them evaluate and gather the final model (both
        are collective) and process 0 alone writes these files."""
        main = distributed.is_main()
        last = None
        if final_eval_fn is not None:
            last = final_eval_fn()
            log.write(last)
            if main:
                from sparsejax.runs.reporting import to_python
                run_dir.write_json_atomic(os.path.join(self.out_dir, "final_eval.json"),
                                          to_python(last))
        if main:
            curves = os.path.join(self.out_dir, "curves.png")
            tmp = os.path.join(self.out_dir, ".curves.tmp.png")
            with run_dir.disk_errors(curves):
                plot_fn(read_metrics(log.path), tmp)
                os.replace(tmp, curves)
        if final_model_dir is not None:
            self.write_model(final_model_dir)
        distributed.barrier("final-outputs")
        run_dir.mark_finished(self.out_dir, self.step)
        distributed.barrier("finished")
        return last

    def write_model(self, folder: str | os.PathLike) -> None:
        """:meth:`save_model` into ``folder``, written whole or not at all; with several
        processes every one gathers and process 0 alone writes."""
        if distributed.is_main():
            with run_dir.atomic_folder(folder) as tmp:
                self.save_model(tmp)
        else:  # gathers with process 0; whatever it writes here is thrown away
            with tempfile.TemporaryDirectory(prefix="sparsejax-not-main-") as tmp:
                self.save_model(tmp)

    def write_mask(self) -> None:
        """``<out-dir>/mask.safetensors``: the trained entries of a run with a mask
        (:func:`sparsejax.masks.save_mask`, keyed like the params, loadable with
        ``--mask-path``), for the overlap analyses. One process writes it; a mask split
        over several processes' devices, or one of adapter factors, is not written."""
        mask = self.trainable.mask
        if (mask is None or not distributed.is_main() or not all(
                getattr(x, "is_fully_addressable", True) for x in jax.tree.leaves(mask))):
            return
        from sparsejax.masks import num_active, save_mask, validate_mask
        mask = jax.tree.map(np.asarray, mask)
        try:  # a mask of the params themselves (not, e.g., of LoRA factors)
            validate_mask(mask, self.params)
        except ValueError:
            return
        path = os.path.join(self.out_dir, "mask.safetensors")
        total = sum(int(np.size(x)) for x in jax.tree.leaves(self.params))
        with run_dir.disk_errors(path):
            tmp = path + ".tmp"
            save_mask(tmp, mask, metadata={"total": total, "active": num_active(mask)})
            os.replace(tmp, path)

    def snapshot_dir(self, step: int) -> str:
        """Where ``save_hf_every`` writes the policy after ``step`` optimizer steps."""
        return os.path.join(self.out_dir, "snapshots", f"step_{step:06d}")

    def save_model(self, folder: str | os.PathLike) -> str:  # pragma: no cover
        raise NotImplementedError
