"""Runs the ```python code blocks of the documentation, so that its examples never rot.

The blocks of one document run in order in one namespace (a later block may use what an earlier one defined), in a
temporary working directory. Add a document to `DOC_FILES` once its blocks run offline in a few seconds. A block meant
to be read but not run can be fenced as ```py instead.
"""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = [
    "README.md",
    "docs/model.md",
    "docs/processing.md",
    "docs/generation.md",
    "docs/pipelines.md",
    "docs/finetuning.md",
    "docs/conversion.md",
    "docs/distributed.md",
]
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)


def python_blocks(path: Path) -> list[tuple[int, str]]:
    """The ```python blocks of `path`, each with the line number of its first line of code."""
    text = path.read_text(encoding="utf-8")
    return [(text.count("\n", 0, match.start(1)) + 1, match.group(1)) for match in PYTHON_BLOCK.finditer(text)]


@pytest.mark.parametrize("doc", DOC_FILES)
def test_doc_examples_run(doc, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # examples that save files write them here
    blocks = python_blocks(ROOT / doc)
    assert blocks, f"{doc} has no ```python blocks"
    namespace = {"__name__": "__docs__"}
    for line, code in blocks:
        # Padding with blank lines makes tracebacks point at the document's own line numbers.
        exec(compile("\n" * (line - 1) + code, str(ROOT / doc), "exec"), namespace)
