"""The documentation runs as written, cites only what the repository holds, and lists every environment variable.

Code blocks. Every fenced block of ``README.md`` and ``docs/*.md`` whose info string starts with ``python`` is
executed, alone, in a fresh namespace, in a temporary working directory (files it writes land there), with
warnings allowed. A block that cannot run alone — it needs a GPU cluster, or names the reader's own model or
data — is marked by the info string ``python fragment`` (GitHub still highlights it as Python); a fragment is only
checked to parse. Shell commands are indented blocks or ``bash`` fences and are not run here. Keep runnable
blocks small: random-weight models, one batch.
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
from pathlib import Path
from typing import List, NamedTuple

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})\s*([^`]*)$")


class Block(NamedTuple):
    path: Path
    line: int  # 1-based line of the opening fence
    info: str
    code: str

    @property
    def id(self) -> str:
        return f"{self.path.relative_to(ROOT)}:{self.line}"


def code_blocks(path: Path) -> List[Block]:
    """The fenced code blocks of a markdown file (CommonMark fences: ``` or ~~~, closed by a fence at least as
    long of the same character)."""
    blocks, lines = [], path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        m = FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence, info, start = m.group(1), m.group(2).strip(), i
        body = []
        i += 1
        while i < len(lines) and not (lines[i].strip().startswith(fence[0] * len(fence))
                                      and set(lines[i].strip()) == {fence[0]}):
            body.append(lines[i])
            i += 1
        blocks.append(Block(path, start + 1, info, "\n".join(body) + "\n"))
        i += 1
    return blocks


def _python_blocks():
    out = []
    for path in DOCS:
        for b in code_blocks(path):
            words = b.info.split()
            if words and words[0] in ("python", "py", "python3"):
                out.append(b)
    return out


PYTHON_BLOCKS = _python_blocks()
RUNNABLE = [b for b in PYTHON_BLOCKS if "fragment" not in b.info.split()[1:]]
FRAGMENTS = [b for b in PYTHON_BLOCKS if "fragment" in b.info.split()[1:]]


def test_the_docs_have_runnable_blocks():
    assert len(RUNNABLE) >= 5, [b.id for b in RUNNABLE]  # the parser finds them (guards the fence regex)


@pytest.mark.parametrize("block", RUNNABLE, ids=lambda b: b.id)
def test_python_block_runs_as_written(block, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = compile(block.code, block.id, "exec")
    namespace = {"__name__": "__doc_block__"}
    exec(code, namespace)  # noqa: S102 - the documentation's own examples


@pytest.mark.parametrize("block", FRAGMENTS, ids=lambda b: b.id)
def test_fragment_parses(block):
    ast.parse(block.code, filename=block.id)


def test_fence_parser_handles_info_strings_and_inline_backticks(tmp_path):
    md = tmp_path / "x.md"
    md.write_text("text ```python inline``` text\n\n```python fragment\na = 1\n```\n\n````python\nb = '```'\n````\n")
    blocks = code_blocks(md)
    assert [(b.info, b.code) for b in blocks] == [("python fragment", "a = 1\n"), ("python", "b = '```'\n")]


# ----------------------------------------------------------------------------------------------- self-contained
# Documents that live outside the repository must not be cited by it.
FOREIGN = re.compile(r"shared/(?:design|spec|research)|\bAPI\.md\b|\bKERNELS\.md\b|\bKERNEL_REVIEW\.md\b|\bANCHORS\.md\b")


def _tracked_text_files():
    try:
        names = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, timeout=30,
                               check=True).stdout.split()
    except (OSError, subprocess.SubprocessError):
        pytest.skip("not a git checkout: cannot list the repository's files")
    exts = (".py", ".md", ".cu", ".cuh", ".cpp", ".h", ".sh", ".toml", ".ini", ".cfg", ".txt", ".yml", ".yaml")
    return [n for n in names if n.endswith(exts) or n.startswith(".ci/")]


def test_no_file_cites_documents_outside_the_repository():
    this = Path(__file__).relative_to(ROOT).as_posix()
    offenders = []
    for name in _tracked_text_files():
        if name == this or name.startswith("benchmarks/results/"):
            continue
        path = ROOT / name
        if not path.is_file():
            continue
        for i, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if FOREIGN.search(line):
                offenders.append(f"{name}:{i}: {line.strip()[:100]}")
    assert not offenders, "cite docs/ (e.g. docs/design.md) instead:\n" + "\n".join(offenders)


def _anchors(path: Path) -> set:
    """GitHub's heading anchors of a markdown file: lower case, punctuation dropped, spaces to hyphens."""
    heads = re.findall(r"^#{1,6}\s+(.+?)\s*$", path.read_text(encoding="utf-8"), flags=re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in heads}


def _prose(path: Path) -> str:
    """The markdown of ``path`` without its fenced code blocks and inline code spans (code is not a link)."""
    lines, inside = [], set()
    for block in code_blocks(path):
        inside.update(range(block.line, block.line + block.code.count("\n") + 2))
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if i not in inside:
            lines.append(re.sub(r"`[^`]*`", "", line))
    return "\n".join(lines)


def test_relative_links_of_the_docs_resolve():
    broken = []
    for path in DOCS:
        for target, anchor in re.findall(r"\]\(([^)#\s]*)(?:#([^)\s]*))?\)", _prose(path)):
            if "://" in target or target.startswith("mailto:"):
                continue
            dest = (path.parent / target) if target else path
            if not dest.exists():
                broken.append(f"{path.relative_to(ROOT)} -> {target}")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{path.relative_to(ROOT)} -> {target}#{anchor} (no such heading)")
    assert not broken, broken


# ----------------------------------------------------------------------------------------------- environment
# Names that look like variables but are not read from the environment.
NOT_ENV = {"LORA_FUSED_ARCHS"}  # a C preprocessor define set by csrc_build.py


TABLE = "docs/environment.md"


def _documented_and_used():
    table = (ROOT / TABLE).read_text(encoding="utf-8")
    documented = set(re.findall(r"^\| `(LORA_FUSED_[A-Z0-9_]+)`", table, flags=re.M))
    used = set()
    for name in _tracked_text_files():
        path = ROOT / name
        if path.is_file() and name != TABLE and not name.startswith("benchmarks/results/"):
            used.update(re.findall(r"\bLORA_FUSED_[A-Z0-9_]+", path.read_text(encoding="utf-8", errors="replace")))
    used -= NOT_ENV
    assert used and documented, "no LORA_FUSED_* name found: the scan is broken"
    return documented, used


def test_every_environment_variable_is_in_the_table():
    documented, used = _documented_and_used()
    assert not used - documented, f"add to {TABLE}: {sorted(used - documented)}"


def test_every_variable_of_the_table_is_used():
    documented, used = _documented_and_used()
    assert not documented - used, f"in {TABLE} but used nowhere else in the repository: {sorted(documented - used)}"


def test_readme_links_the_design_note_and_the_environment_table():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "docs/design.md" in readme and "docs/environment.md" in readme
    assert os.path.exists(ROOT / "docs" / "design.md")
