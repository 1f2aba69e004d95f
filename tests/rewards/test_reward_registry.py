"""``exact`` and ``format`` rewards, the registry, user reward functions and weighted sums."""

from __future__ import annotations

import math
import sys

import pytest

from sparsejax.rewards import (
    REWARDS,
    CombinedReward,
    combine_rewards,
    exact_match_reward,
    format_reward,
    get_reward,
    gsm8k_accuracy_reward,
    load_reward_function,
    normalize_text,
    parse_reward_spec,
    reward_from_specs,
)


@pytest.mark.parametrize(
    "completion,gold,expected",
    [
        ("\\boxed{ Paris. }", "paris", 1.0),
        ("Paris", "Paris", 1.0),
        ("  the   Answer  ", "THE answer", 1.0),
        ("\\boxed{\\text{Evelyn}}", "Evelyn", 1.0),
        ("\\boxed{$B$}", "b", 1.0),
        ('"yes"', "yes", 1.0),
        ("\\boxed{Paris, France}", "Paris", 0.0),
        ("Paris is the answer", "Paris", 0.0),
        ("\\boxed{\uff17}", "7", 0.0),  # fullwidth digits stay different
        ("\\boxed{}", "", 0.0),  # an empty gold never matches
        ("cafe\u0301", "caf\u00e9", 1.0),  # NFC
        ("x", None, 0.0),
        (None, "x", 0.0),
        ("\\boxed{A}", "The answer is \\boxed{a}", 1.0),
    ],
)
def test_exact(completion, gold, expected):
    assert exact_match_reward([completion], [gold]) == [expected]


def test_normalize_text():
    assert normalize_text("  \\textbf{Yes}. ") == "yes"
    assert normalize_text("a" * 20_000) is None
    assert normalize_text(3) is None


@pytest.mark.parametrize(
    "completion,expected",
    [("so \\boxed{3}", 1.0), ("\\boxed{}", 0.0), ("\\boxed{   }", 0.0), ("\\boxed{3", 0.0), ("3", 0.0),
     ("\\fbox{x}", 1.0), ("\\boxed 5", 1.0), ([{"role": "assistant", "content": "\\boxed{1}"}], 1.0)],
)
def test_format(completion, expected):
    assert format_reward([completion]) == [expected]
    assert format_reward([completion], ["ignored"]) == [expected]


def test_registry_names_the_builtins():
    assert set(REWARDS) == {"gsm8k", "math", "exact", "format"}
    assert get_reward("gsm8k") is gsm8k_accuracy_reward
    with pytest.raises(ValueError, match="unknown reward 'gsm9k'.*gsm8k, math, exact, format"):
        get_reward("gsm9k")


@pytest.mark.parametrize(
    "spec,expected",
    [("math", ("math", 1.0)), ("format=0.1", ("format", 0.1)), (" exact = -2 ", ("exact", -2.0)),
     ("pkg.mod:fn=0.5", ("pkg.mod:fn", 0.5)), ("dir/r.py:fn", ("dir/r.py:fn", 1.0))],
)
def test_parse_reward_spec(spec, expected):
    assert parse_reward_spec(spec) == expected


@pytest.mark.parametrize("spec,message", [("format=x", "not a number"), ("format=inf", "finite"),
                                          ("=1", "missing reward name"), ("", "NAME")])
def test_parse_reward_spec_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_reward_spec(spec)


USER_REWARD = '''
def length_penalty(completions, answers, **kwargs):
    """-0.01 per character over 10."""
    return [-0.01 * max(0, len(c) - 10) for c in completions]

def one_arg(completions):
    return [0.0] * len(completions)

not_a_function = 3

def wrong_length(completions, answers):
    return [1.0]

def infinite(completions, answers):
    return [float("inf")] * len(completions)
'''


@pytest.fixture()
def user_file(tmp_path, monkeypatch):
    path = tmp_path / "my_rewards.py"
    path.write_text(USER_REWARD)
    monkeypatch.chdir(tmp_path)
    return path


def test_load_user_function_from_a_file_and_a_module(user_file, monkeypatch):
    fn = load_reward_function(f"{user_file}:length_penalty")
    assert fn(["a" * 15, "b"], [None, None]) == pytest.approx([-0.05, 0.0])
    assert load_reward_function("my_rewards.py:length_penalty")(["a" * 12], [1]) == pytest.approx([-0.02])
    monkeypatch.syspath_prepend(str(user_file.parent))
    sys.modules.pop("my_rewards", None)
    assert get_reward("my_rewards:length_penalty")(["a" * 11], [1]) == pytest.approx([-0.01])


@pytest.mark.parametrize(
    "spec,message",
    [
        ("missing.py:f", "file not found: missing.py"),
        ("my_rewards.py:nope", "has no attribute 'nope'"),
        ("my_rewards.py:not_a_function", "not callable"),
        ("my_rewards.py:one_arg", r"must accept \(completions, answers, \*\*kwargs\)"),
        ("no_such_module_xyz:f", "cannot import module 'no_such_module_xyz': ModuleNotFoundError"),
        ("my_rewards.py:", "expected 'module:function'"),
        ("broken.py:f", "cannot load broken.py: SyntaxError"),
    ],
)
def test_user_function_errors_are_one_line(user_file, spec, message):
    (user_file.parent / "broken.py").write_text("def f(:\n")
    with pytest.raises(ValueError, match=message) as err:
        get_reward(spec)
    assert "\n" not in str(err.value)


def test_combined_reward_weights_and_checks(user_file):
    reward = reward_from_specs(["gsm8k", "format=0.25", "my_rewards.py:length_penalty=2"])
    assert isinstance(reward, CombinedReward)
    assert reward.names == ["gsm8k", "format", "my_rewards.py:length_penalty"]
    completions = ["\\boxed{72}", "72", "\\boxed{71} and a long tail"]
    got = reward(completions, ["72", "72", "72"])
    expected = [1 + 0.25 + 0.0, 1 + 0 + 0, 0 + 0.25 + 2 * -0.01 * (len(completions[2]) - 10)]
    assert got == pytest.approx(expected)
    assert reward.last_means["gsm8k"] == pytest.approx(2 / 3)
    assert reward_from_specs("gsm8k,format=0.5")(["\\boxed{1}"], ["1"]) == [1.5]
    with pytest.raises(ValueError, match="returned 1 values for 2 completions"):
        reward_from_specs("my_rewards.py:wrong_length")(["a", "b"], [1, 2])
    with pytest.raises(ValueError, match="infinite"):
        reward_from_specs("my_rewards.py:infinite")(["a"], [1])
    with pytest.raises(ValueError, match="2 completions but 1 answers"):
        reward(["a", "b"], ["1"])
    with pytest.raises(ValueError, match="repeat"):
        reward_from_specs("gsm8k,gsm8k=2")
    with pytest.raises(ValueError, match="no reward"):
        reward_from_specs("")


def test_combine_with_functions_and_nan():
    def half(completions, answers):
        return [0.5] * len(completions)

    def unscorable(completions, answers):
        return [math.nan] * len(completions)

    combined = combine_rewards([(half, 2.0), ("format", 1.0)])
    assert combined(["\\boxed{1}", "x"], [0, 0]) == [2.0, 1.0]
    assert combined.names == ["half", "format"]
    total = combine_rewards([(half, 1.0), (unscorable, 1.0)])(["a"], [0])
    assert math.isnan(total[0])
