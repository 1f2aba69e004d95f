"""GRPO rollouts at the speed of the hardware: shared prefill, decode slots, shared prompt keys.

:func:`rollout` samples ``G`` completions for each of ``P`` prompts (sequence ``i`` is
sample ``i % G`` of prompt ``i // G``) in two compiled programs:

1. **Shared prefill** (:func:`prefill_program`). The ``P`` distinct prompts are
   prefilled once (left padded to a bucket ``Lp``); their keys/values (moved to start at
   position 0, padded to ``prompt_capacity``) and last-position logits stay on device and
   are shared by their ``G`` samples: a sequence's first token is drawn from its
   prompt's logits, and every decode step reads the prompt's keys from that one copy.
2. **Continuous batching** (:func:`decode_program`). A fixed number of decode slots
   (``num_slots``) step together; when a sequence stops (stop token or
   ``max_new_tokens``), its slot takes the next pending sequence at the next step. No
   slot idles while sequences are pending, so the work is the tokens actually
   generated, not ``batch x longest``. In the tail (every sequence has a slot), once at
   most half the slots are live they move into a loop of half the width
   (``width_buckets`` widths at most).
3. **Attention in two parts** (:mod:`sparsejax.generation.slot_attention`): over the
   prompt's shared keys (one matrix product per prompt for its ``G`` samples when the
   slots hold every sequence in order, the trainer's default), then chunk by chunk
   (``chunk_size`` positions, online softmax) over the slot's own generated keys, the
   chunks some live slot fills only.

The decode program does not depend on the prompts' width, only on ``prompt_capacity``:
a run whose prompts are bucketed to several widths compiles one prefill per width (a
forward pass) and one decode loop.

Guarantees:
    * determinism: the tokens of sequence ``i`` are a function of ``(key, i)`` and the
      model, whatever ``num_slots`` is: the uniform that draws token ``t`` of sequence
      ``i`` is ``uniform(fold_in(fold_in(key, i), t))``, every slot's computation is its
      own row, and chunks past a row's filled length add exact zeros. Bitwise as far
      as the backend's dot gives a row the same bits at every batch width (and in the
      per-prompt product of the prompt part): XLA:CPU does for widths 4 to 32, not 1, 2
      or 64 (there a near-tie can then draw another token); the loop never shrinks
      below 4;
    * ``temperature=0`` is greedy (argmax, ties to the lowest id): the same tokens as
      :func:`sparsejax.generation.sampler.generate` and transformers' ``generate``;
    * sampling draws from the same distribution as :func:`sparsejax.generation.sampler.sample_token`
      (temperature, then top-k / top-p by :func:`~sparsejax.generation.sampler.filter_logits`),
      by inverse CDF over two levels (blocks of ``_BLOCK`` tokens, then within the
      block) so that one uniform per token suffices (a Gumbel draw needs ``vocab``);
    * ``logprobs``, ``mask`` and ``lengths`` mean what they mean in
      :class:`~sparsejax.generation.sampler.SampleOutput`: ``logprobs`` equal
      :func:`~sparsejax.models.logprobs.completion_logprobs` of the same tokens;
    * one compiled prefill per ``(P, Lp, prompt_capacity)`` and one decode program per
      ``(P, prompt_capacity, G, num_slots, N, sampling, chunk_size, width_buckets)``,
      holding one ``while_loop`` per width (``num_slots``, halved ``width_buckets - 1``
      times at most, see :func:`phase_widths`); :class:`RolloutStats` reports their
      compile time apart from the run time.
"""

from __future__ import annotations

import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sparsejax.generation.sampler import SamplingParams, bucket_length, filter_logits, init_cache, prefill
from sparsejax.generation.slot_attention import SlotCache
from sparsejax.models import ops
from sparsejax.parallel.distributed import to_host

_BLOCK = 256  # vocabulary block of the two-level inverse-CDF draw


