"""Reference computations several test files compare against."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def hf_greedy(hf, tokens: np.ndarray, mask: np.ndarray, n: int, eos) -> np.ndarray:
    """transformers' greedy ``generate`` of ``n`` tokens after left-padded ``tokens``,
    padded with 0 to ``n`` columns (transformers stops once every row is done)."""
    import torch
    hf.generation_config.eos_token_id = eos
    with torch.no_grad():
        out = hf.generate(input_ids=torch.tensor(tokens, dtype=torch.long),
                          attention_mask=torch.tensor(mask, dtype=torch.long),
                          do_sample=False, max_new_tokens=n, pad_token_id=0)
    out = out[:, tokens.shape[1]:].numpy()
    return np.pad(out, ((0, 0), (0, n - out.shape[1])))


def cached_logits(sampling, config, graphdef, params, tokens: np.ndarray, mask: np.ndarray,
                  cont: np.ndarray, cache_len: int):
    """``([B, steps + 1, V] logits, cache)`` of the KV-cache path: a prefill of the
    left-padded ``tokens``, then one decode step per column of ``cont`` (``sampling`` is
    :mod:`sparsejax.generation.sampler`)."""
    cache = sampling.init_cache(config, tokens.shape[0], cache_len)
    logits, cache = jax.jit(sampling.prefill, static_argnums=0)(
        graphdef, params, jnp.asarray(tokens), jnp.asarray(mask), cache)
    step = jax.jit(sampling.decode_step, static_argnums=0)
    got = [np.asarray(logits)]
    for t in range(cont.shape[1]):
        logits, cache = step(graphdef, params, jnp.asarray(cont[:, t], jnp.int32), cache)
        got.append(np.asarray(logits))
    return np.stack(got, axis=1), cache


# ---------------------------------------------------------------------- TRL's DPO losses


class _SingleProcessAccelerator:
    """The part of ``accelerate.Accelerator`` TRL's loss code calls, for one CPU process:
    identities."""

    num_processes = 1
    sync_gradients = True

    def __init__(self):
        import torch
        self.device = torch.device("cpu")

    def pad_across_processes(self, tensor, dim=0, pad_index=0):
        return tensor

    def reduce(self, tensor, reduction="sum"):
        return tensor

    def gather(self, tensor):
        return tensor

    def gather_for_metrics(self, tensor):
        return tensor

    def autocast(self):
        import contextlib
        return contextlib.nullcontext()


def trl_dpo_stand_in(**attributes):
    """A bare object with exactly the attributes TRL 1.16's ``DPOTrainer._compute_loss``
    and ``compute_ref_log_probs`` read (``attributes`` override the defaults), whose two
    methods are TRL's own, unbound."""
    from collections import defaultdict
    from types import SimpleNamespace

    from trl.trainer.dpo_trainer import DPOTrainer

    class StandIn:
        _compute_loss = DPOTrainer._compute_loss
        compute_ref_log_probs = DPOTrainer.compute_ref_log_probs

    import torch
    model = torch.nn.Module()  # training, not a PEFT model, no gradient checkpointing
    model.is_gradient_checkpointing = False
    trainer = StandIn()
    defaults = dict(
        model=model,
        ref_model=None, accelerator=_SingleProcessAccelerator(),
        args=SimpleNamespace(discopop_tau=0.05, gradient_checkpointing_kwargs=None),
        aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5, loss_types=["sigmoid"],
        loss_weights=[1.0], beta=0.1, label_smoothing=0.0, use_weighting=False,
        _total_train_tokens=0, _tp_size=1,
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)})
    for key, value in {**defaults, **attributes}.items():
        setattr(trainer, key, value)
    return trainer


