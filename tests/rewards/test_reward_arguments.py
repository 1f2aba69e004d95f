"""Keyword arguments of reward functions: data columns, ``prompts``, ``completion_ids``."""

from __future__ import annotations

import pytest

from sparsejax.rewards import (
    CombinedReward,
    call_reward,
    check_columns,
    check_reward_arguments,
    combine_rewards,
    load_reward_function,
    repeat_rows,
    reward_keywords,
)

KWARGS = {"prompts": ["p0", "p1"], "completion_ids": [[1], [2, 3]], "level": [1, 2],
          "answer": ["raw 0", "raw 1"]}


def everything(completions, answers, **kwargs):
    everything.seen = kwargs
    return [0.0] * len(completions)


def plain(completions, answers):
    return [1.0] * len(completions)


def by_level(completions, answers, level, bonus=0.5):
    return [float(x) + bonus for x in level]


def needs_difficulty(completions, answers, difficulty):
    return [float(d) for d in difficulty]


def test_reward_keywords():
    assert reward_keywords(everything) == (None, frozenset(), {"completions", "answers"})
    assert reward_keywords(plain) == (frozenset(), frozenset(), {"completions", "answers"})
    assert reward_keywords(by_level)[:2] == ({"level", "bonus"}, {"level"})
    assert reward_keywords(lambda *args, prompts: args)[:2] == ({"prompts"}, {"prompts"})


def test_call_reward_passes_what_the_signature_takes():
    assert call_reward(everything, ["a", "b"], ["0", "1"], KWARGS) == [0.0, 0.0]
    assert everything.seen == KWARGS
    assert call_reward(plain, ["a", "b"], ["0", "1"], KWARGS) == [1.0, 1.0]
    assert call_reward(plain, ["a"], ["0"]) == [1.0]
    assert call_reward(by_level, ["a", "b"], ["0", "1"], KWARGS) == [1.5, 2.5]


def test_a_missing_column_is_a_one_line_error_naming_it_and_the_available_ones():
    with pytest.raises(ValueError) as err:
        call_reward(needs_difficulty, ["a", "b"], ["0", "1"], KWARGS)
    message = str(err.value)
    assert "\n" not in message
    assert "reward 'needs_difficulty': no column 'difficulty'" in message
    assert "available: answer, completion_ids, level, prompts" in message
    with pytest.raises(ValueError, match="no column 'difficulty'.*available: level, prompts"):
        check_reward_arguments(needs_difficulty, ["prompts", "level"])
    check_reward_arguments(by_level, ["level"])
    check_reward_arguments(plain, [])


def test_combined_reward_forwards_the_keywords_to_each_term():
    # gsm8k's second parameter is named `answer`: a data column of that name must not clash.
    combined = combine_rewards([(everything, 1.0), (plain, 1.0), (by_level, 2.0), ("gsm8k", 1.0)])
    got = combined(["\\boxed{7}", "8"], ["7", "9"], **KWARGS)
    assert got == pytest.approx([0 + 1 + 2 * 1.5 + 1, 0 + 1 + 2 * 2.5 + 0])
    assert everything.seen == KWARGS
    assert combined.last_means == pytest.approx({"everything": 0.0, "plain": 1.0, "by_level": 2.0,
                                                 "gsm8k": 0.5})
    assert combine_rewards([(plain, 1.0)])(["a"], ["x"]) == [1.0]  # no keywords at all
    # A column may be called `self`: the call's own parameters are positional-only.
    assert CombinedReward([("everything", everything, 1.0)])(["a"], ["x"], self=[1]) == [0.0]
    with pytest.raises(ValueError, match="reward 'needs_difficulty': no column 'difficulty'"):
        combine_rewards([(plain, 1.0), (needs_difficulty, 1.0)]).check_arguments(["level"])
    with pytest.raises(ValueError, match="no column 'difficulty'"):
        check_reward_arguments(combine_rewards([(needs_difficulty, 1.0)]), ["level"])
    with pytest.raises(ValueError, match="no column 'difficulty'"):
        combine_rewards([(needs_difficulty, 1.0)])(["a"], ["x"], level=[1])


def test_a_user_function_may_name_columns(tmp_path, monkeypatch):
    (tmp_path / "r.py").write_text("def by_level(completions, answers, level):\n"
                                   "    return [float(x) for x in level]\n"
                                   "def one_arg(completions):\n    return []\n")
    monkeypatch.chdir(tmp_path)
    fn = load_reward_function("r.py:by_level")
    assert combine_rewards([(fn, 1.0)])(["a", "b"], ["0", "0"], level=[3, 4]) == [3.0, 4.0]
    with pytest.raises(ValueError, match=r"must accept \(completions, answers"):
        load_reward_function("r.py:one_arg")


def test_columns_are_checked_and_repeated_per_completion():
    columns = check_columns({"level": (1, 2, 3), "id": ["a", "b", "c"]}, 3)
    assert columns == {"level": [1, 2, 3], "id": ["a", "b", "c"]}
    assert repeat_rows(columns, [2, 0], 2) == {"level": [3, 3, 1, 1], "id": ["c", "c", "a", "a"]}
    assert check_columns(None, 3) == {}
    for bad, message in [({"level": [1, 2]}, "column 'level' has 2 values; expected one per prompt \\(3\\)"),
                         ({"prompts": [1, 2, 3]}, "column 'prompts' has the name of a reward argument"),
                         ({"level": "abc"}, "column 'level' is str"),
                         ([1, 2, 3], "expected a mapping")]:
        with pytest.raises(ValueError, match=message):
            check_columns(bad, 3)
