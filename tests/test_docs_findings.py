"""Effect claims in the docs are quoted from generated outputs, never typed: every quoted finding
("A beats B by x [lo, hi]", "no detectable difference ...", "X wins", "tie: ...", "A's change minus
B's is d [lo, hi]") in README.md and
docs/*.md appears word for word in a file the code generated (docs/studies/*.md and the other
generated outputs kept under docs/), so a number edited by hand, or a claim left behind by a
re-run, fails here."""
import functools
import glob
import os
import re

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLAIM = re.compile(r"\bbeats\b|no detectable difference|\bwins\b|^tie: |change minus")


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip()


@functools.lru_cache(maxsize=None)  # read once for every doc file checked
def _generated() -> str:
    """Every generated markdown kept under docs/: the studies' study.md and the runs' results."""
    files = [f for f in glob.glob(os.path.join(REPO, "docs", "**", "*.md"), recursive=True)
             if os.path.dirname(f) != os.path.join(REPO, "docs")]
    return "\n".join(_norm(open(f, encoding="utf-8").read()) for f in files)


def _quotes(path: str) -> list[str]:
    text = open(path, encoding="utf-8").read()
    out = []
    for q in re.findall(r'"([^"`]{8,}?)"', text, re.S):  # double-quoted spans, across line breaks
        q = _norm(q)
        if CLAIM.search(q) and not q.startswith("A beats B") and "[lo, hi]" not in q:  # the rule itself
            out.append(q)
    return out


def _pieces(quote: str) -> list[str]:
    """A quote may elide with '...' or '…': each piece between elisions must be generated."""
    return [p.strip(" .,;") for p in re.split(r"\.\.\.|…", quote) if p.strip(" .,;()")]


DOCS = [os.path.join(REPO, "README.md")] + sorted(glob.glob(os.path.join(REPO, "docs", "*.md")))


@pytest.mark.parametrize("path", DOCS, ids=[os.path.relpath(p, REPO) for p in DOCS])
def test_quoted_findings_are_generated(path):
    generated = _generated()
    for q in _quotes(path):
        for piece in _pieces(q):
            assert piece in generated, f"{os.path.relpath(path, REPO)} quotes a finding no generated output holds: {q!r}"


def test_the_check_sees_the_readmes_quotes():
    """The README quotes generated findings; the check must find them (else it could pass empty)."""
    assert len(_quotes(os.path.join(REPO, "README.md"))) >= 3
