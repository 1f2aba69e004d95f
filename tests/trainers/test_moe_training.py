"""GRPO and DPO on a tiny random Qwen3-MoE (routed experts, a dense layer among MoE ones):
sparse entries and full finetuning train the experts and the router, and a resume
continues bit for bit. (The same runs on 8 host devices equal one device:
tests/parallel/test_sharded_training.py.)"""

import jax
import numpy as np
import pytest
from flax import nnx
from test_grpo_trainer import TOKENIZER
from transformers import AutoTokenizer

from sparsejax.config import DPOConfig
from sparsejax.models import config as model_config
from sparsejax.models.decoder import init_model
from sparsejax.trainers import GRPOConfig, GRPOTrainer, TrainableConfig
from sparsejax.trainers.dpo import DPOTrainer

PAIRS = [{"prompt": f"q{i} is", "chosen": "yes" * (1 + i % 2), "rejected": "no"}
         for i in range(4)]


@pytest.fixture(scope="module")
def tokenizer():
    return AutoTokenizer.from_pretrained(TOKENIZER)


def moe_config(vocab: int) -> model_config.DecoderConfig:
    return model_config.DecoderConfig(
        model_type="qwen3_moe", vocab_size=vocab, hidden_size=16, intermediate_size=32,
        num_layers=2, num_heads=2, num_kv_heads=1, head_dim=8, tie_word_embeddings=True,
        num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, norm_topk_prob=True,
        mlp_only_layers=(1,), param_dtype="float32")


def reward(completions, answers):
    del answers
    return [len(set(c)) / 8.0 for c in completions]


def grpo(tokenizer, out_dir, steps, sparsity):
    graphdef, params = nnx.split(init_model(moe_config(len(tokenizer)), seed=0))
    config = GRPOConfig(steps=steps, prompts_per_step=2, num_generations=4, max_new_tokens=6,
                        micro_batch_size=4, generation_batch_size=8, save_every=1,
                        eval_every=0, skip_zero_advantage=False)
    trainable = TrainableConfig(sparsity=sparsity, learning_rate=1e-2 if sparsity else 1e-3,
                                sparse_grads="on")
    return GRPOTrainer(graphdef, params, tokenizer, reward, config, trainable, out_dir)


def dpo(tokenizer, out_dir, steps, sparsity):
    graphdef, params = nnx.split(init_model(moe_config(len(tokenizer)), seed=0))
    config = DPOConfig(steps=steps, batch_size=4, micro_batch_size=2, save_every=1,
                       eval_every=0, max_prompt_length=8, max_completion_length=8)
    trainable = TrainableConfig(sparsity=sparsity, learning_rate=1e-2 if sparsity else 1e-3,
                                sparse_grads="on")
    return DPOTrainer(graphdef, params, tokenizer, config, trainable, out_dir)


def expert_leaves(params):
    """The stacked expert weights and the router kernels, by path."""
    return {jax.tree_util.keystr(p): np.asarray(x)
            for p, x in jax.tree_util.tree_flatten_with_path(params)[0]
            if "experts" in jax.tree_util.keystr(p) or "'gate'" in jax.tree_util.keystr(p)}


@pytest.mark.parametrize("make", [grpo, dpo], ids=["grpo", "dpo"])
@pytest.mark.parametrize("sparsity", [0.9, 0.0], ids=["sparse", "full"])
def test_moe_trains_and_resumes_exactly(tokenizer, tmp_path, make, sparsity):
    data = ([tokenizer(q)["input_ids"] for q in ("1+1=", "two plus three", "4*2?")],
            ["2", "5", "8"])
    def train(trainer, resume=False):
        if make is grpo:
            return trainer.train(*data, progress=False, resume=resume)
        return trainer.train(PAIRS, progress=False, resume=resume)

    full = make(tokenizer, tmp_path / "full", 3, sparsity)
    before = expert_leaves(full.params)
    assert len(before) == 4, sorted(before)  # gate/up/down stacks and the router
    train(full)
    train(make(tokenizer, tmp_path / "part", 1, sparsity))
    resumed = make(tokenizer, tmp_path / "part", 3, sparsity)
    train(resumed, resume=True)
    for a, b in zip(jax.tree.leaves(full.params), jax.tree.leaves(resumed.params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    after = expert_leaves(full.params)
    for name, x in before.items():  # every expert stack and the router trained
        assert np.abs(after[name] - x).max() > 1e-6, name


@pytest.mark.parametrize("sparsity", [0.9, 0.0], ids=["sparse", "full"])
def test_a_frozen_router_stays_bit_for_bit(tokenizer, tmp_path, sparsity):
    data = ([tokenizer(q)["input_ids"] for q in ("1+1=", "two plus three")], ["2", "5"])
    graphdef, params = nnx.split(init_model(moe_config(len(tokenizer)), seed=0))
    config = GRPOConfig(steps=2, prompts_per_step=2, num_generations=4, max_new_tokens=6,
                        micro_batch_size=4, generation_batch_size=8, save_every=0,
                        eval_every=0, skip_zero_advantage=False)
    trainable = TrainableConfig(sparsity=sparsity, learning_rate=1e-2, weight_decay=0.1,
                                sparse_grads="on", freeze="mlp/gate/")
    trainer = GRPOTrainer(graphdef, params, tokenizer, reward, config, trainable, tmp_path)
    before = expert_leaves(trainer.params)
    trainer.train(*data, progress=False)
    after = expert_leaves(trainer.params)
    for name, x in before.items():
        if "'gate'" in name:  # the router: frozen, weight decay included
            np.testing.assert_array_equal(after[name], x)
        else:  # the experts trained
            assert np.abs(after[name] - x).max() > 1e-6, name
    total = sum(x.size for x in jax.tree.leaves(trainer.params))
    router = sum(x.size for n, x in before.items() if "'gate'" in n)
    if not sparsity:
        assert trainer.trainable.num_trainable(trainer.params) == total - router


def test_freeze_must_be_a_regular_expression():
    with pytest.raises(ValueError, match="not a regular expression"):
        TrainableConfig(freeze="mlp/gate/(")
