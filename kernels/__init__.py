"""Kernels for sparsejax (Pallas for NVIDIA GPUs, C++ for the CPU), installed as ``sparsejax.kernels``.

This folder sits at the top of the repository but is installed under the
``sparsejax`` namespace (``package-dir`` in ``pyproject.toml``), so it never shadows
the unrelated top-level ``kernels`` distribution.

Modules:
    * :mod:`sparsejax.kernels.indexed_adamw`: the indexed AdamW step as a Pallas
      (Triton backend) kernel; reached through :func:`sparsejax.backends.indexed_step_fn`
      with the ``"pallas"`` and ``"interpret"`` backends.
    * :mod:`sparsejax.kernels.sampled_matmul`: the sparse backward's sampled dense-dense
      product as a Pallas kernel (``"pallas"`` / ``"interpret"`` in
      :func:`sparsejax.backends.sampled_product_fn`).
    * :mod:`sparsejax.kernels.cpu_sampled_product`: the same product as a C++ XLA FFI
      custom call for the CPU (``sampled_product_cpu.cc``, compiled on first use), used
      by the ``"xla"`` backend where XLA runs on the CPU.
"""
