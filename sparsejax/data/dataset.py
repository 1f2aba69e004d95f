"""Prompt datasets from the Hugging Face Hub or a local JSONL / JSON / Parquet file.

:func:`load_prompt_dataset` gives a :class:`datasets.Dataset` with two columns whatever the
source looks like:

* ``messages``: the chat prompt, a list of ``{"role", "content"}`` turns ending in a user turn;
  built from a text column (``prompt_field``: one user turn, the ``instruction`` appended on its
  own line) or taken from a chat column (``messages_field``: trailing assistant turns dropped,
  the ``instruction`` appended to the last user turn); a ``system_prompt`` is put first
  (replacing one the data may have);
* ``answer``: the gold answer as a string (numbers converted), passed to the reward functions.

:func:`read_prompt_data` reads the same prompts and answers as plain lists and also keeps
every column of the source rows (:class:`PromptData`): the GRPO trainer hands them to the
reward functions as keyword arguments (:mod:`sparsejax.rewards.arguments`).

Every error is one ``ValueError`` line that names the file (and line) or hub split, the row
and the field. A ``source`` that ends in ``.jsonl``, ``.json`` or ``.parquet``, or that names
an existing path, is a local file and never looked up on the Hub.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # datasets is imported lazily: importing it costs about a second
    import datasets

__all__ = ["LOCAL_SUFFIXES", "PromptData", "build_prompt_messages", "is_local_source", "load_prompt_dataset",
           "read_prompt_data", "render_prompts"]

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
_ROLES = ("system", "user", "assistant")


def is_local_source(source: str) -> bool:
    """True if ``source`` is a local file (by suffix, or because the path exists), not a hub id."""
    return source.lower().endswith(LOCAL_SUFFIXES) or os.path.exists(os.path.expanduser(source))


def _local_rows(path: Path) -> Iterator[tuple[str, dict]]:
    """(where, row) pairs of a local file; ``where`` is ``file:line`` or ``file row i``."""
    if path.is_dir():
        raise ValueError(f"--dataset {path}: is a folder; expected a .jsonl, .json or .parquet file.")
    if not path.is_file():
        raise ValueError(f"--dataset {path}: file not found.")
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(path)
        except Exception as err:
            raise ValueError(f"--dataset {path}: not a readable Parquet file ({type(err).__name__}: {err}).") from None
        for i, row in enumerate(table.to_pylist()):
            yield f"{path} row {i}", row
        return
    with open(path, encoding="utf-8") as f:
        head = f.read(1 << 16).lstrip()
        f.seek(0)
        if suffix == ".json" and head.startswith("["):
            try:
                rows = json.load(f)
            except json.JSONDecodeError as err:
                raise ValueError(f"{path}:{err.lineno}: invalid JSON ({err.msg}).") from None
            for i, row in enumerate(rows):
                yield f"{path} item {i}", row
            return
        for number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    yield f"{path}:{number}", json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number}: invalid JSON ({err.msg}).") from None


def _hub_rows(source: str, config: str | None, split: str) -> Iterator[tuple[str, dict]]:
    import datasets

    try:
        ds = datasets.load_dataset(source, config, split=split)
    except Exception as err:
        raise ValueError(f"--dataset {source!r} (config {config!r}, split {split!r}): cannot load "
                         f"({type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}).") from None
    for i, row in enumerate(ds):
        yield f"{source} [{split}] row {i}", row


def _field(row: Any, field: str, where: str, flag: str) -> Any:
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}.")
    if field not in row:
        raise ValueError(f"{where}: no field {field!r} ({flag}); fields: {', '.join(map(str, row))}.")
    return row[field]


def _answer(value: Any, where: str, field: str) -> str:
    if isinstance(value, bool) or value is None or not isinstance(value, (str, int, float)):
        raise ValueError(f"{where}: field {field!r} (--answer-field) is {type(value).__name__}; "
                         "expected a string or a number.")
    return value if isinstance(value, str) else str(value)


def _checked_messages(value: Any, where: str, field: str) -> list[dict[str, str]]:
    if not isinstance(value, list) or not value:
        raise ValueError(f"{where}: field {field!r} (--messages-field) must be a non-empty list of "
                         "{'role', 'content'} turns.")
    out = []
    for k, turn in enumerate(value):
        if (not isinstance(turn, dict) or turn.get("role") not in _ROLES
                or not isinstance(turn.get("content"), str)):
            raise ValueError(f"{where}: {field}[{k}] must be {{'role': one of {_ROLES}, 'content': str}}, "
                             f"got {str(turn)[:80]}.")
        out.append({"role": turn["role"], "content": turn["content"]})
    while out and out[-1]["role"] == "assistant":  # the model writes that turn
        out.pop()
    if not out or out[-1]["role"] != "user":
        raise ValueError(f"{where}: field {field!r} (--messages-field) has no user turn to answer.")
    return out


def build_prompt_messages(prompt: str | list[dict[str, str]], *, system_prompt: str | None = None,
                          instruction: str | None = None) -> list[dict[str, str]]:
    """Chat messages for one prompt (a text, or checked chat turns ending in a user turn).

    The ``instruction`` (e.g. "put your final answer within \\boxed{}") goes on its own line after
    the (last) user turn's text; a ``system_prompt`` becomes the first turn, replacing any other.
    """
    if isinstance(prompt, str):
        messages = [{"role": "user", "content": prompt.strip()}]
    else:
        messages = [dict(m) for m in prompt]
    if instruction:
        messages[-1]["content"] = f"{messages[-1]['content']}\n{instruction}"
    if system_prompt is not None:
        messages = [{"role": "system", "content": system_prompt}] + [m for m in messages if m["role"] != "system"]
    return messages


@dataclasses.dataclass
class PromptData:
    """Prompts, gold answers and the source's columns, one entry per row (see :func:`read_prompt_data`).

    Attributes:
        messages: the chat prompt of each row (see the module doc).
        answers: each row's gold answer as a string.
        columns: every field of the source rows by name, as read (the prompt and answer
            fields included), one value per row; a row without a field has ``None`` there.
    """

    messages: list[list[dict[str, str]]]
    answers: list[str]
    columns: dict[str, list[Any]]


def read_prompt_data(
    source: str | os.PathLike,
    *,
    config: str | None = None,
    split: str = "train",
    prompt_field: str | None = None,
    answer_field: str = "answer",
    messages_field: str | None = None,
    system_prompt: str | None = None,
    instruction: str | None = None,
    limit: int | None = None,
) -> PromptData:
    """Prompts, answers and all columns of a hub dataset or local file as a :class:`PromptData`.

    Same arguments, checks and errors as :func:`load_prompt_dataset`, which returns the
    ``messages`` and ``answers`` of this as a :class:`datasets.Dataset`.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}.")
    source = os.fspath(source)
    if is_local_source(source):
        rows = _local_rows(Path(source).expanduser())
    else:
        rows = _hub_rows(source, config, split)
    text_field = prompt_field or "prompt"
    messages, answers, columns = [], [], {}
    for where, row in rows:
        if limit is not None and len(answers) >= limit:
            break
        if messages_field is not None:
            prompt = _checked_messages(_field(row, messages_field, where, "--messages-field"), where, messages_field)
        else:
            prompt = _field(row, text_field, where, "--prompt-field")
            if not isinstance(prompt, str) or not prompt.strip():
                raise ValueError(f"{where}: field {text_field!r} (--prompt-field) must be a non-empty string.")
        answers.append(_answer(_field(row, answer_field, where, "--answer-field"), where, answer_field))
        messages.append(build_prompt_messages(prompt, system_prompt=system_prompt, instruction=instruction))
        for key in row:
            if key not in columns:  # a field first seen here: None in the rows before
                columns[key] = [None] * (len(answers) - 1)
        for key, values in columns.items():
            values.append(row.get(key))
    if not answers and limit != 0:
        raise ValueError(f"--dataset {source}: no rows.")
    return PromptData(messages, answers, columns)


