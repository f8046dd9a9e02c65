"""The project carries the facts it relies on: every cited anchor exists, nothing cites outside.

Code and docs cite facts as ``PATH#ANCHOR`` with PATH from the repository root
(``protocol/VSCARD.md#Q12``, ``docs/lab.md#V3``; a list goes on as ``#Q1 ..
#Q16`` or ``, #L12``), and Markdown links as ``[text](relative.md#ANCHOR)``;
the file must exist and carry ``<a id="ANCHOR"></a>``.  Nothing may cite a
document the repository does not hold: a ``*.md`` name that is no file here,
the research notes ("notes §3", "gotcha 10"), "the brief" or an issue number.
"""

from __future__ import annotations

import os
import posixpath
import re
from collections.abc import Callable
from functools import cache
from pathlib import Path

import pytest

from lab import ROOT

SCANNED = ("ccidbridge", "lab", "tests", "benchmarks", "docs", "protocol", "README.md")
SUFFIXES = {".py", ".md", ".c", ".sh", ".rng", ".toml", ".txt"}
PENDING: set[str] = set()
SELF = "tests/test_doc_anchors.py"  # states the forbidden words in order to look for them

_TOP = "|".join(re.escape(p) for p in SCANNED if "." not in p)
#: ``docs/lab.md#V3``, then optionally `` .. #V9`` / ``, #V4`` / `` and #V6`` (same file).
CITATION = re.compile(
    rf"(?<![\w/.-])((?:{_TOP})/[\w./-]*\w\.\w+)#([\w-]+)((?:\s*(?:\.\.|,|and)\s*#[\w-]+)*)"
)
MD_LINK = re.compile(r"\]\(([^)\s#]*)#([\w-]+)\)")
MD_NAME = re.compile(r"(?<![\w/.-])([\w./-]*\w\.md)\b")
OUTSIDE = re.compile(r"notes?\s*§|\bgotcha\b|\bthe brief\b|/work/|\bissue\s+#?\d+", re.I)
ANCHOR = re.compile(r'<a id="([\w-]+)"></a>')


def scanned_files() -> list[str]:
    out = []
    for top in SCANNED:
        path = ROOT / top
        files = [path] if path.is_file() else sorted(path.rglob("*"))
        for f in files:
            if f.is_file() and f.suffix in SUFFIXES and "__pycache__" not in f.parts:
                out.append(str(f.relative_to(ROOT)))
    return out


@cache
def anchors_of(path: str) -> frozenset[str] | None:
    """The anchors in the repository file ``path``, or None when there is no such file."""
    f = ROOT / path
    if not f.is_file():
        return None
    return frozenset(ANCHOR.findall(f.read_text(encoding="utf-8")))


@cache
def md_names() -> frozenset[str]:
    """Every Markdown file of the repository, by path from the root and by name."""
    skip = {".git", ".venv", ".cache", "node_modules", "build"}
    files = []
    for top, dirs, names in os.walk(ROOT):  # pruned: .cache holds whole Debian roots
        dirs[:] = [d for d in dirs if d not in skip]
        files += [(Path(top) / n).relative_to(ROOT) for n in names if n.endswith(".md")]
    return frozenset({str(p) for p in files} | {p.name for p in files})


def problems(path: str, text: str,
             anchors: Callable[[str], frozenset[str] | None] = anchors_of,
             md: Callable[[], frozenset[str]] = md_names) -> list[str]:
    """What is wrong with the citations in ``text`` (the file ``path``, from the root)."""
    out: list[str] = []

    def cite(where: int, target: str, anchor: str) -> None:
        line = text.count("\n", 0, where) + 1
        found = anchors(target)
        if found is None:
            out.append(f"{path}:{line}: cites {target}#{anchor}, but there is no {target}")
        elif anchor not in found:
            out.append(f"{path}:{line}: cites {target}#{anchor}, but {target} has no "
                       f'<a id="{anchor}"></a>')

    for m in CITATION.finditer(text):
        cite(m.start(), m.group(1), m.group(2))
        for more in re.findall(r"#([\w-]+)", m.group(3)):
            cite(m.start(), m.group(1), more)
    if path.endswith(".md"):
        base = Path(path).parent
        for m in MD_LINK.finditer(text):
            target = posixpath.normpath(str(base / m.group(1))) if m.group(1) else path
            cite(m.start(), target, m.group(2))
    for m in MD_NAME.finditer(text):
        name = m.group(1)
        relative = posixpath.normpath(str(Path(path).parent / name))
        if name not in md() and relative not in md() and not name.startswith(("http", "www")):
            line = text.count("\n", 0, m.start()) + 1
            out.append(f"{path}:{line}: cites {name}, which is not in the repository")
    for m in OUTSIDE.finditer(text):
        line = text.count("\n", 0, m.start()) + 1
        out.append(f"{path}:{line}: {m.group(0)!r} points outside the repository; cite a "
                   "fact of the project's docs (PATH#ANCHOR) instead")
    return out


def test_every_citation_resolves_and_stays_inside() -> None:
    found: list[str] = []
    for path in scanned_files():
        if path in PENDING or path == SELF:
            continue
        found += problems(path, (ROOT / path).read_text(encoding="utf-8", errors="replace"))
    assert found == [], "\n".join(found)


def test_the_fact_docs_carry_their_anchors() -> None:
    assert {f"Q{i}" for i in range(1, 17)} <= (anchors_of("protocol/VSCARD.md") or set())
    assert {f"L{i}" for i in range(1, 16)} <= (anchors_of("docs/libvirt-facts.md") or set())
    assert {f"V{i}" for i in range(1, 13)} <= (anchors_of("docs/lab.md") or set())


FAKE_ANCHORS = {"docs/lab.md": frozenset({"V1", "V2"}), "protocol/VSCARD.md": frozenset({"Q1"})}


@pytest.mark.parametrize(("path", "text", "wrong"), [
    ("lab/x.py", "# see docs/lab.md#V1 and docs/lab.md#V2", None),
    ("lab/x.py", "# see docs/lab.md#V1 .. #V2, protocol/VSCARD.md#Q1", None),
    ("docs/y.md", "[Q1](../protocol/VSCARD.md#Q1), [V2](lab.md#V2)", None),
    ("lab/x.py", "# see docs/lab.md#V3", "has no <a id=\"V3\">"),
    ("lab/x.py", "# see docs/lab.md#V1 .. #V9", "has no <a id=\"V9\">"),
    ("lab/x.py", "# see docs/nope.md#V1", "there is no docs/nope.md"),
    ("docs/y.md", "[V7](lab.md#V7)", "has no <a id=\"V7\">"),
    ("lab/x.py", "# (qemu-passthru.md §5)", "qemu-passthru.md, which is not in the repository"),
    ("lab/x.py", "# pcscd polls every 400 ms (notes §3)", "points outside"),
    ("lab/x.py", "# a crashed card (gotcha 11)", "points outside"),
    ("lab/x.py", "# <= 1 s (the brief)", "points outside"),
    ("lab/x.py", "# the calibration point of issue 6", "points outside"),
    ("lab/x.py", "# see /work/shared/notes/x", "points outside"),
])
def test_the_checker_catches_a_bad_citation(path: str, text: str, wrong: str | None) -> None:
    found = problems(path, text, lambda p: FAKE_ANCHORS.get(p),
                     lambda: frozenset({"docs/lab.md", "lab.md", "protocol/VSCARD.md",
                                        "VSCARD.md"}))
    if wrong is None:
        assert found == []
    else:
        assert any(wrong in f for f in found), found
