"""The ``diffusion-lab`` command. All of the package's terminal and file output for users starts here."""
from __future__ import annotations

import argparse
import sys
import time


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (no usage dump, no traceback) and exit status 2."""

    def error(self, message):
        sys.stderr.write(f"{self.prog}: error: {message} (see {self.prog} --help)\n")
        sys.exit(2)


def _add_check(sub):
    p = sub.add_parser(
        "check",
        help="run the theory-check catalogue and print it as a table",
        description=(
            "Run the catalogue of theory checks: each verifies an identity of diffusion-model theory on a "
            "closed-form case (or gives the verdict on a claim from the seed notes) and compares its residual "
            "with the tolerance of its class (exact: float64 rtol <= 1e-10; quadrature; mc: 5 standard errors; "
            "order: measured slope within 0.15). Exits 1 if any check fails."
        ),
    )
    p.add_argument("--json", metavar="PATH", help="also write the table (with settings and versions) as JSON")
    p.add_argument("-k", "--filter", metavar="PATTERN", help="only checks whose name contains PATTERN")
    p.add_argument("--area", metavar="AREA", help="only checks of this area (see --list)")
    p.add_argument("--list", action="store_true", help="list the checks with their identities, run nothing")
    p.add_argument("--quiet", action="store_true", help="print only the summary line")
    p.set_defaults(func=_cmd_check)
    return p


def _cmd_check(args, parser) -> int:
    from theory_checks import catalogue
    from theory_checks.report import table, to_json

    cat = catalogue()
    areas = sorted({c.area for c in cat.checks})
    if args.area and args.area not in areas:
        parser.error(f"unknown area {args.area!r}; choose one of {areas}")
    cat = cat.select(args.filter, args.area)
    if not cat.checks:
        parser.error(f"no check matches filter {args.filter!r}")
    if args.list:
        for c in cat.checks:
            print(f"{c.name}  [{c.area}, {c.kind}, tol {c.tol:g}]  {c.identity.splitlines()[0] if c.identity else ''}")
        return 0
    t0 = time.perf_counter()
    results = cat.run(progress=sys.stderr.isatty())
    seconds = time.perf_counter() - t0
    text = table(results)
    print(text.splitlines()[-1] if args.quiet else text)
    print(f"{len(results)} checks in {seconds:.1f} s")
    if args.json:
        to_json(results, args.json, seconds)
        print(f"wrote {args.json}")
    return 0 if all(r.passed for r in results) else 1


def build_parser(prog: str = "diffusion-lab") -> argparse.ArgumentParser:
    import diffusion_lab

    parser = _Parser(
        prog=prog,
        description=(
            "diffusion_lab: numerical experiments on diffusion-model theory with exact scores. "
            "One velocity field, three views: sample-path solvers, Langevin, Fokker-Planck."
        ),
    )
    parser.add_argument("--version", action="version", version=f"diffusion_lab {diffusion_lab.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    _add_check(sub)
    return parser


def main(argv=None, prog: str = "diffusion-lab") -> int:
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 2
    sub_parser = parser._subparsers._group_actions[0].choices[args.command]
    try:
        return args.func(args, sub_parser)
    except (ValueError, TypeError, OSError) as exc:
        sys.stderr.write(f"{prog} {args.command}: error: {exc}\n")
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
