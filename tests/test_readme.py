"""The README's Python examples run as written, in order, in one namespace.

Blocks fenced as ``python`` run here; blocks fenced as ``py`` need the hub or a GPU and
are shown, not run.
"""

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_python_blocks_run():
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert len(blocks) >= 2
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - our own docs
    # The optax example really moved the active entries and nothing else.
    sj, mask = namespace["sj"], namespace["mask"]
    assert sj.num_active(mask) == int(0.01 * 512 * 256) + int(0.01 * 256)