def trl_dpo_loss(chosen, rejected, chosen_mask, rejected_mask, ref_chosen=None,
                 ref_rejected=None, *, loss_type="sigmoid", loss_weights=None, beta=0.1,
                 label_smoothing=0.0, ld_alpha=None, f_divergence_type="reverse_kl",
                 f_alpha_divergence_coef=0.5, discopop_tau=0.05, log_sum_sq_probs=None,
                 dtype="float64"):
    """TRL 1.16's ``DPOTrainer._compute_loss`` on per-token log-probs.

    ``chosen``/``rejected`` and their masks are ``[B, T]`` numpy arrays (completion
    tokens right padded); each row becomes a sequence of one prompt token and ``T``
    completion positions, and a stand-in model returns the given per-token log-probs.
    The reference is ``[B]`` sums (TRL's precomputed path), ``[B, T]`` per token (a
    stand-in reference model; TRL reduces it as the policy) or None (zeros). With
    ``log_sum_sq_probs`` (a pair of ``[B, T]`` arrays) TRL's WPO weighting is on.

    Returns ``(loss, grad wrt chosen [B, T], grad wrt rejected [B, T], metrics)``.
    """
    from types import SimpleNamespace

    import torch
    dtype = getattr(torch, dtype)
    pairs, width = chosen.shape
    tokens = torch.tensor(np.concatenate([chosen, rejected]), dtype=dtype, requires_grad=True)
    mask = np.concatenate([chosen_mask, rejected_mask]).astype(np.int64)
    completion_mask = torch.cat([torch.zeros((2 * pairs, 1), dtype=torch.long),
                                 torch.tensor(mask)], 1)
    zeros = torch.zeros((2 * pairs, width), dtype=dtype)

    def outputs(log_probs, sq=None):
        return SimpleNamespace(log_probs=log_probs, entropy=zeros, mean_logits=zeros,
                               is_top1=torch.zeros((2 * pairs, width), dtype=torch.bool),
                               log_sum_sq_probs=sq)

    sq = None
    if log_sum_sq_probs is not None:
        sq = torch.tensor(np.concatenate(log_sum_sq_probs), dtype=dtype)
    model = lambda **kwargs: outputs(tokens, sq)
    inputs = {"input_ids": torch.zeros((2 * pairs, width + 1), dtype=torch.long),
              "attention_mask": torch.ones((2 * pairs, width + 1), dtype=torch.long),
              "completion_mask": completion_mask}
    attributes = {}
    if ref_chosen is None:
        ref_chosen, ref_rejected = np.zeros(pairs), np.zeros(pairs)
    if np.ndim(ref_chosen) == 2:
        ref_tokens = torch.tensor(np.concatenate([ref_chosen, ref_rejected]), dtype=dtype)
        attributes.update(precompute_ref_logps=False,
                          ref_model=lambda **kwargs: outputs(ref_tokens))
    else:
        inputs["ref_chosen_logps"] = torch.tensor(ref_chosen, dtype=dtype)
        inputs["ref_rejected_logps"] = torch.tensor(ref_rejected, dtype=dtype)
    types = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    trainer = trl_dpo_stand_in(
        loss_types=types, loss_weights=list(loss_weights or [1.0] * len(types)), beta=beta,
        label_smoothing=label_smoothing, ld_alpha=ld_alpha,
        f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef,
        use_weighting=log_sum_sq_probs is not None,
        args=SimpleNamespace(discopop_tau=discopop_tau, gradient_checkpointing_kwargs=None),
        **attributes)
    loss = trainer._compute_loss(model, inputs, return_outputs=False)
    loss.backward()
    grad = tokens.grad.numpy()
    metrics = {k: v[-1] for k, v in trainer._metrics["train"].items()}
    return loss.item(), grad[:pairs], grad[pairs:], metrics


class TRLGRPOStandIn:
    """A bare object carrying exactly the attributes TRL 1.16's
    ``GRPOTrainer._compute_loss`` reads; its log-prob hook returns the given tensors.
    Settings a test leaves out take TRL's defaults (no delta, no entropy bonus)."""

    def __init__(self, logps, entropies, *, loss_type, importance_sampling_level, beta, epsilon,
                 epsilon_high, use_bias_correction_kl, top_entropy_quantile,
                 max_completion_length, delta=None, entropy_coef=0.0, sapo_temperature_pos=1.0,
                 sapo_temperature_neg=1.05, vespo_k_pos=2.0, vespo_lambda_pos=3.0,
                 vespo_k_neg=3.0, vespo_lambda_neg=2.0):
        from collections import defaultdict
        from types import SimpleNamespace

        from trl.trainer.grpo_trainer import GRPOTrainer
        for name in ("_compute_loss", "get_high_entropy_mask"):
            setattr(self, name, getattr(GRPOTrainer, name).__get__(self))
        self.get_gamma_weights = GRPOTrainer.get_gamma_weights
        self.get_off_policy_mask = GRPOTrainer.get_off_policy_mask
        self._logps, self._entropies = logps, entropies
        self.args = SimpleNamespace(
            use_bias_correction_kl=use_bias_correction_kl, delta=delta, steps_per_generation=1,
            sapo_temperature_pos=sapo_temperature_pos, sapo_temperature_neg=sapo_temperature_neg,
            vespo_k_pos=vespo_k_pos, vespo_lambda_pos=vespo_lambda_pos, vespo_k_neg=vespo_k_neg,
            vespo_lambda_neg=vespo_lambda_neg)
        self.accelerator = _SingleProcessAccelerator()
        self.model = SimpleNamespace(training=True)
        self.aux_loss_enabled = False
        self.top_entropy_quantile = top_entropy_quantile
        self.off_policy_mask_threshold = None
        self.importance_sampling_level = importance_sampling_level
        self.beta = beta
        self.loss_type = loss_type
        self.epsilon_low = epsilon
        self.epsilon_high = epsilon if epsilon_high is None else epsilon_high
        self.use_vllm = False
        self.vllm_importance_sampling_correction = False
        self.current_gradient_accumulation_steps = 1
        self.max_completion_length = max_completion_length
        # GRPOTrainer.__init__: the static (non-adaptive) entropy bonus
        self.entropy_coef = entropy_coef
        self.use_adaptive_entropy = False
        self._entropy_bonus_enabled = entropy_coef != 0.0
        self._metrics = {"train": defaultdict(list), "eval": defaultdict(list)}

    def _get_per_token_logps_and_entropies(self, model, *args, **kwargs):
        return self._logps, self._entropies, None
