"""The command line: flags generated from the settings dataclasses, checks, loading, and
the ``sparsejax`` entry points.

* :mod:`~sparsejax.cli.flags`: argparse flags from a dataclass's fields, and the
  dataclass built back (field errors come back naming flags).
* :mod:`~sparsejax.cli.settings`: the command line's own settings (model, data, run
  folder, processes), declared as the library's configs are.
* :mod:`~sparsejax.cli.config_file`: ``--config FILE.yaml`` and the run's ``config.yaml``.
* :mod:`~sparsejax.cli.checks`: input checks before anything heavy (one line each).
* :mod:`~sparsejax.cli.loading`: the model and tokenizer.
* :mod:`~sparsejax.cli.exits`: ``fail``, ``run_main`` and the exit statuses.
* :mod:`~sparsejax.cli.training`: what the training commands share (the run folder,
  the mesh, what trains, the metric writers).
* :mod:`~sparsejax.cli.grpo` (with :mod:`~sparsejax.cli.tasks`, its data and rewards)
  and :mod:`~sparsejax.cli.dpo`: the jobs; :mod:`~sparsejax.cli.main`: ``sparsejax``.

Nothing here imports jax at import time, so ``--help`` answers at once.
"""
