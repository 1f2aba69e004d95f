"""The README and the guides in docs/: short README, links that resolve, project-only text.

Each check is a function of the text that returns what it found wrong, so the tests below
also feed it bad text and expect it to complain (a check that cannot fail checks nothing).
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from paths import REPO

ROOT = REPO
README = ROOT / "README.md"
DOCS = ROOT / "docs"
README_MAX_LINES = 350

# Text the README and the guides must never hold: development history, the machinery
# that ran the work, and paths outside the repository.
FORBIDDEN = [
    (re.compile(r"\$OUT\b"), "$OUT"),
    (re.compile(r"\.\./shared"), "../shared"),
    (re.compile(r"\bDESIGN\.md"), "DESIGN.md"),            # docs/design.md is ours
    (re.compile(r"\bARCHITECTURE\.md"), "ARCHITECTURE.md"),
    (re.compile(r"\bsessions?\b", re.I), "session"),
    (re.compile(r"\brounds? of work\b", re.I), "round of work"),
    (re.compile(r"\bround \d+\b", re.I), "round N"),
    (re.compile(r"\bissue #?\d+", re.I), "issue N"),
    (re.compile(r"\bearlier work\b", re.I), "earlier work"),
]

# Modules that moved into packages (generation/, parallel/, runs/, masks/, ...): the
# guides name the new places.
OLD_MODULES = re.compile(
    r"\bsparsejax[./](sampling|rollouts|sharding|distributed|sparse_grads|run_dir|"
    r"checkpoint|fingerprint|metric_writers|mask_io|mask_indexing|toy_task)\b")

FENCE = re.compile(r"^```.*?^```[ \t]*$", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$", re.M)


def documents() -> list[Path]:
    return [README, *sorted(DOCS.glob("*.md"))]


def prose(text: str) -> str:
    """The text without fenced code blocks and inline code (links live in prose)."""
    return INLINE_CODE.sub("", FENCE.sub("", text))


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = INLINE_CODE.sub(lambda m: m.group(0)[1:-1], heading)
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)        # a link keeps its text
    text = re.sub(r"[^\w\- ]", "", text.strip().lower())
    return text.replace(" ", "-")


def anchors(text: str) -> set[str]:
    seen: dict[str, int] = {}
    out = set()
    for _, title in HEADING.findall(FENCE.sub("", text)):
        base = slug(title)
        n = seen.get(base, 0)
        seen[base] = n + 1
        out.add(base if n == 0 else f"{base}-{n}")
    return out


def link_problems(doc: Path, text: str, root: Path = ROOT) -> list[str]:
    """Relative links that leave the repository, name no file, or name a missing anchor."""
    problems = []
    for target in LINK.findall(prose(text)):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):      # http:, https:, mailto:
            continue
        path_part, _, anchor = target.partition("#")
        dest = (doc.parent / path_part).resolve() if path_part else doc.resolve()
        where = f"{doc.name}: ({target})"
        try:
            dest.relative_to(root.resolve())
        except ValueError:
            problems.append(f"{where} leaves the repository")
            continue
        if not dest.is_file():
            problems.append(f"{where} names no file")
            continue
        if anchor and dest.suffix == ".md" and anchor not in anchors(dest.read_text()):
            problems.append(f"{where} names no heading of {dest.name}")
    return problems


def forbidden_problems(name: str, text: str) -> list[str]:
    problems = []
    for number, line in enumerate(text.splitlines(), 1):
        for pattern, what in FORBIDDEN:
            if pattern.search(line):
                problems.append(f"{name}:{number}: {what!r} in {line.strip()[:100]!r}")
        match = OLD_MODULES.search(line)
        if match:
            problems.append(f"{name}:{number}: old module path {match.group(0)!r}")
    return problems


# ----------------------------------------------------------------------------- the docs


def test_docs_folder_has_the_guides():
    names = {p.name for p in DOCS.glob("*.md")}
    assert {"design.md", "runs.md", "parallel.md", "memory.md", "benchmarks.md"} <= names
    text = (DOCS / "design.md").read_text()
    assert "## What trains: the Trainable contract" in text
    assert "sparsejax/trainable/base.py" in text and "build_trainable" in text


def test_readme_is_short():
    lines = README.read_text().splitlines()
    assert len(lines) < README_MAX_LINES, f"README.md has {len(lines)} lines"


def test_readme_keeps_the_install_and_test_commands():
    text = README.read_text()
    assert 'pip install -e ".[dev]"' in text
    assert "pytest -q -n 2 --dist loadfile" in text


@pytest.mark.parametrize("doc", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(doc):
    assert link_problems(doc, doc.read_text()) == []


@pytest.mark.parametrize("doc", documents(), ids=lambda p: str(p.relative_to(ROOT)))
def test_text_speaks_only_of_the_project(doc):
    assert forbidden_problems(str(doc.relative_to(ROOT)), doc.read_text()) == []


# ------------------------------------------------------------- the checks can fail


def test_link_check_catches_bad_links(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.md").write_text("# A page\n\n## Some `code` here\n")
    doc = tmp_path / "README.md"
    good = "[a](docs/a.md) [b](docs/a.md#a-page) [c](docs/a.md#some-code-here) [w](https://x.y)"
    assert link_problems(doc, good, root=tmp_path) == []
    bad = ("[missing](docs/b.md) [out](../shared/DESIGN.md) [anchor](docs/a.md#nope) "
           "![img](docs/none.png)")
    problems = link_problems(doc, bad, root=tmp_path)
    assert len(problems) == 4, problems
    assert any("leaves the repository" in p for p in problems)
    assert any("names no heading" in p for p in problems)
    # Links inside code are not links.
    assert link_problems(doc, "```\n[x](nowhere.md)\n```\n`[y](nowhere.md)`",
                         root=tmp_path) == []


@pytest.mark.parametrize("text", [
    "written to $OUT/gpu_check.json",
    "see ../shared/data",
    "the notes in DESIGN.md",
    "ARCHITECTURE.md proposes",
    "measured in this Session",
    "the next round of work",
    "fixed in round 3",
    "before (issue 9)",
    "as earlier work showed",
    "from sparsejax import sampling; sparsejax.rollouts.rollout",
    "see sparsejax/run_dir.py",
])
def test_forbidden_check_catches(text):
    assert forbidden_problems("x.md", text) != []


@pytest.mark.parametrize("text", [
    "see [design.md](docs/design.md)",
    "median of 3 rounds, round-robin",
    "the slot sampler in sparsejax/generation/rollouts.py",
    "`sparsejax.dense_adamw(lr)` and checkpoints/",
    "the issue tracker",
])
def test_forbidden_check_passes_plain_words(text):
    assert forbidden_problems("x.md", text) == []
