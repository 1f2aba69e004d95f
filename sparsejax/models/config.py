"""The decoder's configuration: one frozen dataclass for Llama 3.x, Qwen2/2.5 and Qwen3.

The config is kept apart from the module code (:mod:`sparsejax.models.decoder`) so
that it can be built, compared, hashed (it is a static argument of jitted functions)
and written back to a Hugging Face ``config.json`` without touching any arrays.

:func:`from_hf_config` reads a Hugging Face ``config.json`` (a dict, a path to the
file, or a path to the model folder) in either the old layout (``rope_theta`` and
``rope_scaling`` at the top level, as on the Hub) or the transformers 5 layout
(``rope_parameters``). :meth:`DecoderConfig.to_hf_config` writes the old layout,
which transformers 4.x and 5.x both read. :data:`PRESETS` holds the exact shapes of
the public Qwen2.5, Qwen3 (dense) and Llama 3.x checkpoints.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from sparsejax.config import names
from sparsejax.config.names import MODEL_TYPES

SUPPORTED_MODEL_TYPES = MODEL_TYPES
DTYPES = ("float32", "bfloat16", "float16")
ATTENTION_IMPLS = ("auto", "xla", "cudnn")
#: Rematerialization policies of the decoder's layers (see :class:`DecoderConfig`).
REMAT_POLICIES = names.REMAT_POLICIES


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1-style RoPE frequency scaling (``rope_type == "llama3"``).

    Wavelengths longer than ``original_max_position_embeddings / low_freq_factor``
    are stretched by ``factor``; those shorter than ``... / high_freq_factor`` are
    kept; those between are interpolated smoothly.
    """

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int
    rope_type: str = "llama3"


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
    """Shapes and numerics of a Llama 3.x / Qwen2 / Qwen3 decoder-only transformer.

    Attributes:
        model_type: ``"llama"``, ``"qwen2"`` or ``"qwen3"`` (what ``config.json`` names
            it; used to write the config back and as ``qk_norm``'s default).
        vocab_size, hidden_size, intermediate_size, num_layers: the usual shapes.
        num_heads: query heads; ``num_kv_heads`` key/value heads (GQA when fewer;
            ``num_heads`` must be a multiple of ``num_kv_heads``).
        head_dim: size of one head (may differ from ``hidden_size // num_heads``).
        rms_norm_eps: epsilon of every RMSNorm.
        rope_theta: RoPE base (1e4 Llama 2, 5e5 Llama 3, 1e6 Qwen2.5).
        rope_scaling: :class:`RopeScaling` for ``llama3`` scaling, or None.
        tie_word_embeddings: the output projection is the transposed embedding table.
        qkv_bias / o_bias / mlp_bias: which projections carry a bias (Qwen2: q, k, v).
        qk_norm: an RMSNorm (weight of size ``head_dim``, epsilon ``rms_norm_eps``) on
            each query and key head before RoPE (Qwen3's ``q_norm`` / ``k_norm``);
            None (the default) means ``model_type == "qwen3"``.
        max_position_embeddings: the context length the checkpoint advertises.
        bos_token_id, eos_token_ids, pad_token_id: special tokens from the config
            (``eos_token_ids`` is a tuple; Llama 3 Instruct has several).
        param_dtype: dtype the parameters are stored in (``"bfloat16"`` for real runs,
            ``"float32"`` for tests). Activations use the same dtype; RMSNorm,
            softmax and the output logits are always computed in float32.
        attention_impl: ``"auto"`` (cuDNN fused attention on GPU for bf16/fp16 and
            supported head sizes, plain XLA otherwise), ``"xla"`` or ``"cudnn"``.
        attention_chunk_size: on the XLA path, attention over more than
            ``chunk x chunk`` query-key pairs runs in ``chunk x chunk`` blocks with an
            online softmax (:mod:`sparsejax.models.attention`), so no ``T x S`` scores
            are held, forward or backward; 0 always materializes the full scores.
        remat: what the backward pass keeps of each layer's forward activations.
            ``"layer"`` keeps only each layer's input and recomputes the layer
            (``jax.checkpoint``; activation memory ``layers x B x T x hidden``);
            ``"dots"`` also keeps the outputs of the matmuls without batch dimensions
            (the projections: less recompute, more memory); ``"none"`` keeps
            everything. Only affects gradients, never values.
    """

    model_type: str = "llama"
    vocab_size: int = 512
    hidden_size: int = 64
    intermediate_size: int = 172
    num_layers: int = 2
    num_heads: int = 4
    num_kv_heads: int = 2
    head_dim: int = 16
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    tie_word_embeddings: bool = True
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool | None = None
    max_position_embeddings: int = 2048
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    param_dtype: str = "float32"
    attention_impl: str = "auto"
    attention_chunk_size: int = 512
    remat: str = "layer"

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not one of "
                             f"{SUPPORTED_MODEL_TYPES}")
        if self.qk_norm is None:
            object.__setattr__(self, "qk_norm", self.model_type == "qwen3")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} is not a multiple of "
                             f"num_kv_heads={self.num_kv_heads}")
        if self.head_dim % 2:
            raise ValueError(f"head_dim={self.head_dim} must be even for RoPE")
        if self.param_dtype not in DTYPES:
            raise ValueError(f"param_dtype {self.param_dtype!r} not in {DTYPES}")
        if self.attention_impl not in ATTENTION_IMPLS:
            raise ValueError(f"attention_impl {self.attention_impl!r} not in "
                             f"{ATTENTION_IMPLS}")
        if self.attention_chunk_size < 0:
            raise ValueError(f"attention_chunk_size must be >= 0, got "
                             f"{self.attention_chunk_size}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat {self.remat!r} not in {REMAT_POLICIES}")

    def replace(self, **changes: Any) -> DecoderConfig:
        """A copy with some fields changed (e.g. ``param_dtype="bfloat16"``)."""
        return dataclasses.replace(self, **changes)

    @property
    def dtype(self):
        """The parameter / activation dtype as a numpy-compatible dtype."""
        import jax.numpy as jnp  # local: keep this module importable without jax
        return jnp.dtype(self.param_dtype)

    def num_params(self) -> int:
        """Number of parameters (tied embeddings counted once)."""
        h, q, kv = self.hidden_size, self.num_heads * self.head_dim, (
            self.num_kv_heads * self.head_dim)
        attn = h * q + 2 * h * kv + q * h
        if self.qkv_bias:
            attn += q + 2 * kv
        if self.o_bias:
            attn += h
        if self.qk_norm:
            attn += 2 * self.head_dim
        mlp = 3 * h * self.intermediate_size
        if self.mlp_bias:
            mlp += 2 * self.intermediate_size + h
        layer = attn + mlp + 2 * h
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + self.num_layers * layer + h + head

    def inv_frequencies(self) -> np.ndarray:
        """RoPE inverse frequencies, shape ``(head_dim // 2,)`` float32, scaling applied."""
        dim = self.head_dim
        exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / dim
        inv_freq = (1.0 / (self.rope_theta ** exponents.astype(np.float64))).astype(
            np.float32)
        s = self.rope_scaling
        if s is None:
            return inv_freq
        inv = inv_freq.astype(np.float64)
        low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
        high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
        wavelen = 2 * math.pi / inv
        scaled = np.where(wavelen > low_wavelen, inv / s.factor, inv)
        smooth = ((s.original_max_position_embeddings / wavelen - s.low_freq_factor)
                  / (s.high_freq_factor - s.low_freq_factor))
        smoothed = (1 - smooth) * scaled / s.factor + smooth * scaled
        medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
        return np.where(medium, smoothed, scaled).astype(np.float32)

    def to_hf_config(self) -> dict[str, Any]:
        """This config as a Hugging Face ``config.json`` dict that transformers loads."""
        eos = list(self.eos_token_ids)
        if self.qk_norm != (self.model_type == "qwen3"):
            raise ValueError(f"{self.model_type}: qk_norm={self.qk_norm}, but only Qwen3 "
                             "has (and always has) q/k norms")
        cfg: dict[str, Any] = {
            "architectures": [_ARCHITECTURES[self.model_type]],
            "model_type": self.model_type,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads,
            "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_scaling": (None if self.rope_scaling is None
                             else dataclasses.asdict(self.rope_scaling)),
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos[0] if len(eos) == 1 else (eos or None),
            "pad_token_id": self.pad_token_id,
            "torch_dtype": self.param_dtype,
            "use_cache": True,
        }
        if self.model_type == "llama":
            if self.qkv_bias != self.o_bias:
                raise ValueError("Llama's attention_bias covers q, k, v and o together")
            cfg["attention_bias"] = self.qkv_bias
            cfg["mlp_bias"] = self.mlp_bias
        elif self.model_type == "qwen3":
            if self.qkv_bias != self.o_bias or self.mlp_bias:
                raise ValueError("Qwen3's attention_bias covers q, k, v and o together; "
                                 "its MLP has no bias")
            cfg["attention_bias"] = self.qkv_bias
            cfg["use_sliding_window"] = False
            cfg["sliding_window"] = None
            cfg["max_window_layers"] = self.num_layers
        else:
            if not self.qkv_bias or self.o_bias or self.mlp_bias:
                raise ValueError("Qwen2 has biases on q, k, v only")
            cfg["use_sliding_window"] = False
            cfg["sliding_window"] = None
            cfg["max_window_layers"] = self.num_layers
        return cfg


