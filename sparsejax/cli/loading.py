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
    from flax import nnx  # pylint: disable=g-import-not-at-top
    from transformers import AutoTokenizer  # pylint: disable=g-import-not-at-top
    from sparsejax.models import load_hf  # pylint: disable=g-import-not-at-top

    try:
        from sparsejax.models.hf_io import hf_param_shardings  # pylint: disable=g-import-not-at-top
        model = load_hf(args.model, param_dtype=args.dtype, sharding=hf_param_shardings(
            args.model, mesh, param_dtype=args.dtype))
    except Exception as e:  # pylint: disable=broad-except  # any unusable model: one line
        raise ValueError(f"cannot load model {args.model!r}: {first_line(e)}") from e
    name = args.tokenizer or args.model
    try:
        tokenizer = AutoTokenizer.from_pretrained(name, trust_remote_code=False)
    except Exception as e:  # pylint: disable=broad-except
        raise ValueError(f"cannot load tokenizer {name!r}"
                         f"{' (--tokenizer)' if args.tokenizer else ''}: {first_line(e)}"
                         ) from e
    if tokenizer.eos_token_id is None and len(tokenizer) == 0:
        raise ValueError(f"tokenizer {name!r} is empty")
    graphdef, params = nnx.split(model)
    return graphdef, params, tokenizer
