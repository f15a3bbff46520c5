"""Write the theory pages' check tables from the live catalogue and the measured residuals.

For each area of ``theory_checks`` this writes ``docs/_generated/theory_<area>.md``: every identity the area's
checks verify (the statement in the check's docstring), its source, the names of the checks that verify it, their
tolerance and the residual measured by the last run of

    python -m theory_checks --json docs/theory/catalogue.json --overwrite

Names, identities, sources and tolerances come from the registry at build time; the residuals come from the JSON
file. A check with no row there (new or renamed since the last full run) is run during the build and marked so on
its page; rows naming no check are ignored. A failed check is reported as a Sphinx warning, which fails a ``-W``
build.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

from sphinx.util import logging

logger = logging.getLogger(__name__)

DOCS = Path(__file__).resolve().parents[1]
MEASURED = DOCS / "theory" / "catalogue.json"
OUT = DOCS / "_generated"
REFRESH = "python -m theory_checks --json docs/theory/catalogue.json --overwrite"

AREAS = ("kernels", "parameterisation", "pde", "solvers", "langevin", "fokker_planck", "likelihood", "training",
         "dit", "claims")

_MD_SPECIAL = re.compile(r"([\\`*_{}\[\]<>|#$~])")


def md_escape(text: str) -> str:
    """Plain text as inline markdown: special characters escaped, line breaks joined."""
    return _MD_SPECIAL.sub(r"\\\1", " ".join(str(text).split()))


def fmt_number(x) -> str:
    if x is None:
        return "--"
    x = float(x)
    if math.isnan(x):
        return "nan"
    if x == 0:
        return "0"
    if 1e-3 <= abs(x) < 1e4:
        return f"{x:.4g}"
    return f"{x:.2e}"


def _rows_by_name() -> dict[str, dict]:
    data = json.loads(MEASURED.read_text())
    return {row["name"]: row for row in data["checks"]}, data


def render_area(area: str, checks, measured: dict[str, dict]) -> str:
    """Markdown for one area: identities in catalogue order, each with its checks and their residuals."""
    groups: dict[str, list] = {}
    for c in checks:
        groups.setdefault(c.identity, []).append(c)
    lines = []
    for identity, members in groups.items():
        refs = sorted({c.reference for c in members}, key=[c.reference for c in members].index)
        lines.append(f"**{md_escape(identity)}**")
        lines.append("")
        lines.append(f"*Source:* {md_escape('; '.join(refs))}")
        lines.append("")
        lines.append("| check | class | tolerance | measured residual | measured |")
        lines.append("| --- | --- | --- | --- | --- |")
        for c in members:
            row = measured.get(c.name)
            if c.kind == "claim":
                res = md_escape(f"verdict: {row.get('verdict')}") if row else "--"
                tol = md_escape(f"expected: {c.expected_verdict}")
            else:
                res = fmt_number(row["residual"]) if row else "--"
                tol = fmt_number(c.tol)
            detail = md_escape(row.get("detail") or "") if row else ""
            if row and row.get("measured_at_build"):
                detail = (detail + " " if detail else "") + "(measured during this build)"
            lines.append(f"| `{c.name}` | {c.kind} | {tol} | {res} | {detail} |")
        lines.append("")
        cases = sorted({c.case for c in members if c.case}, key=[c.case for c in members].index)
        if cases:
            lines.append(f"*Case:* {md_escape('; '.join(cases))}")
            lines.append("")
    return "\n".join(lines)


def write_tables(app=None) -> dict[str, str]:
    from theory_checks.catalogue import catalogue

    checks = catalogue().checks
    measured, data = _rows_by_name()
    live = {c.name for c in checks}
    missing = [c for c in checks if c.name not in measured]
    stale = sorted(set(measured) - live)
    if stale:
        logger.info(f"{len(stale)} rows of {MEASURED.name} name no check of the catalogue (renamed or removed); "
                    f"they are not shown")
    if missing:  # new or renamed since the last full run: measure them now, and say so on the page
        logger.info(f"measuring {len(missing)} theory checks without a residual in {MEASURED.name} "
                    f"(refresh it with `{REFRESH}`)")
        for c in missing:
            measured[c.name] = {**c.run().row(), "measured_at_build": True}
    failed = [c.name for c in checks if not measured[c.name].get("pass", False)]
    if failed:
        shown = ", ".join(failed[:6]) + (f", ... ({len(failed) - 6} more)" if len(failed) > 6 else "")
        logger.warning(f"{len(failed)} theory checks failed: {shown}")
    areas = list(dict.fromkeys([*AREAS, *(c.area for c in checks)]))
    OUT.mkdir(parents=True, exist_ok=True)
    written = {}
    for area in areas:
        members = [c for c in checks if c.area == area]
        if not members:
            logger.warning(f"theory area {area!r} has no checks")
            continue
        text = render_area(area, members, measured)
        _write(OUT / f"theory_{area}.md", text)
        written[area] = text
        if not (DOCS / "theory" / f"{area}.md").exists():
            logger.warning(f"theory area {area!r} has checks but no page docs/theory/{area}.md (see docs/README.md)")
    at_build = f"; {len(missing)} checks added or renamed since were measured during this build" if missing else ""
    summary = (f"The last full run: {data.get('passed', '?')} of {data.get('passed', 0) + data.get('failed', 0)} "
               f"checks passed in {fmt_number(data.get('seconds'))} s on {data.get('created', '?')} "
               f"(torch {data.get('versions', {}).get('torch', '?')}, "
               f"python {data.get('versions', {}).get('python', '?')}){at_build}.\n")
    _write(OUT / "theory_summary.md", summary)
    return written


def _write(path: Path, text: str) -> None:
    """Write only when the text changed (keeps Sphinx's incremental build quiet)."""
    if not path.exists() or path.read_text() != text:
        path.write_text(text)


def write_methods(app=None) -> str:
    """``docs/_generated/methods.md``: every registered sampler with its family, order, NFE per step and budget
    rule, from the registry at build time."""
    from diffusion_lab.samplers import available

    lines = ["| method | family | order | stochastic | NFE per step | budget rule | what it is |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for info in available():
        row = info.row()
        nfe = "adaptive" if row["nfe_per_step"] != row["nfe_per_step"] else f"{row['nfe_per_step']:g}"
        lines.append(f"| `{row['method']}` | {row['family']} | {row['order']:g} | "
                     f"{'yes' if row['stochastic'] else 'no'} | {nfe} | {md_escape(row['budget_rule'])} | "
                     f"{md_escape(row['description'])} |")
    text = "\n".join(lines) + "\n"
    OUT.mkdir(parents=True, exist_ok=True)
    _write(OUT / "methods.md", text)
    return text


def write_cli(app=None) -> str:
    """``docs/_generated/cli.md``: ``diffusion-lab --help`` and every subcommand's ``--help``, from the parser at
    build time (wrapped at 100 columns)."""
    import argparse
    import os

    from diffusion_lab.cli import build_parser

    columns = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"
    try:
        parser = build_parser()
        parts = ["## diffusion-lab", "", "```text", parser.format_help().rstrip(), "```", ""]
        subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        for name, sub in subs.choices.items():
            parts += [f"## diffusion-lab {name}", "", "```text", sub.format_help().rstrip(), "```", ""]
    finally:
        if columns is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = columns
    text = "\n".join(parts)
    OUT.mkdir(parents=True, exist_ok=True)
    _write(OUT / "cli.md", text)
    return text


def setup(app):
    app.connect("builder-inited", write_tables)
    app.connect("builder-inited", write_methods)
    app.connect("builder-inited", write_cli)
