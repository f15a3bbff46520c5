"""`diffusion-lab check`: run the theory-check catalogue and print it as a table."""
from __future__ import annotations

import sys
import time


def add_parser(sub):
    p = sub.add_parser(
        "check",
        help="run the theory-check catalogue and print it as a table",
        description=(
            "Run the catalogue of theory checks: each verifies an identity of diffusion-model theory on a "
            "closed-form case (or gives the verdict on a published claim) and compares its residual "
            "with the tolerance of its class (exact: float64 rtol <= 1e-10; quadrature; mc: 5 standard errors; "
            "order: measured slope within 0.15). Exits 1 if any check fails."
        ),
    )
    p.add_argument("--json", metavar="PATH", help="also write the table (with settings and versions) as JSON")
    p.add_argument("-k", "--filter", metavar="PATTERN", help="only checks whose name contains PATTERN")
    p.add_argument("--area", metavar="AREA", help="only checks of this area (see --list)")
    p.add_argument("--list", action="store_true", help="list the checks with their identities, run nothing")
    p.add_argument("--quiet", action="store_true", help="print only the summary line")
    p.set_defaults(func=run)
    return p


def run(args, parser) -> int:
    import torch

    from theory_checks import catalogue

    torch.set_num_threads(1)  # small tensors throughout: intra-op threads only add OpenMP wake-up latency
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
