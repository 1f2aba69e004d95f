"""Flax NNX decoders for Llama 3.x and Qwen2/2.5 with Hugging Face weight I/O.

* :mod:`~sparsejax.models.config`: :class:`DecoderConfig`, :func:`from_hf_config`, presets.
* :mod:`~sparsejax.models.decoder`: the :class:`Decoder` module and pure :func:`apply`.
* :mod:`~sparsejax.models.hf_io`: :func:`load_hf` / :func:`save_hf` (safetensors only).
* :mod:`~sparsejax.models.logprobs`: chunked token log-probs and entropies.
"""

from sparsejax.models.config import (PRESETS, DecoderConfig, RopeScaling, from_hf_config,
                                     preset)
from sparsejax.models.decoder import Decoder, apply, hidden_states, init_model
from sparsejax.models.hf_io import (WEIGHT_RULES, WeightLoadError, WeightRule, load_hf,
                                    load_hf_params, save_hf)
from sparsejax.models.logprobs import (completion_logprobs, logprobs_from_hidden,
                                       token_logprobs)

__all__ = [
    "PRESETS", "DecoderConfig", "RopeScaling", "from_hf_config", "preset",
    "Decoder", "apply", "hidden_states", "init_model",
    "WEIGHT_RULES", "WeightLoadError", "WeightRule", "load_hf", "load_hf_params", "save_hf",
    "completion_logprobs", "logprobs_from_hidden", "token_logprobs",
]
