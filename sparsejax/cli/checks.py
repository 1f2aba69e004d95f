"""Input checks before anything heavy: numbers, the run folder, the model folder, data
and mask files, the launch settings. Each failure is a one-line ValueError naming the
flag or the file. Standard library only (no jax), so bad input answers at once.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
from typing import Any

from sparsejax.cli.flags import flag_message
from sparsejax.config.adapter import AdapterConfig
from sparsejax.config.adapter import check_ratios_file as check_ratios_format
from sparsejax.config.names import MODEL_TYPES

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "spiece.model",
                   "vocab.txt")


def flag(name: str) -> str:
    """``--name-with-dashes`` of a dest."""
    return "--" + name.replace("_", "-")


def check_number(args: argparse.Namespace, name: str, *, low: float | None = None,
                 high: float | None = None, low_open: bool = False,
                 high_open: bool = False) -> None:
    """Raises ValueError naming the flag unless ``args.<name>`` (if set) is finite and
    in the range (``low``/``high`` inclusive unless ``*_open``). For scripts whose flags
    are not generated from a dataclass (the dataclasses check their own fields)."""
    value = getattr(args, name)
    if value is None:
        return
    bounds = (("(" if low_open else "[") + ("-inf" if low is None else f"{low:g}") + ", "
              + ("inf" if high is None else f"{high:g}") + (")" if high_open or high is None
                                                            else "]"))
    bad = not math.isfinite(value)
    bad = bad or (low is not None and (value < low or (low_open and value == low)))
    bad = bad or (high is not None and (value > high or (high_open and value == high)))
    if bad and isinstance(value, int) and high is None and not low_open:
        raise ValueError(f"{flag(name)} must be >= {low:g}, got {value}")
    if bad:
        raise ValueError(f"{flag(name)} must be a finite number in {bounds}, got {value}")


def check_out_dir_path(path: str, name: str = "--out-dir") -> None:
    """Raises ValueError unless ``path`` is a folder or can become one."""
    probe = os.path.abspath(path)
    while probe and not os.path.exists(probe):
        probe = os.path.dirname(probe)
    if probe and not os.path.isdir(probe):
        raise ValueError(f"{name} {path!r}: {probe} is a file, not a folder")


def check_safetensors(path: str) -> None:
    """Raises ValueError naming ``path`` unless it is a whole safetensors file (header
    readable, file as long as the header says)."""
    size = os.path.getsize(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) < 8:
                raise ValueError("shorter than its 8-byte header length")
            (n,) = struct.unpack("<Q", raw)
            if n > 100_000_000 or 8 + n > size:
                raise ValueError(f"is truncated ({size} bytes; the header alone needs "
                                 f"{8 + n})" if n <= 100_000_000 else "has no valid header")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise ValueError(f"{path} is not a safetensors file (unreadable header)") from None
    except ValueError as e:
        raise ValueError(f"{path} {e}") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file (unreadable header)")
    end = max((t["data_offsets"][1] for k, t in header.items()
               if k != "__metadata__" and isinstance(t, dict) and "data_offsets" in t),
              default=0)
    if 8 + n + end > size:
        raise ValueError(f"{path} is truncated ({size} of {8 + n + end} bytes)")


def looks_local(name: str) -> bool:
    return name.startswith((".", "/", "~")) or os.path.exists(os.path.expanduser(name))


def check_model_folder(args: argparse.Namespace) -> None:
    """Local ``--model`` / ``--tokenizer`` folders: config.json is valid JSON, the
    safetensors files are whole, tokenizer files exist. Hub ids are not checked here."""
    model = os.path.expanduser(args.model)
    if looks_local(args.model):
        if not os.path.isdir(model):
            raise ValueError(f"--model {args.model!r}: no such folder")
        config = os.path.join(model, "config.json")
        if not os.path.isfile(config):
            raise ValueError(f"--model {args.model!r}: {config} is missing")
        try:
            with open(config, encoding="utf-8") as f:
                parsed = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{config} is not valid JSON ({e})") from None
        if not isinstance(parsed, dict):
            raise ValueError(f"{config} is not a JSON object")
        if parsed.get("model_type") not in MODEL_TYPES:
            raise ValueError(f"{config}: model_type {parsed.get('model_type')!r} is not "
                             f"supported; expected one of {MODEL_TYPES}")
        weights = sorted(n for n in os.listdir(model) if n.endswith(".safetensors"))
        if not weights:
            raise ValueError(f"--model {args.model!r}: no *.safetensors weights in {model}")
        for name in weights:
            check_safetensors(os.path.join(model, name))
    tok_name = args.tokenizer or args.model
    what = "--tokenizer" if args.tokenizer else "--model"
    tok = os.path.expanduser(tok_name)
    if looks_local(tok_name):
        if not os.path.isdir(tok):
            raise ValueError(f"{what} {tok_name!r}: no such folder (for the tokenizer)")
        if not any(os.path.isfile(os.path.join(tok, n)) for n in TOKENIZER_FILES):
            raise ValueError(f"{what} {tok_name!r}: no tokenizer files in {tok} (need one of "
                             f"{', '.join(TOKENIZER_FILES)})"
                             + ("" if args.tokenizer else "; pass --tokenizer"))


def check_jsonl(path: str, *, required: tuple[str, ...] = ()) -> int:
    """Checks a JSON Lines data file; returns its number of records.

    Raises:
        ValueError: naming the file and line of a line that is not a JSON object (or
            lacks a ``required`` field), or naming the file if it has no records.
    """
    count = 0
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{number}: invalid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise ValueError(f"{path}:{number}: not a JSON object "
                                 f"(a {type(row).__name__})")
            missing = [k for k in required if k not in row]
            if missing:
                raise ValueError(f"{path}:{number}: lacks {', '.join(map(repr, missing))}")
            count += 1
    if not count:
        raise ValueError(f"{path} has no records")
    return count


def check_mask_file(path: str | None) -> None:
    if path is None:
        return
    if not os.path.isfile(path):
        raise ValueError(f"--mask-path {path!r} is not a file")
    try:
        check_safetensors(path)
    except ValueError as e:
        raise ValueError(f"--mask-path: {e}") from None


def check_ratios_file(path: str | None) -> None:
    """``--lora-ratios``: a Partial-LoRA ratios file (JSON only, before heavy work)."""
    if path is None:
        return
    try:
        check_ratios_format(path)
    except ValueError as e:
        raise ValueError(flag_message(str(e), [AdapterConfig])) from None


def check_report_to_flag(args: argparse.Namespace) -> tuple[str, ...]:
    """The writer names of ``--report-to`` (known names, their packages installed)."""
    from sparsejax.runs.metric_writers import check_report_to
    return check_report_to(args.report_to)


def check_distributed_args(args: argparse.Namespace) -> None:
    """Raises ValueError naming the flag for bad or incomplete launch settings."""
    from sparsejax.parallel.distributed import launch_settings
    launch_settings(getattr(args, "coordinator_address", None),
                    getattr(args, "num_processes", None), getattr(args, "process_id", None))


def check_inputs(args: argparse.Namespace, *, adapter: Any = None) -> None:
    """The checks every training command shares: the run folder, the mask and ratios
    files, ``--report-to``, the launch settings and the model folder."""
    check_out_dir_path(args.out_dir)
    check_mask_file(args.mask_path)
    if adapter is not None and adapter.kind not in ("none", "lora"):
        check_ratios_file(adapter.lora_ratios)
    check_report_to_flag(args)
    check_distributed_args(args)
    check_model_folder(args)
