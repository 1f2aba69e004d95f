"""Kernels for sparsejax (Pallas for NVIDIA GPUs, C++ for the CPU), installed as ``sparsejax.kernels``.

This folder sits at the top of the repository but is installed under the
``sparsejax`` namespace (``package-dir`` in ``pyproject.toml``), so an installed
sparsejax never claims the top-level name ``kernels``, which belongs to the
unrelated ``kernels`` distribution (hub kernels, a dependency of transformers).

Python started in the repository root puts the root first on ``sys.path``, and
``import kernels`` would then find this folder. When that happens this module
hands the name over to the installed distribution (see :func:`_yield_top_level_name`):
``import kernels`` gives the distribution, or fails as it would without this
repository, and never gives these modules.

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


def _yield_top_level_name() -> None:
    """Replace this folder, imported as top-level ``kernels``, by the installed package.

    Searches ``sys.path`` without the repository root and loads what it finds under
    ``sys.modules["kernels"]``; the import system returns that module to the caller.
    Raises ``ModuleNotFoundError`` when no other ``kernels`` is installed.
    """
    import importlib.machinery
    import importlib.util
    import os
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    search = [p for p in sys.path if os.path.abspath(p or os.curdir) != root]
    spec = importlib.machinery.PathFinder.find_spec("kernels", search)
    if spec is None or spec.loader is None:
        del sys.modules["kernels"]
        raise ModuleNotFoundError("No module named 'kernels'", name="kernels")
    module = importlib.util.module_from_spec(spec)
    sys.modules["kernels"] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules["kernels"]
        raise


if __name__ == "kernels":
    _yield_top_level_name()
