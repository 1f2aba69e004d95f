"""Flax NNX decoders for Llama 3.x, Qwen2/2.5 and Qwen3 (dense and MoE) with Hugging Face
weight I/O.

* :mod:`~sparsejax.models.config`: :class:`DecoderConfig`, :func:`from_hf_config`, presets
  (numpy only: importing it does not import jax; the shapes are in
  :mod:`~sparsejax.models.presets`).
* :mod:`~sparsejax.models.ops`: the low-precision matmul and embedding lookup.
* :mod:`~sparsejax.models.decoder`: the :class:`Decoder` module and pure :func:`apply`;
  :mod:`~sparsejax.models.moe`: its routed-expert MLP.
* :mod:`~sparsejax.models.hf_io`: :func:`load_hf` / :func:`save_hf` (safetensors only).
* :mod:`~sparsejax.models.logprobs`: chunked token log-probs and entropies.
"""

from sparsejax._lazy import lazy_exports

__getattr__, __dir__, __all__ = lazy_exports(__name__, globals(), {
    "sparsejax.models.config": ("PRESETS", "REMAT_POLICIES", "SUPPORTED_MODEL_TYPES",
                                "DecoderConfig", "RopeScaling", "from_hf_config", "preset"),
    "sparsejax.models.decoder": ("Decoder", "apply", "hidden_states", "init_model",
                                 "reconfigure"),
    "sparsejax.models.hf_io": ("WEIGHT_RULES", "WeightLoadError", "WeightRule", "load_hf",
                               "load_hf_params", "save_hf"),
    "sparsejax.models.logprobs": ("completion_logprobs", "logprobs_from_hidden",
                                  "token_logprobs"),
})
