"""Generic prompt datasets (hub id or local JSONL / JSON / Parquet) and the task presets."""

from __future__ import annotations

import json

import pytest

from sparsejax.data.dataset import load_prompt_dataset, read_prompt_data, render_prompts
from sparsejax.data.presets import TASKS, get_task, load_task_split

from paths import TEST_DATA

MATH_TINY = TEST_DATA / "math_tiny.jsonl"


def _write_jsonl(path, rows, blank_lines=False):
    lines = [json.dumps(r) for r in rows]
    path.write_text(("\n\n" if blank_lines else "\n").join(lines) + "\n")
    return path


def test_prompt_field_with_instruction_and_system_prompt(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"q": " What is 2+2? ", "a": 4}, {"q": "Name a colour.", "a": "red"}])
    ds = load_prompt_dataset(path, prompt_field="q", answer_field="a", system_prompt="Be brief.",
                             instruction="Answer in \\boxed{}.")
    assert ds.column_names == ["messages", "answer"]
    assert ds["answer"] == ["4", "red"]
    assert ds["messages"][0] == [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": "What is 2+2?\nAnswer in \\boxed{}."}]
    assert len(load_prompt_dataset(str(path), prompt_field="q", answer_field="a", limit=1)) == 1


def test_read_prompt_data_keeps_every_column_of_the_rows(tmp_path):
    rows = [{"q": "2+2?", "a": 4, "level": 1}, {"q": "3+3?", "a": "6", "tags": ["x"]},
            {"q": "4+4?", "a": 8, "level": 3}]
    path = _write_jsonl(tmp_path / "d.jsonl", rows)
    data = read_prompt_data(path, prompt_field="q", answer_field="a", instruction="Box it.")
    assert data.answers == ["4", "6", "8"]
    assert data.messages[1] == [{"role": "user", "content": "3+3?\nBox it."}]
    # Every field as read, the prompt and answer fields included; None where a row has none.
    assert data.columns == {"q": ["2+2?", "3+3?", "4+4?"], "a": [4, "6", 8],
                            "level": [1, None, 3], "tags": [None, ["x"], None]}
    assert read_prompt_data(path, prompt_field="q", answer_field="a", limit=1).columns == {
        "q": ["2+2?"], "a": [4], "level": [1]}
    # The Dataset keeps its two columns.
    assert load_prompt_dataset(path, prompt_field="q", answer_field="a").column_names == ["messages", "answer"]


def test_messages_field(tmp_path):
    rows = [{"chat": [{"role": "system", "content": "old"}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "the reference answer"}], "answer": "x"}]
    path = _write_jsonl(tmp_path / "chat.jsonl", rows)
    ds = load_prompt_dataset(path, messages_field="chat")
    assert ds["messages"][0] == [{"role": "system", "content": "old"}, {"role": "user", "content": "hi"}]
    ds = load_prompt_dataset(path, messages_field="chat", system_prompt="new", instruction="Box it.")
    assert ds["messages"][0] == [{"role": "system", "content": "new"}, {"role": "user", "content": "hi\nBox it."}]


def test_parquet_and_json_array(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"prompt": ["p1", "p2"], "answer": ["1", "2"]}), tmp_path / "d.parquet")
    assert load_prompt_dataset(tmp_path / "d.parquet")["answer"] == ["1", "2"]
    (tmp_path / "d.json").write_text(json.dumps([{"prompt": "p", "answer": 1.5}]))
    assert load_prompt_dataset(tmp_path / "d.json")["answer"] == ["1.5"]


@pytest.mark.parametrize(
    "content,kwargs,message",
    [
        ('{"prompt": "p", "answer": "1"}\n\n{"prompt": "q"}\n', {},
         r"d\.jsonl:3: no field 'answer' \(--answer-field\); fields: prompt"),
        ('{"prompt": "p", "answer": "1"}\n{bad json\n', {}, r"d\.jsonl:2: invalid JSON"),
        ('{"question": "p", "answer": "1"}\n', {}, r"d\.jsonl:1: no field 'prompt' \(--prompt-field\)"),
        ('{"prompt": "", "answer": "1"}\n', {}, r"d\.jsonl:1: field 'prompt' \(--prompt-field\) must be a non-empty"),
        ('{"prompt": "p", "answer": null}\n', {}, r"d\.jsonl:1: field 'answer' \(--answer-field\) is NoneType"),
        ('{"prompt": "p", "answer": ["1", "2"]}\n', {}, r"is list; expected a string or a number"),
        ('[1, 2]\n', {}, r"d\.jsonl:1: expected a JSON object"),
        ('{"m": [{"role": "user"}], "answer": "1"}\n', {"messages_field": "m"}, r"d\.jsonl:1: m\[0\] must be"),
        ('{"m": [{"role": "assistant", "content": "a"}], "answer": "1"}\n', {"messages_field": "m"}, "no user turn"),
        ('{"m": "hello", "answer": "1"}\n', {"messages_field": "m"}, "must be a non-empty list"),
        ("\n", {}, "no rows"),
    ],
)
def test_errors_name_file_line_and_field(tmp_path, content, kwargs, message):
    path = tmp_path / "d.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as err:
        load_prompt_dataset(path, **kwargs)
    assert "\n" not in str(err.value)


