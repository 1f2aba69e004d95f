"""Loading the model and tokenizer of ``--model`` / ``--tokenizer`` / ``--dtype`` (after
the checks: this imports jax, flax and transformers)."""

from __future__ import annotations

import argparse
from typing import Any

from sparsejax.cli.exits import first_line


def load_model_and_tokenizer(args: argparse.Namespace, mesh: Any = None
                             ) -> tuple[Any, Any, Any]:
    """``(graphdef, params, tokenizer)`` from ``--model`` / ``--tokenizer`` / ``--dtype``;
    with a ``mesh`` every param is read straight into its shards (the rule table of
    :mod:`sparsejax.parallel.sharding`).

    Raises ValueError with a one-line message naming the model or the tokenizer.
    """
    from flax import nnx
    from transformers import AutoTokenizer

    from sparsejax.models import load_hf

    try:
        from sparsejax.models.hf_io import hf_param_shardings
        model = load_hf(args.model, param_dtype=args.dtype, sharding=hf_param_shardings(
            args.model, mesh, param_dtype=args.dtype))
    except Exception as e:  # any unusable model: one line
        raise ValueError(f"cannot load model {args.model!r}: {first_line(e)}") from e
    name = args.tokenizer or args.model
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=False)
    except Exception as e:
        raise ValueError(f"cannot load tokenizer {name!r}"
                         f"{' (--tokenizer)' if args.tokenizer else ''}: {first_line(e)}"
                         ) from e
    if tokenizer.eos_token_id is None and len(tokenizer) == 0:
        raise ValueError(f"tokenizer {name!r} is empty")
    graphdef, params = nnx.split(model)
    return graphdef, params, tokenizer
