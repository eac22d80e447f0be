"""Every ```bash and ```python example in README.md and docs/ runs, or says why it cannot here.

A block that needs what a test machine lacks (a GPU, hub weights, the network) carries a marker
comment on the line before its fence, ``<!-- needs: hub weights, GPU -->``, and is skipped with that
reason. Everything else runs, in the doc's order, in one temporary folder per doc:

* a ``bash`` block is a list of ``dt`` commands (lines joined at a trailing ``\\``, ``#`` comments
  dropped), each run through ``cli.main`` and expected to exit 0; ``dt generate`` and ``dt demo``
  get ``--steps 2`` when they name no ``--steps`` (CI-fast; the docs show the real call). Another
  command in a block that is not marked fails the test: it cannot run here, so it needs a marker.
* ``python`` blocks of one doc share a namespace, as a reader runs them one after the other.

The pictures an example reads (``image=low-64.png``, ``Image.open("photo.png")``) are made in the
folder first: a small RGB picture, or a white square on black for a name with ``mask`` in it, of the
size the name ends with (``-64``), else 64 pixels.
"""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
from PIL import Image, ImageDraw

from diffusion_templates import cli

ROOT = Path(__file__).resolve().parents[1]
DOCS = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "docs").glob("*/*.md")])
FENCE = re.compile(r"^```(\w*)\s*$")
NEEDS = re.compile(r"^<!--\s*needs:\s*(.+?)\s*-->$")
PICTURE = re.compile(r"""([\w./-]+\.png)""")
FAST_STEPS = "2"


@dataclass
class Block:
    doc: Path
    line: int
    language: str
    text: str
    needs: str | None

    @property
    def where(self) -> str:
        return f"{self.doc.relative_to(ROOT)}:{self.line}"


def blocks(doc: Path) -> list[Block]:
    """The fenced blocks of ``doc`` (any language), each with the ``needs:`` marker before it, if any."""
    found: list[Block] = []
    lines = doc.read_text().splitlines()
    i = 0
    while i < len(lines):
        match = FENCE.match(lines[i])
        if not match:
            i += 1
            continue
        start, language = i, match.group(1)
        end = next(j for j in range(i + 1, len(lines)) if lines[j].startswith("```"))
        before = next((lines[j].strip() for j in range(start - 1, -1, -1) if lines[j].strip()), "")
        marker = NEEDS.match(before)
        text = "\n".join(lines[start + 1 : end])
        found.append(Block(doc, start + 1, language, text, marker.group(1) if marker else None))
        i = end + 1
    return found


def commands(text: str) -> list[list[str]]:
    """A bash block's commands: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n", " ", text)
    return [words for line in joined.splitlines() if (words := shlex.split(line, comments=True))]


def make_pictures(text: str, folder: Path) -> None:
    for name in set(PICTURE.findall(text)):
        path = folder / name
        if path.exists() or name.startswith("out") or "/" in name:
            continue
        size = int(m.group(1)) if (m := re.search(r"-(\d+)\.png$", name)) else 64
        if "mask" in name or "silhouette" in name:
            picture = Image.new("L", (size, size), 0)
            ImageDraw.Draw(picture).rectangle([size // 4, size // 4, 3 * size // 4, 3 * size // 4], fill=255)
        else:
            picture = Image.new("RGB", (size, size), (40, 90, 160))
            ImageDraw.Draw(picture).ellipse([size // 4, size // 4, 3 * size // 4, 3 * size // 4], fill="red")
        picture.save(path)


def run_bash(block: Block) -> None:
    for words in commands(block.text):
        assert words[0] == "dt", (
            f"{block.where}: {shlex.join(words)!r} cannot run in a test: mark the block with "
            "<!-- needs: ... --> saying what it needs"
        )
        argv = words[1:]
        if argv and argv[0] in ("generate", "demo") and "--steps" not in argv:
            argv += ["--steps", FAST_STEPS]
        assert cli.main(argv) == 0, f"{block.where}: {shlex.join(words)} failed"


def _ids(doc: Path) -> str:
    return str(doc.relative_to(ROOT))


@pytest.mark.parametrize("doc", DOCS, ids=_ids)
def test_doc_examples_run(doc: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    runnable = [b for b in blocks(doc) if b.language in ("bash", "sh", "python")]
    if not runnable:
        pytest.skip("no bash or python examples")
    monkeypatch.chdir(tmp_path)
    make_pictures("\n".join(b.text for b in runnable), tmp_path)
    namespace: dict[str, object] = {"__name__": "__doc_example__"}
    skipped = []
    for block in runnable:
        if block.needs:
            skipped.append(f"{block.where} needs {block.needs}")
            continue
        if block.language == "python":
            exec(compile(block.text, block.where, "exec"), namespace)  # noqa: S102 (the docs' own code)
        else:
            run_bash(block)
    if len(skipped) == len(runnable):
        pytest.skip("; ".join(skipped))


def test_every_command_line_example_is_tested() -> None:
    """A fence without a language is read by nobody: a ``dt`` example there is a bash block unmarked."""
    untagged = [
        b.where
        for doc in DOCS
        for b in blocks(doc)
        if b.language == ""
        and any(line.startswith("dt ") for line in b.text.splitlines())
        and b.doc.name != "README.md"  # the README's command summary lists flags, not runnable lines
    ]
    assert not untagged, f"tag these ```bash so that they are tested: {untagged}"


def test_no_command_ends_in_a_continuation_with_nothing_after_it() -> None:
    dangling = [
        b.where
        for doc in DOCS
        for b in blocks(doc)
        if b.language in ("bash", "sh", "") and b.text.rstrip().endswith("\\")
    ]
    assert not dangling, f"these blocks end in a '\\' line continuation with no next line: {dangling}"


def test_markers_and_continuations_are_read() -> None:
    doc = ROOT / "docs" / "zoo" / "aesthetic.md"
    found = {b.language: b for b in blocks(doc)}
    assert found["python"].needs and "hub" in found["python"].needs
    assert commands("dt generate --prompt 'a b' \\\n    --template x y=1  # note\n\n") == [
        ["dt", "generate", "--prompt", "a b", "--template", "x", "y=1"]
    ]