def test_missing_local_file_is_not_a_hub_lookup(tmp_path, monkeypatch):
    import datasets

    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: pytest.fail("hub lookup"))
    with pytest.raises(ValueError, match=r"--dataset .*nope\.jsonl: file not found"):
        load_prompt_dataset(tmp_path / "nope.jsonl")
    with pytest.raises(ValueError, match="is a folder"):
        load_prompt_dataset(tmp_path)


def test_hub_source_uses_config_and_split(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        if split == "missing":
            raise ValueError("Unknown split \"missing\".\nShould be one of ['test'].")
        if path == "openai/gsm8k":
            return datasets.Dataset.from_dict({"question": ["q"], "answer": ["w\n#### 7"]})
        return datasets.Dataset.from_dict({"problem": ["p"], "answer": ["\\frac12"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load_prompt_dataset("HuggingFaceH4/MATH-500", split="test", prompt_field="problem")
    assert calls == [("HuggingFaceH4/MATH-500", None, "test")]
    assert ds["messages"][0][-1]["content"] == "p"
    with pytest.raises(
            ValueError, match=r"'HuggingFaceH4/MATH-500' \(config None, split 'missing'\): cannot load") as err:
        load_prompt_dataset("HuggingFaceH4/MATH-500", split="missing")
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"HuggingFaceH4/MATH-500 \[test\] row 0: no field 'question'"):
        load_prompt_dataset("HuggingFaceH4/MATH-500", split="test", prompt_field="question")

    assert load_task_split("gsm8k", "eval")["answer"] == ["w\n#### 7"]
    assert calls[-1] == ("openai/gsm8k", "main", "test")


def test_presets():
    assert set(TASKS) == {"gsm8k", "math", "arithmetic"}
    assert get_task("math").reward == "math" and get_task("gsm8k").reward == "gsm8k"
    assert get_task("arithmetic").reward == "gsm8k"
    with pytest.raises(ValueError, match="unknown task 'mth'.*gsm8k, math, arithmetic"):
        get_task("mth")


def test_math_preset_on_the_local_fixture():
    pytest.importorskip("math_verify")
    from sparsejax.rewards import get_reward

    train = load_task_split("math", "train", source=MATH_TINY)  # gold from the solution's \boxed{}
    test = load_task_split("math", "eval", source=MATH_TINY, limit=4)
    assert len(train) == 6 and len(test) == 4
    assert "\\boxed{}" in train["messages"][0][-1]["content"]
    reward = get_reward(get_task("math").reward)
    golds = [json.loads(line)["answer"] for line in MATH_TINY.read_text().splitlines()]
    right = [f"Reasoning. So the answer is $\\boxed{{{g}}}$." for g in golds]
    assert reward(right, train["answer"]) == [1.0] * 6
    assert reward(right[:4], test["answer"]) == [1.0] * 4
    # equivalent forms count, a wrong answer does not
    assert reward(["\\boxed{0.75}", "\\boxed{x=4}", "\\boxed{(3, \\pi/2)}", "\\boxed{\\sqrt{50}}"],
                  test["answer"]) == [1.0, 1.0, 1.0, 1.0]
    assert reward(["\\boxed{0.7}", "\\boxed{5}", "\\boxed{(3, \\pi)}", "\\boxed{5\\sqrt{3}}"],
                  test["answer"]) == [0.0] * 4


def test_render_prompts_through_a_chat_template():
    class Tokenizer:
        chat_template = "stub"

        def apply_chat_template(self, messages, add_generation_prompt=False, tokenize=True):
            assert add_generation_prompt and not tokenize
            return "".join(f"<{m['role']}>{m['content']}" for m in messages) + "<assistant>"

    assert render_prompts([[{"role": "user", "content": "q"}]], Tokenizer()) == ["<user>q<assistant>"]

    class NoTemplate:
        chat_template = None

    with pytest.raises(ValueError, match="chat template"):
        render_prompts([[{"role": "user", "content": "q"}]], NoTemplate())
