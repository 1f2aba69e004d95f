"""The decoder's configuration: one frozen dataclass for Llama 3.x, Qwen2/2.5 and Qwen3
(dense and mixture-of-experts).

The config is kept apart from the module code (:mod:`sparsejax.models.decoder`) so
that it can be built, compared, hashed (it is a static argument of jitted functions)
and written back to a Hugging Face ``config.json`` without touching any arrays.

:func:`from_hf_config` reads a Hugging Face ``config.json`` (a dict, a path to the
file, or a path to the model folder) in either the old layout (``rope_theta`` and
``rope_scaling`` at the top level, as on the Hub) or the transformers 5 layout
(``rope_parameters``). :meth:`DecoderConfig.to_hf_config` writes the old layout,
which transformers 4.x and 5.x both read. :data:`PRESETS` holds the exact shapes of
the public Qwen2.5, Qwen3 (dense and MoE) and Llama 3.x checkpoints (defined in
:mod:`sparsejax.models.presets`).
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
from sparsejax.models.presets import PRESET_FIELDS

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
        model_type: ``"llama"``, ``"qwen2"``, ``"qwen3"`` or ``"qwen3_moe"`` (what
            ``config.json`` names it; used to write the config back and as ``qk_norm``'s
            default).
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
            None (the default) means a Qwen3 model (``qwen3`` or ``qwen3_moe``).
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
        num_experts: routed experts of each mixture-of-experts layer (``qwen3_moe``
            only); 0 (the default, every dense model) means no MoE layer. The MoE fields
            below are ignored without experts.
        num_experts_per_tok: experts each token is routed to (top-k of the router).
        moe_intermediate_size: hidden size of each expert's SwiGLU MLP (the dense
            layers of a MoE model use ``intermediate_size``).
        norm_topk_prob: renormalise the top-k routing probabilities to sum to 1.
        decoder_sparse_step: layer ``i`` is a MoE layer iff ``(i + 1) %
            decoder_sparse_step == 0`` and ``i`` is not in ``mlp_only_layers``.
        mlp_only_layers: indices of layers that keep a dense MLP (sorted, unique).
        router_aux_loss_coef: weight of the load-balancing loss in a training loss
            (:func:`sparsejax.models.moe.load_balancing_loss`); written to ``config.json``.
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
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()
    router_aux_loss_coef: float = 0.001

    def __post_init__(self):
        if self.model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"model_type {self.model_type!r} is not one of "
                             f"{SUPPORTED_MODEL_TYPES}")
        if self.qk_norm is None:
            object.__setattr__(self, "qk_norm", self.model_type in _QWEN3)
        self._check_moe()
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

    def _check_moe(self) -> None:
        """Validates (and normalises ``mlp_only_layers`` of) the mixture-of-experts fields."""
        layers = self.mlp_only_layers
        if isinstance(layers, (str, bytes)) or not all(
                isinstance(i, (int, np.integer)) and not isinstance(i, bool)
                for i in (layers if isinstance(layers, (list, tuple)) else [None])):
            raise ValueError(f"mlp_only_layers must be a sequence of layer indices, got "
                             f"{layers!r}")
        object.__setattr__(self, "mlp_only_layers", tuple(sorted({int(i) for i in layers})))
        if self.num_experts < 0:
            raise ValueError(f"num_experts must be >= 0, got {self.num_experts}")
        if self.num_experts and self.model_type != "qwen3_moe":
            raise ValueError(f"num_experts={self.num_experts}: only model_type 'qwen3_moe' "
                             f"has experts, not {self.model_type!r}")
        if self.decoder_sparse_step < 1:
            raise ValueError(f"decoder_sparse_step must be >= 1, got "
                             f"{self.decoder_sparse_step}")
        bad = [i for i in self.mlp_only_layers if not 0 <= i < self.num_layers]
        if bad:
            raise ValueError(f"mlp_only_layers {bad} are not layers of a "
                             f"{self.num_layers}-layer model")
        if not self.num_experts:
            return
        if not 1 <= self.num_experts_per_tok <= self.num_experts:
            raise ValueError(f"num_experts_per_tok must be in [1, num_experts="
                             f"{self.num_experts}], got {self.num_experts_per_tok}")
        if self.moe_intermediate_size < 1:
            raise ValueError(f"moe_intermediate_size must be >= 1 with experts, got "
                             f"{self.moe_intermediate_size}")

    def is_moe_layer(self, i: int) -> bool:
        """Whether layer ``i`` routes tokens to experts (else it has a dense MLP)."""
        return (self.num_experts > 0 and i not in self.mlp_only_layers
                and (i + 1) % self.decoder_sparse_step == 0)

    @property
    def moe_layers(self) -> tuple[int, ...]:
        """Indices of the mixture-of-experts layers (empty for a dense model)."""
        return tuple(i for i in range(self.num_layers) if self.is_moe_layer(i))

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
        moe = self.num_experts * (h + 3 * h * self.moe_intermediate_size)  # router, experts
        n_moe = len(self.moe_layers)
        layers = self.num_layers * (attn + 2 * h) + n_moe * moe + (self.num_layers - n_moe) * mlp
        head = 0 if self.tie_word_embeddings else self.vocab_size * h
        return self.vocab_size * h + layers + h + head

    def num_active_params(self) -> int:
        """Parameters one token uses: :meth:`num_params` with only ``num_experts_per_tok``
        experts per MoE layer (the router counted whole); :meth:`num_params` if dense."""
        unused = self.num_experts - self.num_experts_per_tok
        return self.num_params() - len(self.moe_layers) * unused * (
            3 * self.hidden_size * self.moe_intermediate_size)

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
        if self.qk_norm != (self.model_type in _QWEN3):
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
        elif self.model_type in _QWEN3:
            if self.qkv_bias != self.o_bias or self.mlp_bias:
                raise ValueError("Qwen3's attention_bias covers q, k, v and o together; "
                                 "its MLP has no bias")
            cfg["attention_bias"] = self.qkv_bias
            cfg["use_sliding_window"] = False
            cfg["sliding_window"] = None
            cfg["max_window_layers"] = self.num_layers
            if self.model_type == "qwen3_moe":
                cfg.update(num_experts=self.num_experts,
                           num_experts_per_tok=self.num_experts_per_tok,
                           moe_intermediate_size=self.moe_intermediate_size,
                           norm_topk_prob=self.norm_topk_prob,
                           decoder_sparse_step=self.decoder_sparse_step,
                           mlp_only_layers=list(self.mlp_only_layers),
                           router_aux_loss_coef=self.router_aux_loss_coef,
                           output_router_logits=False)
        else:
            if not self.qkv_bias or self.o_bias or self.mlp_bias:
                raise ValueError("Qwen2 has biases on q, k, v only")
            cfg["use_sliding_window"] = False
            cfg["sliding_window"] = None
            cfg["max_window_layers"] = self.num_layers
        return cfg


_ARCHITECTURES = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM",
                  "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}
_QWEN3 = ("qwen3", "qwen3_moe")  # q/k norms, attention_bias on q, k, v and o


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
    if model_type in _QWEN3 and (cfg.get("use_sliding_window", False) or any(
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
    elif model_type in _QWEN3:  # attention_bias covers o too; the MLP never has a bias
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
        qk_norm=model_type in _QWEN3,
        max_position_embeddings=int(cfg.get("max_position_embeddings", 2048)),
        bos_token_id=cfg.get("bos_token_id"),
        eos_token_ids=eos_ids,
        pad_token_id=cfg.get("pad_token_id"),
        param_dtype=param_dtype,
        attention_impl=attention_impl,
        **(_moe_fields(cfg, where) if model_type == "qwen3_moe" else {}),
    )


def _moe_fields(cfg: Mapping[str, Any], where: str) -> dict[str, Any]:
    """The MoE fields of a ``qwen3_moe`` config, with transformers' defaults. The Hub
    names the expert count ``num_experts``; transformers 5 writes ``num_local_experts``."""
    experts = cfg.get("num_experts", cfg.get("num_local_experts", 128))
    fields = {"num_experts": experts, "num_experts_per_tok": cfg.get("num_experts_per_tok", 8),
              "moe_intermediate_size": cfg.get("moe_intermediate_size", 768),
              "decoder_sparse_step": cfg.get("decoder_sparse_step", 1)}
    for k, v in fields.items():
        if not isinstance(v, int) or isinstance(v, bool) or v < 0:
            raise ValueError(f"{where}: field {k} must be a non-negative integer, got {v!r}")
    layers = cfg.get("mlp_only_layers") or []
    if not isinstance(layers, list) or not all(
            isinstance(i, int) and not isinstance(i, bool) for i in layers):
        raise ValueError(f"{where}: field mlp_only_layers must be a list of layer indices, "
                         f"got {layers!r}")
    return {**fields, "norm_topk_prob": bool(cfg.get("norm_topk_prob", False)),
            "mlp_only_layers": tuple(layers),
            "router_aux_loss_coef": float(cfg.get("router_aux_loss_coef", 0.001))}


def _preset_config(fields: Mapping[str, Any]) -> DecoderConfig:
    scaling = fields.get("rope_scaling")
    return DecoderConfig(**{**fields, "rope_scaling": None if scaling is None
                            else RopeScaling(**scaling)})


#: The public checkpoints' shapes (:data:`sparsejax.models.presets.PRESET_FIELDS`).
PRESETS: dict[str, DecoderConfig] = {name: _preset_config(f) for name, f in PRESET_FIELDS.items()}


def preset(name: str, **changes: Any) -> DecoderConfig:
    """The preset config ``name`` (a key of :data:`PRESETS`), with fields changed."""
    if name not in PRESETS:
        raise KeyError(f"unknown preset {name!r}; available: {sorted(PRESETS)}")
    return PRESETS[name].replace(**changes)
