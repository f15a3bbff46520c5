"""Render the package's plain-text math in docstrings literally.

The docstrings write formulas in ASCII (``|x|``, ``||x||``, ``a * b``, ``p_t(x)``), to be read with ``help()``.
In reStructuredText ``|x|`` is a substitution reference and a lone ``*`` opens emphasis, so this hook escapes
both before numpydoc and autodoc parse the docstring:

- ``|`` becomes ``\\|`` (a literal bar);
- a ``*`` that does not open or close a ``*word*`` / ``**word**`` span becomes ``\\*``.

Literal blocks (after a line ending in ``::``), directives (``.. name::``) and their bodies, inline literals
(````x````), roles (``:func:`x```) and interpreted text (```x```) are left alone; so is the text of a docstring
whose lines already contain an RST table border (``+---``). No other change is made: a docstring whose layout
is not valid reStructuredText (an indented line right after a paragraph line, say) still fails a ``-W`` build.
"""
from __future__ import annotations

import re

# spans left alone: inline literals, roles with interpreted text, interpreted text, hyperlink targets
_PROTECTED = re.compile(r"(``.+?``|:[\w:.-]+:`[^`]+`|`[^`]+`_{0,2})")
_EMPHASIS = re.compile(r"(?<![\w*\\])(\*{1,2})(?=[^\s*])(.+?)(?<=[^\s*\\])\1(?![\w*])")


def _escape_text(text: str) -> str:
    text = text.replace("|", "\\|")
    out, pos = [], 0
    for m in _EMPHASIS.finditer(text):
        out.append(text[pos:m.start()].replace("*", "\\*"))
        out.append(m.group(0))
        pos = m.end()
    out.append(text[pos:].replace("*", "\\*"))
    return "".join(out)


_BULLET = re.compile(r"^(\s*[*+-]\s+)")


def escape_line(line: str) -> str:
    """One prose line with bars and stray asterisks escaped outside protected spans (a leading bullet kept)."""
    m = _BULLET.match(line)
    lead, rest = (m.group(1), line[m.end():]) if m else ("", line)
    parts = _PROTECTED.split(rest)
    return lead + "".join(p if i % 2 else _escape_text(p) for i, p in enumerate(parts))


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def escape_lines(lines: list[str]) -> list[str]:
    """The docstring's lines with prose escaped; literal blocks and directive bodies untouched."""
    if any(line.lstrip().startswith("+--") for line in lines):
        return list(lines)
    out = []
    literal_from = None  # indentation of the line that opened a literal block / directive
    for line in lines:
        stripped = line.strip()
        if literal_from is not None:
            if not stripped or _indent(line) > literal_from:
                out.append(line)
                continue
            literal_from = None
        if stripped.startswith(".. ") or stripped.endswith("::"):
            literal_from = _indent(line)
            out.append(line if stripped.startswith(".. ") else escape_line(line))
            continue
        out.append(escape_line(line))
    return out


def process_docstring(app, what, name, obj, options, lines):
    lines[:] = escape_lines(lines)


def setup(app):
    app.connect("autodoc-process-docstring", process_docstring, priority=400)
    return {"parallel_read_safe": True}
