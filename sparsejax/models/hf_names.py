"""The name table between Hugging Face tensor names and the decoder's parameter paths.

Every HF tensor name is mapped to a parameter path by ONE table, :data:`WEIGHT_RULES`;
:mod:`sparsejax.models.hf_io` loads with it and saves with it in reverse. Most rules map
one tensor to one parameter. A *stacked* rule maps the per-expert tensors of a
mixture-of-experts layer (``model.layers.{i}.mlp.experts.{e}.gate_proj.weight``, the
Hub's layout, which transformers' ``save_pretrained`` writes too) to slice ``e`` of one
``[E, in, out]`` parameter (``layers.{i}.mlp.experts.gate_proj``).
"""

from __future__ import annotations

import dataclasses
import re

#: Named fields usable in :data:`WEIGHT_RULES` patterns, with the regex each matches
#: (``mlp`` includes a MoE layer's router, HF's ``mlp.gate``; ``e`` is an expert).
FIELDS = {
    "i": r"\d+",
    "attn": r"q_proj|k_proj|v_proj|o_proj",
    "qk_norm": r"q_norm|k_norm",
    "mlp": r"gate_proj|up_proj|down_proj|gate",
    "proj": r"gate_proj|up_proj|down_proj",
    "e": r"\d+",
    "kind": r"weight|bias",
}


@dataclasses.dataclass(frozen=True)
class WeightRule:
    """One row of the name table: HF tensor name <-> parameter path.

    ``hf`` and ``param`` are patterns in which ``{field}`` stands for the regex of
    :data:`FIELDS` (the same fields on both sides, except ``{e}``); everything else is
    literal. The parameter is the HF tensor transposed when ``transpose`` (and, for a
    ``kind`` field, only when it is a ``weight``: biases are vectors). With ``stacked``,
    the HF pattern's ``{e}`` indexes axis 0 of the parameter: each HF tensor is one slice
    (transposed when ``transpose``).
    """

    hf: str
    param: str
    transpose: bool = False
    stacked: bool = False

    def hf_regex(self) -> re.Pattern:
        return _compile(self.hf)

    def param_regex(self) -> re.Pattern:
        return _compile(self.param)


def _compile(pattern: str) -> re.Pattern:
    parts = re.split(r"\{(\w+)\}", pattern)
    regex = "".join(re.escape(p) if n % 2 == 0 else f"(?P<{p}>{FIELDS[p]})"
                    for n, p in enumerate(parts))
    return re.compile(regex + r"\Z")


#: The single name table. Params are 2-D ``(in, out)`` kernels where HF stores
#: ``(out, in)`` ``nn.Linear`` weights, hence the transposes; the experts' kernels are
#: stacked ``[E, in, out]``.
WEIGHT_RULES: tuple[WeightRule, ...] = (
    WeightRule("model.embed_tokens.weight", "embed"),
    WeightRule("lm_head.weight", "lm_head", transpose=True),
    WeightRule("model.norm.weight", "final_norm.weight"),
    WeightRule("model.layers.{i}.input_layernorm.weight", "layers.{i}.input_norm.weight"),
    WeightRule("model.layers.{i}.post_attention_layernorm.weight",
               "layers.{i}.post_attn_norm.weight"),
    WeightRule("model.layers.{i}.self_attn.{attn}.weight", "layers.{i}.attn.{attn}.kernel",
               transpose=True),
    WeightRule("model.layers.{i}.self_attn.{attn}.bias", "layers.{i}.attn.{attn}.bias"),
    WeightRule("model.layers.{i}.self_attn.{qk_norm}.weight",
               "layers.{i}.attn.{qk_norm}.weight"),
    WeightRule("model.layers.{i}.mlp.{mlp}.weight", "layers.{i}.mlp.{mlp}.kernel",
               transpose=True),
    WeightRule("model.layers.{i}.mlp.{mlp}.bias", "layers.{i}.mlp.{mlp}.bias"),
    WeightRule("model.layers.{i}.mlp.experts.{e}.{proj}.weight",
               "layers.{i}.mlp.experts.{proj}", transpose=True, stacked=True),
)

#: HF tensors that carry no information for this model and are skipped on load.
_REDUNDANT = re.compile(r".*\.rotary_emb\.inv_freq\Z")

_COMPILED = tuple((r, r.hf_regex(), r.param_regex()) for r in WEIGHT_RULES)


def hf_to_param_slice(name: str) -> tuple[str, bool, int | None] | None:
    """``(param_path, transpose, expert)`` for a HF tensor name (``expert``: the slice of a
    stacked parameter it fills, else None), or None if no rule matches."""
    for rule, hf_re, _ in _COMPILED:
        m = hf_re.match(name)
        if m:
            fields = m.groupdict()
            expert = int(fields.pop("e")) if rule.stacked else None
            return rule.param.format(**fields), rule.transpose, expert
    return None


def hf_to_param(name: str) -> tuple[str, bool] | None:
    """``(param_path, transpose)`` for a HF tensor name, or None if no rule matches."""
    found = hf_to_param_slice(name)
    return None if found is None else found[:2]


def param_to_hf(path: str) -> tuple[str, bool]:
    """``(hf_name, transpose)`` for a parameter path; raises KeyError if none matches.
    For a stacked parameter the name holds ``{e}`` where the expert goes
    (``name.format(e=3)``)."""
    for rule, _, param_re in _COMPILED:
        m = param_re.match(path)
        if m:
            fields = m.groupdict()
            if rule.stacked:
                fields["e"] = "{e}"
            return rule.hf.format(**fields), rule.transpose
    raise KeyError(f"no HF name for parameter {path!r}")