def sample_from_uniform(logits: jax.Array, u: jax.Array, sampling: SamplingParams
                        ) -> tuple[jax.Array, jax.Array]:
    """``(token [B] int32, logprob [B] float32)`` from ``logits [B, V]`` and ``u [B]`` in [0, 1).

    Greedy when ``sampling.temperature == 0``; otherwise the token whose interval of the
    (filtered) CDF contains ``u``. Never returns a token of probability 0. The log-prob
    is that of the full tempered distribution, as :func:`sparsejax.generation.sampler.sample_token`.
    """
    b, vocab = logits.shape
    if sampling.temperature == 0:
        token = jnp.argmax(logits, axis=-1).astype(jnp.int32)
        scaled = logits
    else:
        scaled = logits / sampling.temperature
        z = filter_logits(logits, sampling)
        nb = -(-vocab // _BLOCK)
        e = jnp.exp(z - jnp.max(z, axis=-1, keepdims=True))
        e = jnp.pad(e, ((0, 0), (0, nb * _BLOCK - vocab))).reshape(b, nb, _BLOCK)
        block_sum = jnp.sum(e, axis=-1)                                  # [B, nb]
        cum = jnp.cumsum(block_sum, axis=-1)
        x = u * cum[:, -1]
        last_block = nb - 1 - jnp.argmax((block_sum > 0)[:, ::-1], axis=-1)
        blk = jnp.minimum(jnp.sum(cum <= x[:, None], axis=-1), last_block)
        within = jnp.take_along_axis(e, blk[:, None, None], axis=1)[:, 0]   # [B, BLOCK]
        before = jnp.take_along_axis(cum - block_sum, blk[:, None], axis=1)[:, 0]
        xw = jnp.maximum(x - before, 0.0)
        last_in = _BLOCK - 1 - jnp.argmax((within > 0)[:, ::-1], axis=-1)
        pos = jnp.minimum(jnp.sum(jnp.cumsum(within, axis=-1) <= xw[:, None], axis=-1),
                          last_in)
        token = (blk * _BLOCK + pos).astype(jnp.int32)
    logp = jax.nn.log_softmax(scaled, axis=-1)
    return token, jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0]


class RolloutStats(NamedTuple):
    """What a :func:`rollout` cost.

    ``compile_s``: compiling its program (0 when cached); ``run_s``: running it
    (prefill + decode, to results on host); ``decode_steps``: decode iterations;
    ``slot_steps``: rows computed, the sum of the loop's width over its steps
    (``decode_steps x num_slots`` with one width); ``useful_tokens``: tokens generated (stop
    tokens included); ``occupancy = useful_tokens / slot_steps``; ``prefill_tokens``:
    prompt positions prefilled (``P x Lp``).
    """

    compile_s: float
    run_s: float
    decode_steps: int
    slot_steps: int
    useful_tokens: int
    occupancy: float
    prefill_tokens: int

    @property
    def tokens_per_s(self) -> float:
        """Steady-state useful tokens per second (compilation excluded)."""
        return self.useful_tokens / max(self.run_s, 1e-9)


class RolloutOutput(NamedTuple):
    """Result of :func:`rollout`, ``B = P x G`` sequences (prompt-major), ``N = max_new_tokens``.

    The first six fields are those of :class:`~sparsejax.generation.sampler.SampleOutput`
    (host numpy arrays): ``prompt_tokens, prompt_mask [B, Lp]``, ``tokens [B, N]``,
    ``logprobs [B, N]``, ``mask [B, N]``, ``lengths [B]``; then :class:`RolloutStats`.
    """

    prompt_tokens: np.ndarray
    prompt_mask: np.ndarray
    tokens: np.ndarray
    logprobs: np.ndarray
    mask: np.ndarray
    lengths: np.ndarray
    stats: RolloutStats


def _constrain(tree, sharding):
    """``tree``'s leaves laid out by ``sharding`` (a leading/slot-axis sharding); as is if None."""
    if sharding is None:
        return tree
    return jax.tree.map(lambda x: jax.lax.with_sharding_constraint(x, sharding), tree)


_SLOT_FIELDS = ("kv", "logits", "seq", "pos", "base")


#: The narrowest width the loop shrinks to: XLA:CPU's float32 dot gives a row the same
#: bits at every batch width from 4 to 32 (measured for SmolLM2's weight shapes), but
#: not at 1, 2 (a matrix-vector path) or 64, so shrinking stops at 4.
_MIN_WIDTH = 4


