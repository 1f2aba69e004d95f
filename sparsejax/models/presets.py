"""The exact shapes of the public Qwen2.5, Qwen3 (dense and MoE), Llama 3.x and
SmolLM2-135M checkpoints, as :class:`~sparsejax.models.config.DecoderConfig` fields
(standard library only).

:data:`sparsejax.models.config.PRESETS` builds the configs from :data:`PRESET_FIELDS`;
use it (or :func:`sparsejax.models.config.preset`) rather than this table.
"""

from __future__ import annotations

from typing import Any

_LLAMA32_SCALING = dict(factor=32.0, low_freq_factor=1.0, high_freq_factor=4.0,
                        original_max_position_embeddings=8192)
_LLAMA31_SCALING = dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                        original_max_position_embeddings=8192)


def _qwen25(hidden, inter, layers, heads, kv, vocab, tie, max_pos) -> dict[str, Any]:
    return dict(
        model_type="qwen2", vocab_size=vocab, hidden_size=hidden, intermediate_size=inter,
        num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=hidden // heads,
        rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=tie, qkv_bias=True,
        max_position_embeddings=max_pos, bos_token_id=151643, eos_token_ids=(151643,),
        param_dtype="bfloat16")


def _qwen3(hidden, inter, layers, heads, kv, tie) -> dict[str, Any]:
    return dict(
        model_type="qwen3", vocab_size=151936, hidden_size=hidden, intermediate_size=inter,
        num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=128,
        rms_norm_eps=1e-6, rope_theta=1000000.0, tie_word_embeddings=tie, qk_norm=True,
        max_position_embeddings=40960, bos_token_id=151643, eos_token_ids=(151645,),
        param_dtype="bfloat16")


def _qwen3_moe(hidden, inter, moe_inter, layers, heads, kv, experts, top_k) -> dict[str, Any]:
    return dict(_qwen3(hidden, inter, layers, heads, kv, False),
                model_type="qwen3_moe", num_experts=experts, num_experts_per_tok=top_k,
                moe_intermediate_size=moe_inter, norm_topk_prob=True)


def _llama3(hidden, inter, layers, heads, kv, tie, scaling) -> dict[str, Any]:
    return dict(
        model_type="llama", vocab_size=128256, hidden_size=hidden, intermediate_size=inter,
        num_layers=layers, num_heads=heads, num_kv_heads=kv, head_dim=hidden // heads,
        rms_norm_eps=1e-5, rope_theta=500000.0, rope_scaling=scaling,
        tie_word_embeddings=tie, max_position_embeddings=131072, bos_token_id=128000,
        eos_token_ids=(128001,), param_dtype="bfloat16")


#: Shapes of the public base checkpoints (from their ``config.json`` on the Hub), with
#: bfloat16 parameters; ``rope_scaling`` is a dict of
#: :class:`~sparsejax.models.config.RopeScaling` fields. Instruct variants share the
#: shapes (their eos differs: Qwen2.5-Instruct ``<|im_end|>`` = 151645, Llama 3 Instruct
#: also 128008/128009). The Qwen3 presets are the released (post-trained) Qwen3 models,
#: eos ``<|im_end|>``; the ``-Base`` checkpoints share the shapes with eos
#: ``<|endoftext|>`` = 151643. The MoE presets (``-A3B``: 3.3B of 30.5B parameters
#: active per token; ``-A22B``: 22B of 235B) route each token to 8 of 128 experts in
#: every layer.
PRESET_FIELDS: dict[str, dict[str, Any]] = {
    "Qwen2.5-0.5B": _qwen25(896, 4864, 24, 14, 2, 151936, True, 32768),
    "Qwen2.5-1.5B": _qwen25(1536, 8960, 28, 12, 2, 151936, True, 131072),
    "Qwen2.5-7B": _qwen25(3584, 18944, 28, 28, 4, 152064, False, 131072),
    "Qwen3-0.6B": _qwen3(1024, 3072, 28, 16, 8, True),
    "Qwen3-1.7B": _qwen3(2048, 6144, 28, 16, 8, True),
    "Qwen3-4B": _qwen3(2560, 9728, 36, 32, 8, True),
    "Qwen3-8B": _qwen3(4096, 12288, 36, 32, 8, False),
    "Qwen3-30B-A3B": _qwen3_moe(2048, 6144, 768, 48, 32, 4, 128, 8),
    "Qwen3-235B-A22B": _qwen3_moe(4096, 12288, 1536, 94, 64, 4, 128, 8),
    "Llama-3.2-1B": _llama3(2048, 8192, 16, 32, 8, True, _LLAMA32_SCALING),
    "Llama-3.2-3B": _llama3(3072, 8192, 28, 24, 8, True, _LLAMA32_SCALING),
    "Llama-3.1-8B": _llama3(4096, 14336, 32, 32, 8, False, _LLAMA31_SCALING),
    # the benchmarks' real model (``sparsejax smollm2``); eos ``<|im_end|>`` = 2
    "SmolLM2-135M": dict(
        model_type="llama", vocab_size=49152, hidden_size=576, intermediate_size=1536,
        num_layers=30, num_heads=9, num_kv_heads=3, head_dim=64, rms_norm_eps=1e-5,
        rope_theta=100000.0, tie_word_embeddings=True, max_position_embeddings=8192,
        bos_token_id=1, eos_token_ids=(2,), pad_token_id=2, param_dtype="bfloat16"),
}