_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "qwen3": "Qwen3ForCausalLM"}


def _rope_params(cfg: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
    """Reads ``(rope_theta, rope_scaling)`` from an old- or new-layout HF config."""
    params = cfg.get("rope_parameters")
    if isinstance(params, Mapping) and ("rope_type" in params or "rope_theta" in params):
        scaling = dict(params)
        theta = scaling.pop("rope_theta", cfg.get("rope_theta", 10000.0))
    else:
        scaling = dict(cfg.get("rope_scaling") or {})
        theta = cfg.get("rope_theta", 10000.0)
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type in (None, "default"):
        return float(theta), None
    if rope_type != "llama3":
        raise NotImplementedError(f"rope scaling type {rope_type!r} is not supported "
                                  "(only 'default' and 'llama3')")
    return float(theta), RopeScaling(
        factor=float(scaling["factor"]),
        low_freq_factor=float(scaling["low_freq_factor"]),
        high_freq_factor=float(scaling["high_freq_factor"]),
        original_max_position_embeddings=int(scaling["original_max_position_embeddings"]))


def load_hf_config_dict(source: Mapping[str, Any] | str | os.PathLike) -> dict[str, Any]:
    """A HF config as a dict, from a dict, a ``config.json`` path or a model folder."""
    if isinstance(source, Mapping):
        return dict(source)
    path = os.fspath(source)
    if os.path.isdir(path):
        path = os.path.join(path, "config.json")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no model config: {path} does not exist")
    with open(path, encoding="utf-8") as f:
        try:
            cfg = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not valid JSON: {e}") from None
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(cfg).__name__}")
    return cfg