def phase_widths(num_slots: int, width_buckets: int, multiple: int = 1) -> list[int]:
    """The loop's widths: ``num_slots``, then halvings (each a multiple of ``multiple``
    and at least ``_MIN_WIDTH``), ``width_buckets`` of them at most."""
    widths = [num_slots]
    while (len(widths) < width_buckets and widths[-1] % 2 == 0
           and (widths[-1] // 2) % multiple == 0 and widths[-1] // 2 >= _MIN_WIDTH):
        widths.append(widths[-1] // 2)
    return widths


def _logits_fn(model):
    """``model.logits``; on CPU with tied embeddings, a dot with a ``[hidden, vocab]``
    copy of the embedding made once before the loop (XLA's CPU dot with the transposed
    ``[vocab, hidden]`` operand takes ~1.6x as long; the copy costs one embedding's memory)."""
    head = model.output_matrix()
    if not (model.config.tie_word_embeddings and jax.default_backend() == "cpu"
            and isinstance(head, jax.Array)):
        return model.logits
    head = jnp.copy(head)
    return lambda h: ops.matmul(h, head, preferred_element_type=jnp.float32)


def prefill_program(graphdef, params, prompt_tokens, prompt_mask, *, capacity):
    """The prompts' next-token logits and keys/values for :func:`decode_program`.

    Returns ``(logits [P, vocab] float32, prompt_kv, prompt_len [P])``, ``prompt_kv`` one
    ``(k [P, kv_heads, D, capacity], v [P, kv_heads, capacity, D])`` per layer with each
    prompt's keys moved to start at position 0 (left padding rolled to the end) and zeros
    past the prompts' width ``Lp <= capacity``.
    """
    model = nnx.merge(graphdef, params)
    num_prompts, lp = prompt_tokens.shape
    logits, cache = prefill(graphdef, params, prompt_tokens, prompt_mask,
                            init_cache(model.config, num_prompts, lp))
    prompt_len = jnp.sum(prompt_mask.astype(jnp.int32), axis=1)
    src = (jnp.arange(lp)[None] + (lp - prompt_len)[:, None]) % lp            # [P, Lp]
    roll = lambda x: jnp.take_along_axis(x, src[:, :, None, None], axis=1)
    pad = lambda x, axis: jnp.pad(x, [(0, capacity - lp if i == axis else 0)
                                      for i in range(x.ndim)])
    prompt_kv = [(pad(roll(c.k).transpose(0, 2, 3, 1), 3), pad(roll(c.v).transpose(0, 2, 1, 3), 2))
                 for c in cache.layers]
    return logits, prompt_kv, prompt_len


def decode_program(graphdef, params, pre_logits, prompt_kv, prompt_len, key, *, sampling,
                   num_samples, num_slots, chunk, pad_id, batch_sharding=None,
                   width_buckets=1, shard_multiple=1):
    """The slot loop of :func:`rollout` in phases of shrinking width, from
    :func:`prefill_program`'s outputs. Returns ``(tokens, logps, decode_steps, slot_steps)``."""
    model = nnx.merge(graphdef, params)
    config = model.config
    num_prompts = pre_logits.shape[0]
    n = sampling.max_new_tokens
    total = num_prompts * num_samples
    cache_len = -(-n // chunk) * chunk
    kvh, hd = config.num_kv_heads, config.head_dim

    def shard(st):
        return dict(st, **_constrain({f: st[f] for f in _SLOT_FIELDS}, batch_sharding))

    logits_of = _logits_fn(model)
    prompt_chunks = -(-jnp.max(prompt_len) // chunk)
    stop_ids = jnp.asarray(sampling.stop_token_ids or (-1,), jnp.int32)
    dtype = config.dtype
    s = num_slots
    state = shard(dict(
        kv=[(jnp.zeros((s, kvh, hd, cache_len), dtype),
             jnp.zeros((s, kvh, cache_len, hd), dtype)) for _ in range(config.num_layers)],
        logits=jnp.zeros((s, config.vocab_size), jnp.float32),
        seq=jnp.full((s,), -1, jnp.int32),        # sequence held by each slot (-1: none)
        pos=jnp.zeros((s,), jnp.int32),           # tokens it has generated so far
        base=jnp.zeros((s,), jnp.int32),          # its prompt's length
        next_seq=jnp.zeros((), jnp.int32),
        tokens=jnp.full((total, n), pad_id, jnp.int32),
        logps=jnp.zeros((total, n), jnp.float32),
        steps=jnp.zeros((), jnp.int32),
        slot_steps=jnp.zeros((), jnp.int32),
    ))

    def refill(st):
        """Empty slots take the next pending sequences (their prompt's keys are shared,
        their own cache is overwritten from position 0 on)."""
        empty = st["seq"] < 0
        cand = st["next_seq"] + jnp.cumsum(empty.astype(jnp.int32)) - 1
        take = empty & (cand < total)
        seq = jnp.where(take, cand, st["seq"])
        pid = jnp.maximum(seq, 0) // num_samples
        return dict(st, logits=jnp.where(take[:, None], pre_logits[pid], st["logits"]),
                    seq=seq, pos=jnp.where(take, 0, st["pos"]),
                    base=jnp.where(take, prompt_len[pid], st["base"]),
                    next_seq=st["next_seq"] + jnp.sum(take.astype(jnp.int32)))

    def body(st, grouped):
        st = refill(st)
        active = st["seq"] >= 0
        seq, pos, base = st["seq"], st["pos"], st["base"]
        keys = jax.vmap(lambda i, t: jax.random.fold_in(jax.random.fold_in(key, i), t))(
            jnp.maximum(seq, 0), pos)
        u = jax.vmap(jax.random.uniform)(keys)
        token, logp = sample_from_uniform(st["logits"], u, sampling)
        token = jnp.where(active, token, pad_id)
        row = jnp.where(active, seq, total)                      # out of range: dropped
        tokens = st["tokens"].at[row, pos].set(token, mode="drop")
        logps = st["logps"].at[row, pos].set(logp, mode="drop")
        done = active & (jnp.isin(token, stop_ids) | (pos + 1 >= n))

        write = jnp.where(active, pos, 0)          # an idle slot's key is overwritten
        fill = jnp.where(active, pos + 1, 0)       # by its next sequence's first token
        row_prompt = jnp.maximum(seq, 0) // num_samples
        caches = tuple(SlotCache(k, v, write, fill, -(-jnp.max(fill) // chunk), pk, pv,
                                 prompt_len, row_prompt, prompt_chunks, chunk, grouped)
                       for (k, v), (pk, pv) in zip(st["kv"], prompt_kv))
        h, caches = model.hidden(token[:, None], (base + pos)[:, None], None, caches, 0)
        logits = logits_of(h[:, 0])
        return shard(dict(st, kv=[(c.k, c.v) for c in caches], logits=logits,
                          seq=jnp.where(done, -1, seq), pos=pos + active.astype(jnp.int32),
                          tokens=tokens, logps=logps, steps=st["steps"] + 1,
                          slot_steps=st["slot_steps"] + seq.shape[0]))

    def compact(st, width):
        """The live slots (at most ``width``) moved into a ``width``-slot loop."""
        keep = jnp.argsort(st["seq"] < 0, stable=True)[:width]
        return shard(dict(st, **jax.tree.map(lambda x: x[keep],
                                             {f: st[f] for f in _SLOT_FIELDS})))

    # Every sequence in its own slot, in order: slot i holds sample i % G of prompt
    # i // G for the whole first phase, so a prompt's samples attend to its keys together.
    grouped = num_slots == total and num_prompts % shard_multiple == 0
    widths = phase_widths(num_slots, width_buckets, shard_multiple)
    st = state
    for i, width in enumerate(widths):
        narrower = widths[i + 1] if i + 1 < len(widths) else 0

        def cond(st, narrower=narrower):
            live = jnp.sum((st["seq"] >= 0).astype(jnp.int32))
            more = (live > 0) | (st["next_seq"] < total)
            if not narrower:
                return more
            return more & ~((st["next_seq"] >= total) & (live <= narrower))

        st = jax.lax.while_loop(cond, lambda st, g=grouped and i == 0: body(st, g),
                                st if i == 0 else compact(st, width))
    return st["tokens"], st["logps"], st["steps"], st["slot_steps"]


def rollout_program(graphdef, params, prompt_tokens, prompt_mask, key, *, capacity=None,
                    **decode):
    """:func:`prefill_program` then :func:`decode_program` (``decode``: its keywords) as
    one traced program, for planners and benchmarks that lower :func:`rollout` on their
    shapes (``experiments/memory_plan.py``)."""
    width, chunk = prompt_tokens.shape[1], decode["chunk"]
    logits, prompt_kv, prompt_len = prefill_program(
        graphdef, params, prompt_tokens, prompt_mask,
        capacity=-(-max(capacity or width, width) // chunk) * chunk)
    return decode_program(graphdef, params, logits, prompt_kv, prompt_len, key, **decode)


_COMPILED: dict[Any, Any] = {}


def _signature(tree) -> tuple:
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, tuple((np.shape(x), str(jnp.result_type(x)),
                           str(getattr(x, "sharding", None))) for x in leaves)


def _compiled(fn, graphdef, static: dict, *args) -> tuple[Any, float]:
    """``fn`` compiled for ``args`` (cached by their shapes, dtypes and shardings) and the
    seconds compiling it took (0 when cached)."""
    sig = (fn.__name__, graphdef, tuple(sorted(static.items(), key=lambda kv: kv[0])),
           _signature(args))
    compiled = _COMPILED.get(sig)
    if compiled is not None:
        return compiled, 0.0
    t0 = time.perf_counter()
    compiled = jax.jit(fn, static_argnums=0, static_argnames=tuple(static)).lower(
        graphdef, *args, **static).compile()
    _COMPILED[sig] = compiled
    return compiled, time.perf_counter() - t0


def rebucket(tokens: np.ndarray, mask: np.ndarray, pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Left-padded prompts re-padded to :func:`~sparsejax.generation.sampler.bucket_length` of the
    longest real prompt (drops or adds leading pad columns)."""
    target = bucket_length(int(mask.sum(axis=1).max(initial=1)))
    width = tokens.shape[1]
    if width > target:
        return tokens[:, width - target:], mask[:, width - target:]
    extra = target - width
    return (np.pad(tokens, ((0, 0), (extra, 0)), constant_values=pad_id),
            np.pad(mask, ((0, 0), (extra, 0))))


def rollout(graphdef: nnx.GraphDef, params: nnx.State, prompt_tokens: Any, prompt_mask: Any,
            key: jax.Array, sampling: SamplingParams | None = None, *,
            num_samples: int = 1, num_slots: int | None = None, chunk_size: int = 256,
            pad_id: int = 0, bucket: bool = True, width_buckets: int = 3,
            prompt_capacity: int | None = None,
            batch_sharding: jax.sharding.Sharding | None = None) -> RolloutOutput:
    """``num_samples`` completions for each left-padded prompt, by continuous batching.

    Args:
        graphdef, params: ``nnx.split(model)`` of a :class:`~sparsejax.models.Decoder`.
        prompt_tokens, prompt_mask: ``[P, W]`` left-padded distinct prompts.
        key: PRNG key; the result is a deterministic function of it (not of the slots).
        sampling: :class:`~sparsejax.generation.sampler.SamplingParams`.
        num_samples: ``G``, completions per prompt (sequence ``i`` is sample ``i % G``
            of prompt ``i // G``).
        num_slots: sequences decoded at once (default ``min(P x G, 64)``). On a CPU a
            step costs about ``weights + slots x per-token compute``; on a GPU more
            slots are nearly free until compute or KV reads dominate.
        chunk_size: generated positions per attention chunk; a decode step reads
            ``ceil(generated / chunk_size)`` chunks of every slot's cache (each chunk is
            a loop iteration: on a CPU one chunk of 256 costs less than four of 64).
        pad_id: token written after a sequence has stopped.
        bucket: re-pad the prompts to :func:`~sparsejax.generation.sampler.bucket_length`.
        width_buckets: how many loop widths: ``num_slots``, ``num_slots / 2``, ...
            (halvings while even). Once every sequence has a slot and at most half the
            slots are live, the live ones move into the next narrower loop, so the
            tail (slots finishing one by one) does not pay for the full width. 1: one
            width. Each width is its own ``while_loop`` in the same program.
        prompt_capacity: prompt positions the decode program holds (at least the
            prompts' width, rounded up to whole chunks); the prompt part of a decode
            step reads the chunks the longest prompt fills only. Calls whose prompts
            fit share one decode program, so a caller that knows its longest prompt
            (the trainer does) compiles it once; default: the prompts' width.
        batch_sharding: optional sharding of the slot axis (e.g. ``NamedSharding(mesh,
            PartitionSpec("data"))``): the slots' KV cache and per-slot arrays are
            constrained to it (``jax.lax.with_sharding_constraint``), so the cache is
            batch-sharded on a mesh; the tokens are the same as without it. ``None``
            (default) adds no constraint.

    Returns:
        :class:`RolloutOutput` (host arrays and :class:`RolloutStats`).
    """
    sampling = SamplingParams() if sampling is None else sampling
    tokens = np.asarray(jax.device_get(prompt_tokens)).astype(np.int32)
    mask = np.asarray(jax.device_get(prompt_mask)).astype(np.int32)
    if tokens.ndim != 2 or tokens.shape != mask.shape or tokens.shape[0] < 1:
        raise ValueError(f"prompt_tokens and prompt_mask must be equal [P, W] arrays, got "
                         f"{tokens.shape} and {mask.shape}")
    if not (mask.sum(axis=1) > 0).all():
        raise ValueError("prompt_mask: every prompt needs at least one real token")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    total = tokens.shape[0] * num_samples
    slots = min(total, 64) if num_slots is None else int(num_slots)
    if slots < 1:
        raise ValueError(f"num_slots must be >= 1, got {num_slots}")
    slots = min(slots, total)
    if bucket:
        tokens, mask = rebucket(tokens, mask, pad_id)
    if batch_sharding is not None and not isinstance(batch_sharding, jax.sharding.Sharding):
        raise ValueError(f"batch_sharding must be a jax.sharding.Sharding or None, got "
                         f"{type(batch_sharding).__name__}")
    if width_buckets < 1:
        raise ValueError(f"width_buckets must be >= 1, got {width_buckets}")
    multiple = 1
    if batch_sharding is not None:
        multiple = slots // batch_sharding.shard_shape((slots,))[0]
    width = max(tokens.shape[1], bucket_length(prompt_capacity or 1))
    capacity = -(-width // chunk_size) * chunk_size          # whole attention chunks
    static = dict(sampling=sampling, num_samples=int(num_samples), num_slots=slots,
                  chunk=int(chunk_size), pad_id=int(pad_id), batch_sharding=batch_sharding,
                  width_buckets=int(width_buckets), shard_multiple=multiple)
    prefill_fn, compile_s = _compiled(prefill_program, graphdef, dict(capacity=capacity),
                                      params, tokens, mask)
    t0 = time.perf_counter()
    prefilled = jax.block_until_ready(prefill_fn(params, tokens, mask))
    run_s = time.perf_counter() - t0
    decode_fn, seconds = _compiled(decode_program, graphdef, static, params, *prefilled, key)
    compile_s += seconds
    t0 = time.perf_counter()
    # to_host: on several processes a batch-sharded output is gathered on every process.
    out_tokens, logps, steps, slot_steps = to_host(decode_fn(params, *prefilled, key))
    run_s += time.perf_counter() - t0
    out_tokens, logps = np.asarray(out_tokens), np.asarray(logps)
    out_mask = _completion_mask(out_tokens, sampling)
    lengths = out_mask.sum(axis=1)
    steps, slot_steps = int(steps), int(slot_steps)
    useful = int(lengths.sum())
    stats = RolloutStats(compile_s, run_s, steps, slot_steps, useful,
                         useful / max(slot_steps, 1), int(tokens.size))
    rep = lambda a: np.repeat(a, num_samples, axis=0)
    return RolloutOutput(rep(tokens), rep(mask), out_tokens, logps * out_mask, out_mask,
                         lengths, stats)


def _completion_mask(tokens: np.ndarray, sampling: SamplingParams) -> np.ndarray:
    """1 up to and including the first stop token of each row (all ones if none)."""
    if not sampling.stop_token_ids:
        return np.ones(tokens.shape, np.int32)
    is_stop = np.isin(tokens, np.asarray(sampling.stop_token_ids))
    first = np.where(is_stop.any(axis=1), is_stop.argmax(axis=1), tokens.shape[1] - 1)
    return (np.arange(tokens.shape[1])[None] <= first[:, None]).astype(np.int32)
