"""JSON Lines files: one JSON object per line."""

from __future__ import annotations

import json
import os
from typing import Any


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The objects of a JSON Lines file (blank lines skipped).

    Raises:
        ValueError: naming the file and line of a line that is not JSON.
    """
    rows = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number}: invalid JSON ({err.msg})") from err
    return rows
