"""The papers' experiments on a real pretrained model, one command each.

``python -m sparsejax.reproduce <experiment> --scale quick|cpu|paper`` (or
``sparsejax reproduce ...``) runs the arms of :mod:`sparsejax.reproduce.experiments`
(each a ``sparsejax grpo`` run, cached and resumable, :mod:`sparsejax.reproduce.suite`)
at a :mod:`sparsejax.reproduce.scales` scale and writes tables, plots and verdicts
(:mod:`sparsejax.reproduce.report`).
"""
