"""GSM8K rewards (answer extraction, numeric comparison) and data loading / prompts."""

from __future__ import annotations

import time
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from sparsejax.data import (
    BOXED_INSTRUCTION,
    build_messages,
    format_prompt,
    load_gsm8k,
    parse_gold_answer,
    with_prompts,
)
from sparsejax.rewards import (
    MAX_SCAN_CHARS,
    answers_match,
    boxed_format_reward,
    completion_text,
    exact_match_reward,
    extract_answer,
    extract_boxed,
    format_reward,
    gsm8k_accuracy_reward,
    parse_number,
    score_completion,
)

from paths import SHARED

GSM8K_DIR = SHARED / "data" / "gsm8k"
QWEN_TOKENIZER = SHARED / "tokenizers" / "qwen2.5"

# ----------------------------------------------------------------------------------------------
# extraction


@pytest.mark.parametrize(
    "text,expected",
    [
        ("so the answer is \\boxed{18}.", "18"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("nested \\boxed{\\text{a {b} c}} end", "\\text{a {b} c}"),
        ("first \\boxed{3}, later \\boxed{ 4 }", "4"),
        ("\\boxed{12} then a truncated \\boxed{1", "12"),
        ("\\fbox{7}", "7"),
        ("\\boxed 5 is it", "5"),
        ("\\boxed{}", ""),
        ("\\boxed{\\{1, 2\\}}", "\\{1, 2\\}"),  # escaped braces are literal
        ("no box here", None),
        ("\\boxed{never closed", None),
        ("\\boxedx{3}", None),
        ("", None),
    ],
)
def test_extract_boxed(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    "text,expected",
    [
        ("Work... so \\boxed{42}. Also #### 41 and the answer is 40. 39", "42"),
        ("Natalia sold 72 clips.\n#### 72", "72"),
        ("#### $1,000.", "1,000"),
        ("I think #### 5\nthen #### 6", "6"),
        ("The answer is 18.", "18"),
        ("The final answer is: $-7.5$ dollars", "-7.5"),
        ("Answer: 3/4 of the cake", "3/4"),
        ("the answer is \\frac{3}{4}", "\\frac{3}{4}"),
        ("She has 3 apples and 5 pears, 8 fruits in total.", "8"),
        ("temperature: it fell to -12", "-12"),
        ("pages 3-4", "4"),  # a range, not a negative number
        ("It costs 1,234,567.89 in total", "1,234,567.89"),
        ("It is \u22125 degrees", "-5"),
        ("nothing numeric", None),
        ("", None),
    ],
)
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


# ----------------------------------------------------------------------------------------------
# parsing and comparison


@pytest.mark.parametrize(
    "text,expected",
    [
        ("18", Fraction(18)),
        ("18.0", Fraction(18)),
        ("18.00", Fraction(18)),
        ("18.", Fraction(18)),
        (" 18 ", Fraction(18)),
        ("-3", Fraction(-3)),
        ("+3", Fraction(3)),
        (".5", Fraction(1, 2)),
        ("0.125", Fraction(1, 8)),
        ("1,234", Fraction(1234)),
        ("1,234,567.5", Fraction(2469135, 2)),
        ("$1,234.50", Fraction(2469, 2)),
        ("\\$5", Fraction(5)),
        ("1\\!000", Fraction(1000)),
        ("1{,}000", Fraction(1000)),
        ("1\\,000", Fraction(1000)),
        ("1 000", Fraction(1000)),
        ("50\\%", Fraction(50)),
        ("50%", Fraction(50)),
        ("\\frac{1}{2}", Fraction(1, 2)),
        ("\\dfrac{3}{4}", Fraction(3, 4)),
        ("\\tfrac12", Fraction(1, 2)),
        ("-\\frac{1}{4}", Fraction(-1, 4)),
        ("2\\frac{1}{2}", Fraction(5, 2)),
        ("\\frac{1.5}{3}", Fraction(1, 2)),
        ("7/2", Fraction(7, 2)),
        ("\\text{18}", Fraction(18)),
        ("18 \\text{ dollars}", Fraction(18)),
        ("\\$18\\text{ per hour}", Fraction(18)),
        ("{18}", Fraction(18)),
        ("x = 18", Fraction(18)),
        ("\u221218", Fraction(-18)),
        ("1,2", None),
        ("3 or 4", None),
        ("1/0", None),
        ("\\frac{1}{0}", None),
        ("nan", None),
        ("inf", None),
        ("1e5", None),
        ("abc", None),
        ("", None),
        ("-", None),
        (".", None),
        ("9" * 65, None),
        (None, None),
        (18, None),
    ],
)
def test_parse_number(text, expected):
    assert parse_number(text) == expected


def test_percent_is_optional():
    assert parse_number("50%", strip_percent=False) is None
    assert answers_match("50%", "50")
    assert not answers_match("50%", "50", strip_percent=False)


@pytest.mark.parametrize(
    "pred,gold,match",
    [
        ("18", "18.0", True),
        ("18.00", "18", True),
        ("\\frac{36}{2}", "18", True),
        ("\\frac{1}{2}", "0.5", True),
        ("$1,000", "1000", True),
        ("-5", "5", False),
        ("0.333", "\\frac{1}{3}", False),  # exact comparison
        ("17.99", "18", False),
        ("", "18", False),
        ("18", "", False),
        (None, "18", False),
    ],
)
def test_answers_match(pred, gold, match):
    assert answers_match(pred, gold) is match


# ----------------------------------------------------------------------------------------------
# reward functions


def test_score_completion_and_reward_functions():
    completions = [
        "48/2 = 24, 48 + 24 = 72. The answer is \\boxed{72}.",
        "... so she sold \\boxed{72.0} clips",
        "#### 72",
        "The answer is 72",
        "I am not sure, maybe 71",
        "\\boxed{seventy-two}",
        "",
        [{"role": "assistant", "content": "Total: \\boxed{72}"}],
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": [{"type": "text", "text": "\\boxed{72}"}]}],
    ]
    raw_gold = "Natalia sold 48/2 = 24 clips in May.\n#### 72"
    rewards = gsm8k_accuracy_reward(completions, [raw_gold] * len(completions))
    assert rewards == [1.0, 1.0, 1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 1.0]
    assert gsm8k_accuracy_reward(completions[:2], ["72", "72"]) == [1.0, 1.0]
    assert boxed_format_reward(completions) == [1.0, 1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 1.0, 1.0]
    assert score_completion("\\boxed{1,234}", "#### 1,234") == 1.0
    assert completion_text([{"role": "assistant", "content": "hi"}]) == "hi"
    assert completion_text(object()) == ""


@settings(max_examples=150, deadline=None)
@given(st.one_of(st.text(max_size=300), st.binary(max_size=50), st.integers(), st.none(),
                 st.lists(st.dictionaries(st.text(max_size=8), st.text(max_size=8)), max_size=3)))
def test_reward_functions_never_raise(junk):
    assert score_completion(junk, "18") in (0.0, 1.0)
    assert boxed_format_reward([junk]) in ([0.0], [1.0])
    assert gsm8k_accuracy_reward([junk], [junk]) in ([0.0], [1.0])
    extract_answer(junk)
    parse_number(junk)


@settings(max_examples=150, deadline=None)
@given(st.text(alphabet="\\boxed{}frac0123456789-.,$% #answeris", max_size=200))
def test_latex_like_garbage_never_raises(text):
    score_completion(text, "18")
    extract_boxed(text)


@settings(max_examples=100, deadline=None)
@given(st.integers(min_value=-10**9, max_value=10**9), st.sampled_from(["plain", "commas", "decimal", "dollar"]))
def test_formatted_integers_roundtrip(n, style):
    text = {"plain": f"{n}", "commas": f"{n:,}", "decimal": f"{n}.00", "dollar": f"${n:,}"}[style]
    assert score_completion(f"So the total is \\boxed{{{text}}}.", str(n)) == 1.0
    assert score_completion(f"So the total is {text}.", str(n)) == 1.0
    assert score_completion(f"\\boxed{{{text}}}", str(n + 1)) == 0.0


@pytest.mark.parametrize(
    "huge",
    [
        "\\boxed{" * 100_000,
        "{" * 300_000 + "}" * 300_000,
        "9" * 500_000,
        "1," * 300_000,
        "\\boxed{" + "9" * 500_000 + "}",
        "-" * 500_000,
        "The answer is " * 50_000,
        "a" * 1_000_000 + " \\boxed{18}",
    ],
    ids=["unclosed_boxes", "deep_braces", "long_numeral", "comma_runs", "boxed_long_numeral", "dashes",
         "answer_is_runs", "long_text_then_box"],
)
def test_huge_strings_are_fast_and_safe(huge):
    start = time.perf_counter()
    score = score_completion(huge, "18")
    assert score == (1.0 if huge.endswith("\\boxed{18}") else 0.0)
    assert time.perf_counter() - start < 5.0


# ----------------------------------------------------------------------------------------------
# GSM8K data


def test_parse_gold_answer():
    assert parse_gold_answer("Some work\n#### 72") == "72"
    assert parse_gold_answer("x #### 1,600") == "1600"
    assert parse_gold_answer("#### -3") == "-3"
    with pytest.raises(ValueError):
        parse_gold_answer("no marker")
    with pytest.raises(ValueError):
        parse_gold_answer("#### ")


@pytest.mark.skipif(not GSM8K_DIR.is_dir(), reason="shared GSM8K data not present")
@pytest.mark.parametrize("split,count", [("train", 7473), ("test", 1319)])
def test_load_local_gsm8k(split, count):
    ds = load_gsm8k(split, data_dir=GSM8K_DIR)
    assert len(ds) == count
    assert set(ds.column_names) >= {"question", "answer", "gold"}
    for answer, gold in zip(ds["answer"], ds["gold"], strict=True):
        assert "," not in gold
        value = parse_number(gold)
        assert value is not None, gold
        assert value.denominator == 1  # GSM8K answers are integers
        # a perfect completion scores 1 against the raw answer column
        assert score_completion(f"\\boxed{{{gold}}}", answer) == 1.0
    assert len(load_gsm8k(split, data_dir=GSM8K_DIR, limit=5)) == 5


def test_load_gsm8k_errors(tmp_path):
    with pytest.raises(ValueError, match="split"):
        load_gsm8k("validation", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError):
        load_gsm8k("train", data_dir=tmp_path)
    (tmp_path / "train.jsonl").write_text('{"question": "q"}\n')
    with pytest.raises(ValueError, match="answer"):
        load_gsm8k("train", data_dir=tmp_path)


def test_load_gsm8k_defaults_to_the_hub(monkeypatch):
    import datasets

    calls = []

    def fake_load_dataset(path, name=None, split=None, **kwargs):
        calls.append((path, name, split))
        return datasets.Dataset.from_dict({"question": ["q1", "q2"], "answer": ["a\n#### 1,000", "b\n#### 7"]})

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    ds = load_gsm8k("test")
    assert calls == [("openai/gsm8k", "main", "test")]
    assert ds["gold"] == ["1000", "7"]


def test_prompts_use_boxed_instruction_and_chat_template():
    messages = build_messages("What is 2+2?")
    assert messages == [{"role": "user", "content": "What is 2+2?\n" + BOXED_INSTRUCTION}]
    assert "\\boxed{}" in BOXED_INSTRUCTION
    with_system = build_messages("Q", system_prompt="Be brief.")
    assert with_system[0] == {"role": "system", "content": "Be brief."}

    class RecordingTokenizer:
        chat_template = "stub"

        def apply_chat_template(self, msgs, add_generation_prompt=False, tokenize=True):
            assert add_generation_prompt is True and tokenize is False
            return "|".join(m["content"] for m in msgs) + "<assistant>"

    assert format_prompt("Q", RecordingTokenizer()) == "Q\n" + BOXED_INSTRUCTION + "<assistant>"

    class NoTemplate:
        chat_template = None

    with pytest.raises(ValueError, match="chat template"):
        format_prompt("Q", NoTemplate())


@pytest.mark.skipif(not QWEN_TOKENIZER.is_dir(), reason="shared Qwen2.5 tokenizer not present")
def test_prompt_with_real_qwen_chat_template():
    transformers = pytest.importorskip("transformers")
    import datasets

    tokenizer = transformers.AutoTokenizer.from_pretrained(QWEN_TOKENIZER)
    prompt = format_prompt("Natalia sold clips to 48 friends.", tokenizer)
    assert prompt.startswith("<|im_start|>system\n")
    assert "<|im_start|>user\nNatalia sold clips to 48 friends.\n" + BOXED_INSTRUCTION + "<|im_end|>" in prompt
    assert prompt.endswith("<|im_start|>assistant\n")
    ds = with_prompts(datasets.Dataset.from_dict({"question": ["a", "b"]}), tokenizer)
    assert ds["prompt"][1].endswith("<|im_start|>assistant\n") and "\nb\n" in ds["prompt"][1]


# ----------------------------------------------------------------------------------------------
# issue 13 red-team cases: time, subtractions, non-ASCII and spaced digits, length mismatch

_TEN_MB = 10_000_000
_ADVERSARIAL = {  # one per pattern the extraction searches for, and their combinations
    "boxed_dollar": "\\boxed $",
    "boxed_space": "\\boxed ",
    "boxed_unclosed": "\\boxed{",
    "fbox_unclosed": "\\fbox {",
    "braces": "{{}",
    "hash": "#### ",
    "hash_newline": "####\n",
    "answer_is": "The answer is ",
    "answer_is_word": "answer: x\n",
    "subtractions": "1 - ",
    "dashes": "-",
    "comma_runs": "1,",
    "digits": "9",
    "arabic_digits": "\u0667",
    "fracs": "answer is \\frac{",
}


@pytest.mark.parametrize("unit", list(_ADVERSARIAL.values()), ids=list(_ADVERSARIAL))
@pytest.mark.parametrize("size", [1_000_000, _TEN_MB], ids=["1MB", "10MB"])
def test_adversarial_text_is_scored_fast(unit, size):
    # 1 MB is inside the scanned window (proves the scan is linear: the old extract_boxed took
    # 2-9 s on 1 MB of "\\boxed $"); 10 MB proves the bound. Rewards run over the whole batch API.
    text = unit * (size // len(unit))
    for reward in (lambda: gsm8k_accuracy_reward([text], ["18"]), lambda: boxed_format_reward([text]),
                   lambda: exact_match_reward([text], ["18"])):
        start = time.perf_counter()
        assert reward() == [0.0]
        assert time.perf_counter() - start < 1.0


def test_answer_at_the_end_of_long_text_is_found():
    assert score_completion("x" * (MAX_SCAN_CHARS * 3) + " so \\boxed{18}", "18") == 1.0
    assert score_completion("x" * (MAX_SCAN_CHARS * 3) + " #### 18", "18") == 1.0


@pytest.mark.parametrize(
    "text,expected",
    [
        ("3 - 4", "4"),
        ("16 - 3 - 4", "4"),
        ("we get 16 - 3 - 4", "4"),
        ("(16) - 4", "4"),
        ("x - 4", "4"),
        ("x-4", "4"),
        ("50% - 4", "4"),
        ("-4", "-4"),
        ("= -4", "-4"),
        ("x = -4", "-4"),
        ("it fell to -4", "-4"),
        ("5 + -4", "-4"),
        ("5 \u2212 4", "4"),  # a unicode minus between numbers is a subtraction too
        ("\u22124", "-4"),
        ("#### -4", "-4"),
        ("The answer is -4.", "-4"),
        ("answer: 16 - 3 - 4", "16"),
    ],
)
def test_subtractions_are_not_negative_numbers(text, expected):
    assert extract_answer(text) == expected


def test_subtraction_regressions_score_against_negative_gold():
    assert score_completion("16 - 3 - 4", "-4") == 0.0
    assert score_completion("3 - 4", "-4") == 0.0
    assert score_completion("16 - 3 - 4", "9") == 0.0
    assert score_completion("so the change is = -4", "-4") == 1.0
    assert score_completion("\\boxed{-4}", "-4") == 1.0


@pytest.mark.parametrize(
    "text",
    ["\\boxed{\u0667\u0662}", "\\boxed{\uff17\uff12}", "\\boxed{7 2}", "\\boxed{7\\,2}", "\\boxed{7\\;2}",
     "\u0667\u0662", "\uff17\uff12", "The answer is \u0667\u0662", "#### \uff17\uff12", "\\boxed{1\u0662}",
     "72\u0663", "\u06637 2"],
    ids=["arabic_indic_boxed", "fullwidth_boxed", "spaced_boxed", "thin_space_boxed", "thick_space_boxed",
         "arabic_indic", "fullwidth", "arabic_answer_is", "fullwidth_hash", "mixed_scripts", "trailing_arabic",
         "leading_arabic"],
)
def test_non_ascii_and_spaced_digits_are_not_72(text):
    assert score_completion(text, "72") == 0.0


@pytest.mark.parametrize("text", ["\u0667\u0662", "\uff17\uff12", "7 2", "7\\,2", "1\u0662", "12 34"])
def test_parse_number_refuses_non_ascii_and_spaced_digits(text):
    assert parse_number(text) is None


def test_thousands_separators_still_parse():
    assert parse_number("1 000") == 1000
    assert parse_number("1 000 000.5") == Fraction(2000001, 2)
    assert parse_number("1\\,000") == 1000
    assert score_completion("\\boxed{12\\,345}", "12345") == 1.0


@pytest.mark.parametrize("reward", [gsm8k_accuracy_reward, exact_match_reward, format_reward],
                         ids=["gsm8k", "exact", "format"])
def test_batch_rewards_refuse_mismatched_lengths(reward):
    with pytest.raises(ValueError, match=r"3 completions but 2 answers") as err:
        reward(["a", "b", "c"], ["1", "2"])
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="must be a list"):
        reward("abc", ["1", "2", "3"])
