"""The documentation's runnable parts: the quickstart and the user guides' examples are executed as doctests.

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


@pytest.mark.parametrize("page", ["quickstart.md", "guide/three_views.md", "guide/samplers.md", "guide/guidance.md",
                                  "guide/likelihood.md", "guide/theory_checks.md"])
def test_page_examples_run(page):
    path = DOCS / page
    result = run_page(path)
    assert result.attempted >= (20 if page == "quickstart.md" else 3), f"{page}: only {result.attempted} examples"
    assert result.failed == 0, f"{page}: {result.failed} of {result.attempted} examples failed (output above)"


def test_readme_python_snippet_prints_what_it_says(capsys):
    """README's Python block runs and prints what its ``# -> `` comment promises."""
    text = (DOCS.parent / "README.md").read_text()
    blocks = re.findall(r"^```python\n(.*?)^```", text, re.MULTILINE | re.DOTALL)
    assert len(blocks) == 1, f"expected one Python block in README.md, found {len(blocks)}"
    promised = re.findall(r"# -> (.*)$", blocks[0], re.MULTILINE)
    exec(compile(blocks[0], "README.md", "exec"), {})
    printed = capsys.readouterr().out.split("\n")
    assert promised and [p.strip() for p in promised] == [line.strip() for line in printed if line.strip()]


def test_readme_starts_with_the_two_commands_and_ci_runs_the_second():
    lines = (DOCS.parent / "README.md").read_text().split("\n")
    commands = [lines[i + 1] for i in range(len(lines) - 1) if lines[i] == "```bash"][:2]
    assert commands[0].endswith("pip install -e . && diffusion-lab compare")
    assert commands[1].endswith('pip install -e ".[dev]" && python -m pytest -q')
    ci = (DOCS.parent / ".ci" / "run").read_text()
    first = next(line for line in ci.split("\n") if line and not line.startswith(("#", "set ", "cd ")))
    assert first == commands[1]


def test_license_and_citation_match_the_package():
    root = DOCS.parent
    import diffusion_lab

    pyproject = (root / "pyproject.toml").read_text()
    assert re.search(r'^license = \{ text = "MIT" \}$', pyproject, re.MULTILINE)
    assert (root / "LICENSE").read_text().startswith("MIT License")
    version = re.search(r'^version = "(.+)"$', pyproject, re.MULTILINE).group(1)
    cff = (root / "CITATION.cff").read_text()
    fields = dict(re.findall(r"^([a-z-]+): (.+)$", cff, re.MULTILINE))
    assert fields["cff-version"] == "1.2.0" and fields["license"] == "MIT"
    assert fields["version"] == version == diffusion_lab.__version__
    assert "message" in fields and "title" in fields and re.search(r"^authors:\n  - ", cff, re.MULTILINE)


def test_user_facing_text_names_no_internal_notes():
    root = DOCS.parent
    pattern = re.compile(r"shared/|THEORY\.md|seed note|closing note|\bissue \d+", re.IGNORECASE)
    files = [root / "README.md", root / "CHANGELOG.md", *DOCS.glob("**/*.md"), *DOCS.glob("examples/*.py")]
    hits = [f"{f.relative_to(root)}:{i + 1}" for f in files if "_build" not in f.parts
            for i, line in enumerate(f.read_text().split("\n")) if pattern.search(line)]
    assert not hits, f"internal references in user-facing text: {hits}"


def test_plain_text_math_in_docstrings_is_escaped_outside_literals():
    """The docs build escapes |x| and stray * in docstrings (they are plain-text math, not reST markup)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("plain_math", DOCS / "_ext" / "plain_math.py")
    plain_math = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(plain_math)
    assert plain_math.escape_line("max |z| and 2 * x") == "max \\|z\\| and 2 \\* x"
    assert plain_math.escape_line("* ``|x|`` and *emphasis*") == "* ``|x|`` and *emphasis*"
    lines = ["Table::", "", "    a | b * c", "", "after |x|"]
    assert plain_math.escape_lines(lines) == ["Table::", "", "    a | b * c", "", "after \\|x\\|"]
    spanning = ["call ``f(a,", "  **kw)`` with |x|"]  # an inline literal over a line break stays literal
    assert plain_math.escape_lines(spanning) == ["call ``f(a,", "  **kw)`` with \\|x\\|"]
