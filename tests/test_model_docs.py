"""The adapter docs run as written: every ```python block of docs/multitask.md (the multi-task example: two tasks,
different ranks, switch, save both, load both into a fresh model, merge one) and docs/presets.md (what each preset
adapts on a hierarchical model) runs alone, in a fresh namespace, in a temporary directory."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parent.parent / "docs"
BLOCKS = [(path.name, i, code) for path in (DOCS / "multitask.md", DOCS / "presets.md")
          for i, code in enumerate(re.findall(r"^```python\n(.*?)^```", path.read_text(), re.S | re.M))]


def test_the_examples_are_found():
    assert {name for name, _, _ in BLOCKS} == {"multitask.md", "presets.md"}


@pytest.mark.parametrize("name,index,code", BLOCKS, ids=[f"{n}:{i}" for n, i, _ in BLOCKS])
def test_doc_example_runs(name, index, code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    exec(compile(code, f"docs/{name} block {index}", "exec"), {"__name__": "__main__"})
