"""Arithmetic word problems: a generated task a 135M instruct model partly solves.

GSM8K is out of reach of the smallest chat models (SmolLM2-135M-Instruct scores about 0%),
so an RL run on it learns nothing on a CPU budget. This module generates short word problems
with one or two operations on small whole numbers, worded like GSM8K's easiest ones::

    Mia has 12 marbles. She gets 7 more marbles. How many marbles does Mia have now?
    Leo buys 4 boxes of pencils with 6 pencils in each box. He already had 5 pencils.
    How many pencils does Leo have now?

Each row is ``{"question", "answer", "template"}``: the answer is the integer result as a
string (never negative, never a fraction), the template is the name of the pattern the row
was drawn from (:data:`TEMPLATES`).

**Splits.** A problem is identified by its *key*, ``(template, numbers)``; the names and
objects are decoration. Every key belongs to exactly one side, train or test, by a hash of
the key (:func:`split_of`, about :data:`TEST_FRACTION` of keys are test keys), so the
splits are disjoint by construction, whatever their sizes and seeds: a test problem's
template-and-numbers never appear in any train set. The test split (:func:`generate_split`
``"test"``, :data:`DEFAULT_TEST_SIZE` rows) is a seeded shuffle of the test keys of every
template, taken round-robin over the templates, so its problems are distinct and its
templates balanced (the multiplication templates have fewer keys and fill fewer rows);
train problems are drawn independently (template uniform, numbers uniform over the
template's train keys), so a train set has any size (a key then repeats, each time with
other names and objects).

**Instruction and reward.** The preset (:mod:`sparsejax.data.presets`, ``--task
arithmetic``) puts :data:`INSTRUCTION` ("Answer with a single number.") after each question
and scores with the ``gsm8k`` reward (:func:`sparsejax.rewards.gsm8k_accuracy_reward`).
That reward takes the last ``\\boxed{}``, else the last ``#### N`` or "the answer is N",
else the last number of the completion, and compares it exactly with the gold integer; it
reads only the last million characters and runs in linear time, so any completion is
scored in bounded time. Both choices were measured on SmolLM2-135M-Instruct (greedy,
64 new tokens, ``experiments/base_accuracy.py``): the GSM8K preset's "reason step by step
... \\boxed{}" makes it ramble past 64 tokens, rarely writing the box; asking for a
single number gives shorter completions that mostly end in "The answer is N." or a sentence
holding the number, which the reward reads, and a higher start. An exact-match reward
(``exact``) would score those 0 and leave RL almost no signal; the ``gsm8k`` reward still
pays a bare number, so a policy that learns to answer tersely is scored right.

Everything here is the standard library; generating 10,000 rows takes well under a second.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import random
from collections.abc import Callable, Iterator, Sequence

__all__ = [
    "DEFAULT_SEED",
    "DEFAULT_TEST_SIZE",
    "DEFAULT_TRAIN_SIZE",
    "INSTRUCTION",
    "NAMES",
    "OBJECTS",
    "TEMPLATES",
    "TEST_FRACTION",
    "Template",
    "generate_split",
    "held_out_keys",
    "make_row",
    "split_of",
]

DEFAULT_SEED = 0
DEFAULT_TRAIN_SIZE = 10_000
DEFAULT_TEST_SIZE = 320
TEST_FRACTION = 0.25
"""About this fraction of every template's keys are test keys (:func:`split_of`)."""
INSTRUCTION = "Answer with a single number."
"""The line after each question (the ``arithmetic`` preset's instruction)."""

# (name, subject pronoun)
NAMES: tuple[tuple[str, str], ...] = (
    ("Mia", "She"), ("Leo", "He"), ("Emma", "She"), ("Noah", "He"), ("Ava", "She"),
    ("Liam", "He"), ("Zoe", "She"), ("Omar", "He"), ("Lily", "She"), ("Jack", "He"),
    ("Sara", "She"), ("Ben", "He"), ("Nina", "She"), ("Sam", "He"), ("Ella", "She"),
    ("Max", "He"), ("Ruby", "She"), ("Tom", "He"), ("Anna", "She"), ("Ravi", "He"),
)
OBJECTS: tuple[str, ...] = (
    "apples", "marbles", "stickers", "pencils", "cookies", "books", "coins", "cards",
    "balloons", "shells", "stamps", "flowers", "eggs", "candies", "beads", "crayons",
    "oranges", "buttons", "rocks", "toy cars",
)


