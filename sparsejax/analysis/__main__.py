"""Command line: ``python -m sparsejax.analysis {diff,overlap} ...``.

``diff A B``: update sparsity of checkpoint B relative to A (Mukherjee et al.,
arXiv 2505.11711), per layer and per matrix type, optional update rank and mask
export. ``overlap M1 M2``: Jaccard and one-sided overlaps of two saved masks against
the random baseline. Bad input exits with status 2 and one ``error:`` line on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m sparsejax.analysis",
        description="Update sparsity and mask overlap of sparse RL finetuning.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="{diff,overlap}")

    d = sub.add_parser(
        "diff", help="update sparsity between two Hugging Face checkpoints",
        description="Compare two Hugging Face safetensors checkpoints tensor by tensor. "
                    "An entry is unchanged iff |B - A| <= atol after rounding both to --dtype "
                    "(Mukherjee et al., arXiv 2505.11711).")
    d.add_argument("a", help="base checkpoint folder (model.safetensors or sharded + index)")
    d.add_argument("b", help="finetuned checkpoint folder")
    d.add_argument("--atol", type=float, default=1e-5,
                   help="absolute tolerance: unchanged iff |delta| <= atol (default 1e-5)")
    d.add_argument("--dtype", choices=("bfloat16", "float32"), default="bfloat16",
                   help="round both checkpoints to this dtype before comparing (default bfloat16)")
    d.add_argument("--rank", action="store_true",
                   help="also report the numerical rank of every 2-D update (SVD in float32)")
    d.add_argument("--rank-rtol", type=float, default=None,
                   help="relative singular-value tolerance for --rank "
                        "(default max(m, n) * float32 eps)")
    d.add_argument("--save-mask", metavar="PATH",
                   help="write the changed entries as a sparsejax mask (safetensors), keyed by "
                        "HF tensor names, with 'total' metadata")
    d.add_argument("--json", metavar="PATH", help="write the full report as JSON")
    d.add_argument("--per-tensor", action="store_true", help="also print a per-tensor table")
    d.add_argument("--no-progress", action="store_true", help="hide the progress bar")

    o = sub.add_parser(
        "overlap", help="Jaccard and o1/o2 overlap of two saved masks vs a random baseline",
        description="Overlap of two mask files written by sparsejax.save_mask (e.g. by "
                    "'diff --save-mask'): Jaccard, o1 = |A&B|/|A|, o2 = |A&B|/|B|, and the "
                    "values two independent uniform masks of the same sizes would give.")
    o.add_argument("mask1", help="first mask file")
    o.add_argument("mask2", help="second mask file")
    o.add_argument("--total", type=int, default=None,
                   help="number of parameters N the masks index (needed when the files carry "
                        "no 'total' metadata)")
    o.add_argument("--json", metavar="PATH", help="write the result as JSON")
    return parser


def _write_json(path: str, data: dict[str, Any]) -> None:
    try:
        with open(path, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2)
            f.write("\n")
    except OSError as e:
        from sparsejax.analysis.checkpoints import AnalysisError
        raise AnalysisError(f"cannot write {path}: {e.strerror or e}") from None


def _run(args: argparse.Namespace) -> None:
    from sparsejax.analysis import overlap, update_sparsity
    if args.command == "diff":
        report = update_sparsity.diff_checkpoints(
            args.a, args.b, atol=args.atol, dtype=args.dtype, rank=args.rank,
            rank_rtol=args.rank_rtol, collect_mask=bool(args.save_mask),
            progress=not args.no_progress)
        print(report.format(per_tensor=args.per_tensor))
        if args.save_mask:
            try:
                update_sparsity.save_diff_mask(args.save_mask, report)
            except OSError as e:
                raise update_sparsity.AnalysisError(
                    f"cannot write {args.save_mask}: {e.strerror or e}") from None
            print(f"\nmask of {report.numel - report.unchanged:,} changed entries "
                  f"written to {args.save_mask}")
        if args.json:
            _write_json(args.json, report.to_dict())
    else:
        result = overlap.mask_overlap(args.mask1, args.mask2, total=args.total)
        print(result.format())
        if args.json:
            _write_json(args.json, result.to_dict())


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI; returns the exit status (0 ok, 2 bad input)."""
    args = _build_parser().parse_args(argv)
    for name in ("save_mask", "json"):  # output folders checked before any work
        path = getattr(args, name, None)
        if path is None:
            continue
        folder = os.path.dirname(os.path.abspath(path))
        if os.path.isdir(path) or not os.path.isdir(folder):
            what = "is a folder" if os.path.isdir(path) else f"folder {folder} does not exist"
            print(f"error: --{name.replace('_', '-')} {path}: {what}", file=sys.stderr)
            return 2
    if args.command == "diff" and not (math.isfinite(args.atol) and args.atol >= 0):
        print(f"error: --atol must be a finite number >= 0, got {args.atol}", file=sys.stderr)
        return 2
    from sparsejax.analysis.checkpoints import AnalysisError
    try:
        _run(args)
    except AnalysisError as e:
        print(f"error: {e}".splitlines()[0], file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
