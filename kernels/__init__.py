"""Pallas GPU kernels for sparsejax, installed as ``sparsejax.kernels``.

This folder sits at the top of the repository but is installed under the
``sparsejax`` namespace (``package-dir`` in ``pyproject.toml``), so it never shadows
the unrelated top-level ``kernels`` distribution.

Modules:
    * :mod:`sparsejax.kernels.indexed_adamw`: the indexed AdamW step as a Pallas
      (Triton backend) kernel; reached through :func:`sparsejax.backends.indexed_step_fn`
      with the ``"pallas"`` and ``"interpret"`` backends.
"""
