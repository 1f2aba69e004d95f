"""The LoRA variant of the seam in a real trainer: DPO with a (masked) LoRA adapter on a
tiny Qwen2 with the real tokenizer. The reference is the adapter switched off, the
checkpoints hold only the adapter and its optimizer state, a resume is bit-exact, and
the outputs are the merged HF model and a PEFT adapter."""

from __future__ import annotations

import shutil

import jax
import numpy as np
import pytest
import torch
from flax import nnx
from safetensors.numpy import load_file
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from sparsejax import lora
from sparsejax.config import DPOConfig, TrainableConfig
from sparsejax.models import load_hf
from sparsejax.trainable.lora import LoraAdapter
from sparsejax.trainers.dpo import DPOTrainer

from paths import SHARED

TOKENIZER = SHARED / "tokenizers" / "qwen2.5"
PAIRS = [{"prompt": f"Is {i} + {i} = {2 * i}?", "chosen": "yes", "rejected": "no"}
         for i in range(4)]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    if not TOKENIZER.is_dir():
        pytest.skip(f"no tokenizer at {TOKENIZER}")
    root = tmp_path_factory.mktemp("lora_dpo")
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    torch.manual_seed(0)
    hf = Qwen2ForCausalLM(Qwen2Config(
        vocab_size=len(tok), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=1, head_dim=8, tie_word_embeddings=True,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" not in name:
                p.copy_(0.3 * torch.randn_like(p))
    hf.save_pretrained(root / "model")
    tok.save_pretrained(root / "model")
    return root, tok


def _trainer(root, tok, out, steps=4) -> DPOTrainer:
    graphdef, params = nnx.split(load_hf(root / "model"))
    config = DPOConfig(steps=steps, batch_size=2, micro_batch_size=2, max_prompt_length=32,
                       max_completion_length=4, logprob_chunk_size=64, save_every=2,
                       remat="none")
    sparse = TrainableConfig(sparsity=0.0, learning_rate=5e-2, backend="xla")
    cfg = lora.LoraConfig(rank=2, alpha=4, targets=("q", "v", "down"))
    adapters = lora.init_adapters(params, cfg, seed=0)
    trainable = LoraAdapter(sparse, params, cfg, adapters=adapters,
                               mask=lora.factor_masks(adapters, 0.5, seed=1))
    return DPOTrainer(graphdef, params, tok, config, sparse, out, trainable=trainable)


def test_lora_dpo_reference_checkpoints_resume_and_outputs(base):
    root, tok = base
    full = _trainer(root, tok, root / "full")
    # Reference = adapter off (fresh B = 0): the base model's log-probs exactly.
    graphdef, params = nnx.split(load_hf(root / "model"))
    ref_c, ref_r = full.reference_logprobs(PAIRS)
    enc = full.encode(PAIRS)
    base_scores = full._score(params, enc)
    np.testing.assert_array_equal(ref_c, base_scores[:, 0])
    np.testing.assert_array_equal(ref_r, base_scores[:, 1])
    full.train(PAIRS, progress=False, final_model_dir=root / "full" / "final_model")
    margins = [float(np.mean(x)) for x in full.sequence_logprobs(PAIRS)]
    assert margins[0] - margins[1] > ref_c.mean() - ref_r.mean()  # it learned
    # Checkpoints: the adapter's optimizer state and trained values only.
    tree = jax.tree.map(np.asarray, full.trainable.checkpoint_tree(full.params, full.opt_state))
    assert set(tree) == {"opt_state", "active_values"}
    k = full.trainable.num_trainable(full.params)
    assert sum(x.size for x in jax.tree.leaves(tree["active_values"])) == k
    assert k < sum(x.size for x in jax.tree.leaves(params)) / 100
    # Stopped after step 2, resumed to the end: the same adapter bit for bit.
    split = root / "split"
    shutil.copytree(root / "full" / "checkpoints", split / "checkpoints")
    shutil.rmtree(split / "checkpoints" / "4")
    resumed = _trainer(root, tok, split)
    resumed.train(PAIRS, progress=False, resume=True, final_model_dir=split / "final_model")
    a = jax.tree.leaves(full.trainable.adapters(full.params))
    b = jax.tree.leaves(resumed.trainable.adapters(resumed.params))
    for x, y in zip(a, b):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # Outputs: the merged model (what our forward computes) and a loadable PEFT adapter.
    merged = load_hf(root / "full" / "final_model")
    ours = full._score(nnx.split(merged)[1], enc)
    policy = np.stack(full.sequence_logprobs(PAIRS), axis=1)
    np.testing.assert_allclose(ours, policy, atol=1e-4)
    adapters, cfg = lora.load_peft(root / "full" / "final_model" / "adapter", params)
    assert cfg.rank == 2 and len(adapters) == 3
    w = load_file(root / "full" / "final_model" / "adapter" / "adapter_model.safetensors")
    assert all(k.startswith("base_model.model.model.layers.0.") for k in w)
