"""Command line: ``python -m sparsejax.analysis {diff,overlap,predict-mask} ...``.

``diff A B``: update sparsity of checkpoint B relative to A (Mukherjee et al.,
arXiv 2505.11711), per layer and per matrix type, optional update rank and mask
export. ``overlap M1 M2``: Jaccard and one-sided overlaps of two saved masks against
the random baseline. ``predict-mask BASE SNAP...``: the global top-k mask of a score of
the early trajectory (BSR-AdamW), written so that ``--mask-path`` loads it
(:mod:`sparsejax.analysis.predict_mask`). Bad input exits with status 2 and one
``error:`` line on stderr.
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
        description="Update sparsity, mask overlap and mask prediction of sparse RL "
                    "finetuning.")
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{diff,overlap,predict-mask}")

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
    _add_predict_parser(sub)
    return parser


def _add_predict_parser(sub: Any) -> None:
    p = sub.add_parser(
        "predict-mask", help="predict a sparse run's mask from a dense run's first snapshots",
        description="Score every weight over the trajectory BASE, SNAPSHOT_1 .. SNAPSHOT_T "
                    "(Hugging Face folders, in step order) and keep the global top-k as a "
                    "mask (BSR-AdamW). The file is in the model's parameter layout, so "
                    "'sparsejax grpo --mask-path OUT' (or dpo/kto) trains exactly its entries. "
                    "A JSON sidecar records the settings and per-tensor counts.",
        epilog="example (snapshots of a dense run with --sparsity 0 --save-hf-every 1): "
               "python -m sparsejax.analysis predict-mask base/ runs/dense/snapshots/step_* "
               "--score momentum --beta 0.9 --sparsity 0.975 --exclude embed "
               "--out mask.safetensors")
    p.add_argument("base", help="the base model folder (config.json + safetensors): w_0")
    p.add_argument("snapshots", nargs="+", metavar="snapshot",
                   help="snapshot folders of the dense run, in step order: w_1 .. w_T")
    p.add_argument("--score", choices=("magnitude", "momentum", "variance"), default="momentum",
                   help="magnitude |w_T - w_0|; momentum |EMA of the deltas| (bias-corrected); "
                        "variance: Welford statistics of the deltas (default momentum)")
    p.add_argument("--beta", type=float, default=None,
                   help="momentum: EMA factor in [0, 1) (default 0.9)")
    p.add_argument("--window", type=float, default=None,
                   help="momentum: EMA span W instead of --beta (beta = 1 - 2 / (W + 1))")
    p.add_argument("--variance-score", choices=("snr", "snr_weighted", "variance", "mean"),
                   default=None, help="variance: mu^2/(var+eps) (snr, default), snr * |mu| "
                                      "(snr_weighted), var, or |mu| (mean)")
    p.add_argument("--eps", type=float, default=None,
                   help="variance: eps of the snr scores (default 1e-20)")
    keep = p.add_mutually_exclusive_group(required=True)
    keep.add_argument("--sparsity", type=float, help="fraction of eligible entries frozen, "
                                                     "in [0, 1), e.g. 0.975")
    keep.add_argument("--density", type=float, help="fraction of eligible entries kept, in (0, 1]")
    p.add_argument("--include", action="append", metavar="REGEX",
                   help="only tensors whose path matches (re.search; repeatable), paths like "
                        "layers/0/attn/q_proj/kernel/value (default: every tensor, as the "
                        "trainers' random masks)")
    p.add_argument("--exclude", action="append", metavar="REGEX",
                   help="leave out tensors whose path matches (repeatable), e.g. "
                        "--exclude embed --exclude norm --exclude lm_head")
    p.add_argument("--out", required=True, metavar="PATH",
                   help="the mask file to write (safetensors, loadable by --mask-path)")
    p.add_argument("--json", metavar="PATH",
                   help="the JSON sidecar (default: OUT with its extension replaced by .json)")
    p.add_argument("--no-progress", action="store_true", help="no line per checkpoint read")


def _scorer_options(args: argparse.Namespace) -> dict[str, Any]:
    """The scorer's keyword arguments; one-line AnalysisError for an option of another score."""
    from sparsejax.analysis.checkpoints import AnalysisError
    own = {"momentum": ("beta", "window"), "variance": ("variance_score", "eps")}
    options = {}
    for name in ("beta", "window", "variance_score", "eps"):
        value = getattr(args, name)
        if value is None:
            continue
        if name not in own.get(args.score, ()):
            raise AnalysisError(f"--{name.replace('_', '-')} applies to --score "
                                f"{'momentum' if name in own['momentum'] else 'variance'} only")
        options["score" if name == "variance_score" else name] = value
    return options


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
    elif args.command == "predict-mask":
        from sparsejax.analysis import predict_mask
        json_path = args.json or os.path.splitext(args.out)[0] + ".json"
        if os.path.abspath(json_path) == os.path.abspath(args.out):
            raise predict_mask.AnalysisError(f"--out {args.out}: the JSON sidecar would "
                                             "overwrite it; give --json another path")
        prediction = predict_mask.predict_mask(
            args.base, args.snapshots, score=args.score, sparsity=args.sparsity,
            density=args.density, include=args.include, exclude=args.exclude,
            scorer_options=_scorer_options(args), progress=not args.no_progress)
        predict_mask.write_prediction(prediction, args.out, json_path)
        print(f"predict-mask: {prediction.summary()}; wrote {args.out} and {json_path}")
    else:
        result = overlap.mask_overlap(args.mask1, args.mask2, total=args.total)
        print(result.format())
        if args.json:
            _write_json(args.json, result.to_dict())


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the CLI; returns the exit status (0 ok, 2 bad input)."""
    args = _build_parser().parse_args(argv)
    for name in ("save_mask", "json", "out"):  # output folders checked before any work
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
