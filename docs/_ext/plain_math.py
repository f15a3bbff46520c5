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


def _escape_prose(line: str, in_literal: bool) -> tuple[str, bool]:
    """Escape one prose line; an inline literal (````...````) may run over from the previous line and on to the
    next. Returns the line and whether an inline literal is still open at its end."""
    head = ""
    if in_literal:
        end = line.find("``")
        if end < 0:
            return line, True
        head, line = line[:end + 2], line[end + 2:]
    # an unmatched ``...`` at the end of the line opens a literal that continues on the next line
    starts = [m.start() for m in re.finditer("``", _PROTECTED.sub(lambda m: " " * len(m.group(0)), line))]
    if len(starts) % 2:
        cut = starts[-1]
        return head + escape_line(line[:cut]) + line[cut:], True
    return head + escape_line(line), False


def escape_lines(lines: list[str]) -> list[str]:
    """The docstring's lines with prose escaped; literal blocks and directive bodies untouched."""
    if any(line.lstrip().startswith("+--") for line in lines):
        return list(lines)
    out = []
    literal_from = None  # indentation of the line that opened a literal block / directive
    in_literal = False  # inside an inline literal that runs over a line break
    for line in lines:
        stripped = line.strip()
        if literal_from is not None:
            if not stripped or _indent(line) > literal_from:
                out.append(line)
                continue
            literal_from = None
        if not stripped:
            in_literal = False
            out.append(line)
            continue
        if stripped.startswith(".. ") and not in_literal:
            literal_from = _indent(line)
            out.append(line)
            continue
        escaped, in_literal = _escape_prose(line, in_literal)
        if stripped.endswith("::") and not in_literal:
            literal_from = _indent(line)
        out.append(escaped)
    return out


def process_docstring(app, what, name, obj, options, lines):
    lines[:] = escape_lines(lines)


def setup(app):
    app.connect("autodoc-process-docstring", process_docstring, priority=400)
    return {"parallel_read_safe": True}
