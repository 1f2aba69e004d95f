"""The generated arithmetic task: seeded, train/test disjoint, answers right, loadable as the
``arithmetic`` preset (library and command line), scored by its reward."""

from __future__ import annotations

import json
import re
import time

import pytest

from sparsejax.data import arithmetic
from sparsejax.data.presets import get_task, load_task_split

# The operation of every template, written here from the wording, not taken from the module.
# Numbers are read back from the question in order of appearance.
RECOMPUTE = {
    "add": lambda a, b: a + b, "together": lambda a, b: a + b, "picked": lambda a, b: a + b,
    "give": lambda a, b: a - b, "fewer": lambda a, b: a - b, "take": lambda a, b: a - b,
    "groups": lambda a, b: a * b, "share": lambda total, friends: total // friends,
    "add_sub": lambda a, b, c: a + b - c, "sub_add": lambda a, b, c: a - b + c,
    "boxes_plus": lambda a, b, c: a * b + c,
}


def numbers_of(row: dict) -> tuple[int, ...]:
    return tuple(int(x) for x in re.findall(r"\d+", row["question"]))


def key_of(row: dict) -> tuple:
    """(template, numbers) as the module keys a problem: ``share`` shows a * b and b."""
    n = numbers_of(row)
    if row["template"] == "share":
        n = (n[0] // n[1], n[1])
    return row["template"], n


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SPARSEJAX_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_a_split_is_a_function_of_its_seed():
    assert arithmetic.generate_split("train", 300, seed=3) == arithmetic.generate_split(
        "train", 300, seed=3)
    assert arithmetic.generate_split("train", 300, seed=3) != arithmetic.generate_split(
        "train", 300, seed=4)
    test = arithmetic.generate_split("test")
    assert len(test) == arithmetic.DEFAULT_TEST_SIZE >= 256
    assert test == arithmetic.generate_split("test", seed=arithmetic.DEFAULT_SEED)
    assert arithmetic.generate_split("test", 100) == test[:100]  # a prefix, whatever n
    assert arithmetic.generate_split("test", seed=1) != test
    assert len(arithmetic.generate_split("train", 25_000)) == 25_000  # any size


def test_train_and_test_are_disjoint_and_test_problems_distinct():
    test = arithmetic.generate_split("test")
    test_problems = [key_of(r) for r in test]
    assert len(set(test_problems)) == len(test_problems)
    assert {r["template"] for r in test} == set(arithmetic.TEMPLATES)
    for seed in (0, 1):
        train_keys = {key_of(r) for r in arithmetic.generate_split("train", 20_000, seed=seed)}
        assert not train_keys & set(test_problems)
        # not vacuous: the train draw covers most of the keys that are not test keys
        assert len(train_keys) > 0.5 * sum(
            1 for name, t in arithmetic.TEMPLATES.items() for n in t.keys()
            if arithmetic.split_of(name, n) == "train")
    # a test set of another seed is drawn from the same test keys
    assert {key_of(r) for r in arithmetic.generate_split("test", seed=5)} <= {
        (name, n) for name in arithmetic.TEMPLATES for n in arithmetic.held_out_keys(name)}
    # both sides hold about TEST_FRACTION / 1 - TEST_FRACTION of each template's keys
    for name in arithmetic.TEMPLATES:
        share = len(arithmetic.held_out_keys(name)) / len(list(arithmetic.TEMPLATES[name].keys()))
        assert 0.1 < share < 0.4, name


def test_answers_by_recomputation():
    assert set(RECOMPUTE) == set(arithmetic.TEMPLATES)
    rows = arithmetic.generate_split("test") + arithmetic.generate_split("train", 3000, seed=2)
    for row in rows:
        n = numbers_of(row)
        if row["template"] == "share":
            assert n[0] % n[1] == 0, row  # shared equally: no remainder
        want = RECOMPUTE[row["template"]](*n)
        assert want >= 0 and row["answer"] == str(want), row
        assert set(row) == {"question", "answer", "template"}


def test_bad_arguments():
    with pytest.raises(ValueError, match="split must be 'train' or 'test'"):
        arithmetic.generate_split("dev")
    with pytest.raises(ValueError, match="n must be an integer >= 0"):
        arithmetic.generate_split("train", -1)
    with pytest.raises(ValueError, match="exceeds the .* distinct test problems"):
        arithmetic.generate_split("test", 100_000)
    with pytest.raises(ValueError, match="not a valid problem"):
        arithmetic.make_row("give", (3, 5), __import__("random").Random(0))


def test_preset_loads_through_load_task_split(cache):
    test = arithmetic.generate_split("test")
    ds = load_task_split("arithmetic", "eval")
    assert len(ds) == len(test) and list(ds["answer"]) == [r["answer"] for r in test]
    first = ds["messages"][0]
    assert first == [{"role": "user",
                      "content": f"{test[0]['question']}\n{arithmetic.INSTRUCTION}"}]
    path = cache / "tasks" / "arithmetic" / "test.jsonl"
    assert [json.loads(line) for line in path.read_text().splitlines()] == test
    written = path.stat().st_mtime_ns
    load_task_split("arithmetic", "eval", limit=3)
    assert path.stat().st_mtime_ns == written  # up to date: not rewritten
    path.write_text(path.read_text().replace(test[0]["answer"], "999", 1))
    assert list(load_task_split("arithmetic", "eval", limit=1)["answer"]) == [test[0]["answer"]]
    train = load_task_split("arithmetic", "train", limit=50)
    assert list(train["answer"]) == [r["answer"] for r in arithmetic.generate_split("train")[:50]]


def test_preset_through_the_command_line_data_path(cache):
    from sparsejax.cli import grpo
    from sparsejax.cli.tasks import data_is_local, load_data, reward_specs
    args = grpo.parse_args(["--train-limit", "5", "--eval-limit", "4"], task="arithmetic")
    assert reward_specs(args) == ["gsm8k"] and data_is_local(args)
    data = load_data(args)
    assert data["train"].answers == [r["answer"] for r in arithmetic.generate_split("train")[:5]]
    assert data["eval"].answers == [r["answer"] for r in arithmetic.generate_split("test")[:4]]
    assert data["eval"].columns["template"] == [r["template"] for r in
                                                arithmetic.generate_split("test")[:4]]
    assert data["eval"].messages[0][-1]["content"].endswith("\n" + arithmetic.INSTRUCTION)


def test_the_reward_scores_right_and_wrong_answers():
    from sparsejax.rewards import get_reward
    reward = get_reward(get_task("arithmetic").reward)
    row = arithmetic.generate_split("test", 1)[0]
    gold, wrong = row["answer"], str(int(row["answer"]) + 1)
    completions = [gold, f"So there are {gold} left.", f"The answer is {gold}.",
                   f"\\boxed{{{gold}}}", wrong, f"The answer is {wrong}.",
                   f"{gold} - 1 = {wrong}", "I don't know.", ""]
    assert reward(completions, [gold] * len(completions)) == [1, 1, 1, 1, 0, 0, 0, 0, 0]
    # parsing is bounded: a megabyte of digits and spaces is scored at once
    start = time.perf_counter()
    assert reward(["1 " * 500_000 + gold], [gold]) == [1.0]
    assert time.perf_counter() - start < 5.0
