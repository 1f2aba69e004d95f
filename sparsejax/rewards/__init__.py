"""Verifiable rewards: answer extraction, the built-in rewards, a registry and weighted sums.

Every reward is a function ``reward(completions, answers, **kwargs) -> list[float]`` (see
:mod:`sparsejax.rewards.base`); the keyword arguments (``prompts``, ``completion_ids``, the
data's columns) reach it as its signature asks (:mod:`.arguments`). Built-ins, by name
(:data:`REWARDS`):

* ``gsm8k``: the extracted answer equals the gold numerically (:mod:`.numeric`);
* ``math``: LaTeX / expression equivalence with math-verify, time bounded (:mod:`.symbolic`);
* ``exact``: normalised string match; ``format``: a non-empty ``\\boxed{}`` (:mod:`.text`).

:func:`reward_from_specs` turns ``--reward`` values (``"math"``, ``"format=0.1"``,
``"my_pkg.rewards:fn"``, ``"path/to/file.py:fn"``) into one weighted reward (:mod:`.registry`).
"""

from sparsejax.rewards.arguments import (
    RESERVED_ARGUMENTS,
    call_reward,
    check_columns,
    check_reward_arguments,
    repeat_rows,
    reward_keywords,
)
from sparsejax.rewards.base import RewardFn, check_batch
from sparsejax.rewards.extract import (
    MAX_SCAN_CHARS,
    NUMBER_PATTERN,
    completion_text,
    extract_answer,
    extract_boxed,
    last_number,
)
from sparsejax.rewards.numeric import (
    MAX_NUMBER_CHARS,
    answers_match,
    gold_answer,
    gsm8k_accuracy_reward,
    parse_number,
    score_completion,
)
from sparsejax.rewards.registry import (
    REWARDS,
    CombinedReward,
    combine_rewards,
    get_reward,
    load_reward_function,
    parse_reward_spec,
    reward_from_specs,
)
from sparsejax.rewards.symbolic import MathVerifier, math_reward, require_math_verify
from sparsejax.rewards.text import boxed_format_reward, exact_match_reward, format_reward, normalize_text

__all__ = [
    "MAX_NUMBER_CHARS", "MAX_SCAN_CHARS", "NUMBER_PATTERN", "RESERVED_ARGUMENTS", "REWARDS", "CombinedReward",
    "MathVerifier", "RewardFn", "answers_match", "boxed_format_reward", "call_reward", "check_batch",
    "check_columns", "check_reward_arguments", "combine_rewards", "completion_text",
    "exact_match_reward", "extract_answer", "extract_boxed", "format_reward", "get_reward",
    "gold_answer", "gsm8k_accuracy_reward", "last_number", "load_reward_function", "math_reward",
    "normalize_text", "parse_number", "parse_reward_spec", "repeat_rows", "require_math_verify",
    "reward_from_specs", "reward_keywords", "score_completion",
]
