"""The documentation's runnable parts: the quickstart page is executed as a doctest.

Fenced code blocks of docs/quickstart.md hold ``>>>`` examples with their printed output; the fences are blanked
out so that each block's output ends where the block does, and the examples run in order in one namespace, as a
reader would type them. A renamed function or a changed default therefore fails here (and in the site build).
"""
from __future__ import annotations

import doctest
import re
from pathlib import Path

import pytest

DOCS = Path(__file__).resolve().parents[1] / "docs"
FENCE = re.compile(r"^\s*(```|~~~).*$", re.MULTILINE)


def page_doctest(path: Path) -> doctest.DocTest:
    """The page's ``>>>`` examples as one doctest, fences replaced by blank lines."""
    text = FENCE.sub("", path.read_text())
    return doctest.DocTestParser().get_doctest(text, {}, path.stem, str(path), 0)


def run_page(path: Path) -> doctest.TestResults:
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    test = page_doctest(path)
    runner.run(test)
    return doctest.TestResults(runner.failures, runner.tries)


def test_fences_are_blanked_so_output_stops_at_the_fence():
    text = "```pycon\n>>> print(1)\n1\n```\n"
    test = doctest.DocTestParser().get_doctest(FENCE.sub("", text), {}, "t", "t", 0)
    assert [e.want for e in test.examples] == ["1\n"]


def test_a_wrong_printed_value_fails(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("```pycon\n>>> print(1 + 1)\n3\n```\n")
    assert run_page(page).failed == 1


@pytest.mark.parametrize("page", ["quickstart.md"])
def test_page_examples_run(page):
    path = DOCS / page
    result = run_page(path)
    assert result.attempted >= 20, f"{page}: only {result.attempted} examples found"
    assert result.failed == 0, f"{page}: {result.failed} of {result.attempted} examples failed (output above)"