@dataclasses.dataclass(frozen=True)
class Template:
    """One problem pattern.

    Attributes:
        name: the template's key in :data:`TEMPLATES` (part of every problem's key).
        text: a ``str.format`` pattern over ``name``, ``Pro`` (He/She), ``friend`` (another
            name), ``obj`` (a plural noun) and the numbers ``a``, ``b``, ``c`` (and
            ``ab``, the product ``a * b``, where the text shows it).
        ranges: the inclusive ``(low, high)`` range of each number.
        valid: whether a tuple of numbers makes a well-posed problem (e.g. no negative
            result).
        answer: the answer of the numbers.
    """

    name: str
    text: str
    ranges: tuple[tuple[int, int], ...]
    valid: Callable[[tuple[int, ...]], bool]
    answer: Callable[[tuple[int, ...]], int]

    def keys(self) -> Iterator[tuple[int, ...]]:
        """Every valid tuple of numbers, in lexicographic order."""
        spans = [range(lo, hi + 1) for lo, hi in self.ranges]
        return (n for n in itertools.product(*spans) if self.valid(n))


def _always(_: tuple[int, ...]) -> bool:
    return True


_TEMPLATE_LIST = (
    # one operation
    Template("add", "{name} has {a} {obj}. {Pro} gets {b} more {obj}. "
             "How many {obj} does {name} have now?",
             ((1, 12), (1, 12)), _always, lambda n: n[0] + n[1]),
    Template("together", "{name} has {a} {obj} and {friend} has {b} {obj}. "
             "How many {obj} do they have together?",
             ((1, 12), (1, 12)), _always, lambda n: n[0] + n[1]),
    Template("picked", "{name} picked {a} {obj} in the morning and {b} {obj} in the afternoon. "
             "How many {obj} did {name} pick in all?",
             ((1, 12), (1, 12)), _always, lambda n: n[0] + n[1]),
    Template("give", "{name} had {a} {obj}. {Pro} gave {b} {obj} to {friend}. "
             "How many {obj} does {name} have left?",
             ((2, 15), (1, 12)), lambda n: n[1] < n[0], lambda n: n[0] - n[1]),
    Template("fewer", "{name} has {a} {obj}. {friend} has {b} fewer {obj} than {name}. "
             "How many {obj} does {friend} have?",
             ((2, 15), (1, 12)), lambda n: n[1] < n[0], lambda n: n[0] - n[1]),
    Template("take", "There are {a} {obj} on the table. {name} takes {b} of them. "
             "How many {obj} are left on the table?",
             ((2, 15), (1, 12)), lambda n: n[1] < n[0], lambda n: n[0] - n[1]),
    Template("groups", "{name} has {a} bags. Each bag holds {b} {obj}. "
             "How many {obj} are in the bags in all?",
             ((2, 10), (2, 10)), _always, lambda n: n[0] * n[1]),
    Template("share", "{name} shares {ab} {obj} equally among {b} friends. "
             "How many {obj} does each friend get?",
             ((2, 10), (2, 10)), _always, lambda n: n[0]),
    # two operations
    Template("add_sub", "{name} has {a} {obj}. {Pro} finds {b} more {obj} and then loses {c}. "
             "How many {obj} does {name} have now?",
             ((1, 10), (1, 10), (1, 10)), lambda n: n[2] < n[0] + n[1],
             lambda n: n[0] + n[1] - n[2]),
    Template("sub_add", "{name} had {a} {obj}. {Pro} gave away {b} of them and then bought {c} more. "
             "How many {obj} does {name} have now?",
             ((2, 15), (1, 10), (1, 10)), lambda n: n[1] < n[0], lambda n: n[0] - n[1] + n[2]),
    Template("boxes_plus", "{name} buys {a} boxes of {obj} with {b} {obj} in each box. "
             "{Pro} already had {c} {obj}. How many {obj} does {name} have now?",
             ((2, 5), (2, 10), (1, 10)), _always, lambda n: n[0] * n[1] + n[2]),
)
TEMPLATES: dict[str, Template] = {t.name: t for t in _TEMPLATE_LIST}
"""The templates by name, in a fixed order."""


