"""Tiny real-format models the trainer and script tests share."""

from __future__ import annotations

from pathlib import Path

from paths import SHARED

QWEN_TOKENIZER = SHARED / "tokenizers" / "qwen2.5"


def save_tiny_qwen2(folder: Path, tokenizer=None, seed: int = 0) -> Path:
    """A random 2-layer Qwen2 (hidden 16, GQA, tied embedding) saved by transformers to
    ``folder`` with the shared Qwen2.5 tokenizer (or ``tokenizer``); returns ``folder``."""
    import torch
    from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM
    tok = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(QWEN_TOKENIZER)
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=16, intermediate_size=32,
                      num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                      tie_word_embeddings=True, max_position_embeddings=512,
                      eos_token_id=tok.eos_token_id)
    Qwen2ForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return Path(folder)