def _config_file(source: Mapping[str, Any] | str | os.PathLike) -> str:
    """How errors name the config: its file, or "the model config" for a dict."""
    if isinstance(source, Mapping):
        return "the model config"
    path = os.fspath(source)
    return os.path.join(path, "config.json") if os.path.isdir(path) else path


_REQUIRED_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads")


def from_hf_config(source: Mapping[str, Any] | str | os.PathLike, *,
                   param_dtype: str = "float32",
                   attention_impl: str = "auto") -> DecoderConfig:
    """Builds a :class:`DecoderConfig` from a Hugging Face ``config.json``.

    Args:
        source: the config as a dict, a path to ``config.json``, or a model folder.
        param_dtype: dtype for parameters and activations (the checkpoint's own
            ``torch_dtype`` is ignored; pass ``"bfloat16"`` for real runs).
        attention_impl: see :class:`DecoderConfig`.

    Raises:
        NotImplementedError: for model types, activations, rope scalings or sliding
            windows this decoder does not implement (rather than silently computing
            something else).
    """
    cfg = load_hf_config_dict(source)
    where = _config_file(source)
    missing = [k for k in _REQUIRED_FIELDS if k not in cfg]
    if missing:
        raise ValueError(f"{where}: missing field(s) {', '.join(missing)}")
    for k in _REQUIRED_FIELDS:
        if not isinstance(cfg[k], int) or isinstance(cfg[k], bool) or cfg[k] < 1:
            raise ValueError(f"{where}: field {k} must be a positive integer, got {cfg[k]!r}")
    model_type = cfg.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise NotImplementedError(f"model_type {model_type!r} is not supported; "
                                  f"expected one of {SUPPORTED_MODEL_TYPES}")
    if cfg.get("hidden_act", "silu") != "silu":
        raise NotImplementedError(f"hidden_act {cfg['hidden_act']!r} is not supported")
    if model_type == "qwen2" and cfg.get("use_sliding_window", False):
        raise NotImplementedError("Qwen2 sliding-window attention is not supported")
    if model_type == "qwen3" and (cfg.get("use_sliding_window", False) or any(
            t != "full_attention" for t in cfg.get("layer_types") or ())):
        raise NotImplementedError("Qwen3 sliding-window attention is not supported "
                                  "(use_sliding_window / layer_types)")
    if cfg.get("pretraining_tp", 1) not in (1, None):
        raise NotImplementedError("pretraining_tp > 1 is not supported")
    heads = int(cfg["num_attention_heads"])
    hidden = int(cfg["hidden_size"])
    theta, scaling = _rope_params(cfg)
    eos = cfg.get("eos_token_id")
    eos_ids = tuple(int(e) for e in (eos if isinstance(eos, (list, tuple)) else
                                     ([] if eos is None else [eos])))
    if model_type == "qwen2":
        qkv_bias, o_bias, mlp_bias = True, False, False
    elif model_type == "qwen3":  # attention_bias covers o too; the MLP never has a bias
        qkv_bias = o_bias = bool(cfg.get("attention_bias", False))
        mlp_bias = False
    else:
        qkv_bias = o_bias = bool(cfg.get("attention_bias", False))
        mlp_bias = bool(cfg.get("mlp_bias", False))
    return DecoderConfig(
        model_type=model_type,
        vocab_size=int(cfg["vocab_size"]),
        hidden_size=hidden,
        intermediate_size=int(cfg["intermediate_size"]),
        num_layers=int(cfg["num_hidden_layers"]),
        num_heads=heads,
        num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
        # transformers' Qwen3Config defaults head_dim to 128, not hidden // heads.
        head_dim=int(cfg.get("head_dim") or (128 if model_type == "qwen3"
                                             else hidden // heads)),
        rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(cfg.get("tie_word_embeddings", model_type == "qwen2")),
        qkv_bias=qkv_bias,
        o_bias=o_bias,
        mlp_bias=mlp_bias,
        qk_norm=model_type == "qwen3",
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_ids,
        pad_token_id=cfg.get("pad_token_id"),
        param_dtype=param_dtype,
        attention_impl=attention_impl,
    )


_LLAMA32_SCALING = RopeScaling(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                               original_max_position_embeddings=8192)
_LLAMA31_SCALING = RopeScaling(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                               original_max_position_embeddings=8192)


def _qwen25(hidden, inter, layers, heads, kv, vocab, tie, max_pos) -> DecoderConfig:
    return DecoderConfig(
        model_type="qwen2", vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
        num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=hidden // heads,
        rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=tie, qkv_bias=True,
        max_position_embeddings=max_pos, bos_token_id=151643, eos_token_ids=(151643,),
        param_dtype="bfloat16")


def _qwen3(hidden, inter, layers, heads, kv, tie) -> DecoderConfig:
    return DecoderConfig(
        model_type="qwen3", vocab_size=151936, hidden_size=hidden, intermediate_size=inter,
        num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=128,
        rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=tie, qk_norm=True,
        max_position_embeddings=40960, bos_token_id=151643, eos_token_ids=(151645,),
        param_dtype="bfloat16")


def _llama3(hidden, inter, layers, heads, kv, tie, scaling) -> DecoderConfig:
    return DecoderConfig(
        model_type="llama", vocab_size=128256, hidden_size=hidden, intermediate_size=inter,
        num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=hidden // heads,
        rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=scaling,
        tie_word_embeddings=tie, max_position_embeddings=131072, bos_token_id=128000,
        eos_token_ids=(128001,), param_dtype="bfloat16")


#: Shapes of the public base checkpoints (from their ``config.json`` on the Hub), with
#: bfloat16 parameters. Instruct variants share the shapes (their eos differs:
#: Qwen2.5-Instruct ``<|im_end|>`` = 151645, Llama 3 Instruct also 128008/128009).
#: The Qwen3 presets are the released (post-trained) Qwen3 models, eos ``<|im_end|>``;
#: the ``-Base`` checkpoints share the shapes with eos ``<|endoftext|>`` = 151643.
PRESETS: dict[str, DecoderConfig] = {
    "Qwen2.5-0.5B": _qwen25(896, 4864, 24, 14, 2, 151936, True, 32768),
    "Qwen2.5-1.5B": _qwen25(1536, 8960, 28, 12, 2, 151936, True, 131072),
    "Qwen2.5-7B": _qwen25(3584, 18944, 28, 28, 4, 152064, False, 131072),
    "Qwen3-0.6B": _qwen3(1024, 3072, 28, 16, 8, True),
    "Qwen3-1.7B": _qwen3(2048, 6144, 28, 16, 8, True),
    "Qwen3-4B": _qwen3(2560, 9728, 36, 32, 8, True),
    "Qwen3-8B": _qwen3(4096, 12288, 36, 32, 8, False),
    "Llama-3.2-1B": _llama3(2048, 8192, 16, 32, 8, True, _LLAMA32_SCALING),
    "Llama-3.2-3B": _llama3(3072, 8192, 28, 24, 8, True, _LLAMA32_SCALING),
    "Llama-3.1-8B": _llama3(4096, 14336, 32, 32, 8, False, _LLAMA31_SCALING),
}


def preset(name: str, **changes: Any) -> DecoderConfig:
    """The preset config ``name`` (a key of :data:`PRESETS`), with fields changed."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
    return PRESETS[name].replace(**changes)