def split_of(template: str, numbers: Sequence[int]) -> str:
    """``"test"`` or ``"train"``: the side a problem's key belongs to (a hash of the key).

    The same key always goes to the same side, whatever the seed or the split sizes.
    """
    key = f"{template}:{','.join(str(int(x)) for x in numbers)}".encode()
    bucket = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "big") % 10_000
    return "test" if bucket < TEST_FRACTION * 10_000 else "train"


def held_out_keys(template: str) -> list[tuple[int, ...]]:
    """Every test key of one template, in lexicographic order."""
    return [n for n in TEMPLATES[template].keys() if split_of(template, n) == "test"]


def make_row(template: str, numbers: Sequence[int], rng: random.Random) -> dict[str, str]:
    """One problem row (``question``, ``answer``, ``template``): ``numbers`` in ``template``,
    with a person, a friend and an object drawn from ``rng``."""
    t = TEMPLATES[template]
    numbers = tuple(int(x) for x in numbers)
    if len(numbers) != len(t.ranges) or not t.valid(numbers):
        raise ValueError(f"template {template!r}: numbers {numbers} are not a valid problem.")
    (name, pro), (friend, _) = rng.sample(NAMES, 2)
    fields = dict(zip("abc", numbers))
    if len(numbers) >= 2:
        fields["ab"] = numbers[0] * numbers[1]
    question = t.text.format(name=name, Pro=pro, friend=friend, obj=rng.choice(OBJECTS),
                             **fields)
    return {"question": question, "answer": str(t.answer(numbers)), "template": template}


def _test_rows(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(f"arithmetic-test-{seed}")
    pools = []
    for name in TEMPLATES:
        keys = held_out_keys(name)
        rng.shuffle(keys)
        pools.append((name, keys))
    available = sum(len(k) for _, k in pools)
    if n > available:
        raise ValueError(f"test size {n} exceeds the {available} distinct test problems.")
    rows: list[dict[str, str]] = []
    for i in itertools.count():
        for name, keys in pools:
            if i < len(keys) and len(rows) < n:
                rows.append(make_row(name, keys[i], rng))
        if len(rows) == n:
            return rows
    raise AssertionError("unreachable")


def _train_rows(n: int, seed: int) -> list[dict[str, str]]:
    rng = random.Random(f"arithmetic-train-{seed}")
    names = list(TEMPLATES)
    rows = []
    while len(rows) < n:
        name = rng.choice(names)
        t = TEMPLATES[name]
        while True:  # uniform over the template's train keys: every template is 1/len of rows
            numbers = tuple(rng.randint(lo, hi) for lo, hi in t.ranges)
            if t.valid(numbers) and split_of(name, numbers) == "train":
                break
        rows.append(make_row(name, numbers, rng))
    return rows


def generate_split(split: str, n: int | None = None, *, seed: int = DEFAULT_SEED
                   ) -> list[dict[str, str]]:
    """The rows of one split, a pure function of ``(split, n, seed)``.

    Args:
        split: ``"train"`` or ``"test"``.
        n: number of rows (default :data:`DEFAULT_TRAIN_SIZE` / :data:`DEFAULT_TEST_SIZE`).
            A test set's problems are distinct, so ``n`` is at most the number of test keys
            (a few thousand); a train set has any size. The first ``m`` rows of a test
            split do not depend on ``n``.
        seed: the draw's seed.

    Raises:
        ValueError: one line, for an unknown split or a bad ``n``.
    """
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}.")
    if n is None:
        n = DEFAULT_TRAIN_SIZE if split == "train" else DEFAULT_TEST_SIZE
    if isinstance(n, bool) or not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}.")
    return _train_rows(n, seed) if split == "train" else _test_rows(n, seed)
