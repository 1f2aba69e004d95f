"""Pallas GPU kernels for sparsejax, installed as ``sparsejax.kernels``."""
