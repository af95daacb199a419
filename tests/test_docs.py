"""Runs every ```python block of README.md and docs/*.md, and checks the output the blocks claim.

The blocks of one document run in order in one namespace (a later block may use what an earlier one defined), in a
temporary working directory that links the repository's `checkpoints/`, so that paths read as from the repository
root. A block that cannot run in a test (a long training run, a download) is fenced as ```text, ```bash or
```console, with a sentence saying why, and followed by a shortened ```python twin that runs. No other fence holds
code: a ```py block would never run, so it fails the test.

Expected output, the one convention: a comment `# -> TEXT` claims that the block prints a line TEXT. It may end the
line of the statement that prints, or stand on its own line (one comment per line of a multi-line output). The
claims of a block must be found in its stdout in order, each as a whole line, both sides stripped of surrounding
whitespace; `...` in TEXT stands for any characters (for values that vary from run to run). Lines nobody claims may
be printed in between. Remarks are any other comments, and so that none reads as an unchecked claim, a comment on a
line that calls `print`, or on the lines directly after one, must be a claim.
"""

import contextlib
import io
import re
import tokenize
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOC_FILES = ["README.md", *sorted(f"docs/{path.name}" for path in (ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(\S*)", re.MULTILINE)
NOT_RUN_FENCES = {"", "text", "bash", "console", "json", "yaml"}
PYTHON_BLOCK = re.compile(r"^```python\n(.*?)^```", re.MULTILINE | re.DOTALL)
CLAIM = re.compile(r"#\s*->\s?(.*)")


def python_blocks(text: str) -> list[tuple[int, str]]:
    """The ```python blocks of a markdown text, each with the line number of its first line of code."""
    return [(text.count("\n", 0, match.start(1)) + 1, match.group(1)) for match in PYTHON_BLOCK.finditer(text)]


def claims(code: str, path: Path) -> list[str]:
    """The `# -> TEXT` claims of a block of `path`, in order. Raises if a comment on or right after a print line is not
    one."""
    found, print_line, after_print = [], False, False
    for token in tokenize.generate_tokens(io.StringIO(code).readline):
        if token.type == tokenize.NAME and token.string == "print":
            print_line = True
        elif token.type == tokenize.COMMENT:
            match = CLAIM.fullmatch(token.string)
            if match:
                found.append(match.group(1).strip())
            elif print_line or (after_print and token.line.lstrip().startswith("#")):
                raise AssertionError(
                    f"{path}, line {token.start[0]}: the comment {token.string!r} stands on or after a print but is"
                    " not a `# -> ` claim; make it one, or move the remark above the print"
                )
        elif token.type == tokenize.NEWLINE:
            after_print, print_line = print_line, False
        elif token.type == tokenize.NL and not token.line.strip():
            after_print = False
    return found


def check_output(expected: list[str], output: str, where: str) -> None:
    """Asserts that each expected line (`...` a wildcard) matches a whole line of `output`, in order."""
    lines = [line.strip() for line in output.splitlines()]
    position = 0
    for text in expected:
        pattern = re.compile(".*".join(re.escape(part) for part in text.split("...")))
        while position < len(lines) and not pattern.fullmatch(lines[position]):
            position += 1
        assert position < len(lines), f"{where}: expected a line {text!r} (in order), the block printed:\n{output}"
        position += 1


def run_document(path: Path) -> int:
    """Runs the ```python blocks of `path` in order, in one namespace, and checks each block's claims; returns how
    many ran."""
    text = path.read_text(encoding="utf-8")
    stray = sorted(set(FENCE.findall(text)) - NOT_RUN_FENCES - {"python"})
    assert not stray, f"{path} has code fenced as {stray}: use ```python (it runs) or one of {sorted(NOT_RUN_FENCES)}"
    blocks = python_blocks(text)
    namespace = {"__name__": "__docs__"}
    for line, code in blocks:
        # Padding with blank lines makes messages and tracebacks point at the document's own line numbers.
        code = "\n" * (line - 1) + code
        expected = claims(code, path)
        stdout = io.StringIO()
        with contextlib.redirect_stdout(stdout):
            exec(compile(code, str(path), "exec"), namespace)
        check_output(expected, stdout.getvalue(), f"{path}, block at line {line}")
    return len(blocks)


@pytest.mark.parametrize("doc", DOC_FILES)
def test_doc_examples_run(doc, tmp_path, monkeypatch):
    (tmp_path / "checkpoints").symlink_to(ROOT / "checkpoints")
    monkeypatch.chdir(tmp_path)  # examples that save files write them here
    run_document(ROOT / doc)


def write_doc(directory: Path, code: str, fence: str = "python") -> Path:
    """A one-block markdown document holding `code`."""
    path = directory / "doc.md"
    path.write_text(f"Some text.\n\n```{fence}\n{code}```\n", encoding="utf-8")
    return path


@pytest.mark.parametrize(
    "code",
    [
        "print(2 + 2)  # -> 4\n",
        "print('a')\nprint('b')\nprint('c')\n# -> a\n# -> c\n",  # in order, unclaimed lines in between
        "print('  tensor([1.2345])  ')  # -> tensor([1.2...])\n",  # stripped lines, `...` a wildcard
        "# a remark before the print\nprint(1)\n\n# a remark after a blank line\n",
    ],
)
def test_checker_accepts_the_printed_output(tmp_path, code):
    assert run_document(write_doc(tmp_path, code)) == 1


@pytest.mark.parametrize(
    "code, message",
    [
        ("print(2 + 2)  # -> 5\n", "expected a line '5'"),
        ("print(2 + 2)  # -> 4.0\n", "expected a line '4.0'"),
        ("print('a b')  # -> a\n", "expected a line 'a'"),  # a whole line, not a part of one
        ("print('b')\nprint('a')\n# -> a\n# -> b\n", "expected a line 'b'"),  # out of order
        ("x = 1  # -> 1\n", "expected a line '1'"),  # a claim on a block that prints nothing
        ("print(4)  # 4\n", "is not a `# -> ` claim"),  # looks like a claim but would not be checked
        ("x = 1\nprint(4)\n# 4\n", "doc.md, line 6: the comment '# 4' stands on or after a print"),
    ],
)
def test_checker_rejects_a_wrong_claim(tmp_path, code, message):
    with pytest.raises(AssertionError, match=re.escape(message)):
        run_document(write_doc(tmp_path, code))


def test_checker_rejects_a_fence_that_would_not_run(tmp_path):
    with pytest.raises(AssertionError, match=re.escape("fenced as ['py']")):
        run_document(write_doc(tmp_path, "print(1)\n", fence="py"))


def test_blocks_share_one_namespace_and_report_document_lines(tmp_path):
    path = tmp_path / "doc.md"
    path.write_text("```python\nx = 21\n```\n\ntext\n\n```python\nprint(x * 2)  # -> 42\nraise KeyError(x)\n```\n")
    with pytest.raises(KeyError, match="21") as error:
        run_document(path)
    entry = error.traceback[-1]
    assert (entry.path, entry.lineno + 1) == (path, 9)  # the document and its line of `raise`