def load_prompt_dataset(
    source: str | os.PathLike,
    *,
    config: str | None = None,
    split: str = "train",
    prompt_field: str | None = None,
    answer_field: str = "answer",
    messages_field: str | None = None,
    system_prompt: str | None = None,
    instruction: str | None = None,
    limit: int | None = None,
) -> datasets.Dataset:
    """Load prompts and gold answers as a :class:`datasets.Dataset` with ``messages`` and ``answer``.

    Args:
        source: a hub id (``"HuggingFaceH4/MATH-500"``), loaded with
            ``datasets.load_dataset(source, config, split=split)``, or a local ``.jsonl`` /
            ``.json`` (JSON Lines, or one JSON array) / ``.parquet`` file (``config`` and
            ``split`` unused).
        prompt_field: the text column of the question (default ``"prompt"``); ignored when
            ``messages_field`` is given.
        answer_field: the gold answer column (string or number).
        messages_field: a chat column (list of ``{"role", "content"}``) to use as the prompt.
        system_prompt, instruction: see :func:`build_prompt_messages`.
        limit: keep only the first ``limit`` rows.

    The source's other columns are not in the result; :func:`read_prompt_data` keeps them.

    Raises:
        ValueError: one line naming the file/line (or hub split and row) and the field.
    """
    import datasets

    data = read_prompt_data(source, config=config, split=split, prompt_field=prompt_field,
                            answer_field=answer_field, messages_field=messages_field,
                            system_prompt=system_prompt, instruction=instruction, limit=limit)
    return datasets.Dataset.from_dict({"messages": data.messages, "answer": data.answers})


def render_prompts(messages: list[list[dict[str, str]]], tokenizer: Any) -> list[str]:
    """Each chat prompt through ``tokenizer``'s chat template, ending where the answer begins."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("The tokenizer has no chat template; set tokenizer.chat_template first.")
    return [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in messages]
