"""`diffusion-lab check`: run the theory-check catalogue, printing each result as it finishes."""
from __future__ import annotations

import re
import sys
import time

from . import _common as C

_SLOPE = re.compile(r"slope (-?\d+(?:\.\d+)?)(?: \(expected (-?\d+(?:\.\d+)?)\))?")


def add_parser(sub):
    p = sub.add_parser(
        "check",
        help="run the theory-check catalogue, one line per check as it finishes",
        description=(
            "Run the catalogue of theory checks: each verifies an identity of diffusion-model theory on a "
            "closed-form case (or gives the verdict on a published claim) and compares its residual "
            "with the tolerance of its class (exact: float64 rtol <= 1e-10; quadrature; mc: 5 standard errors; "
            "order: measured order within 0.15 of the theory). Each result is printed as it finishes (with a "
            "progress bar on a terminal); order checks show the measured order beside the theoretical one. "
            "Exits 1 if any check fails."
        ),
    )
    p.add_argument("--json", metavar="PATH", help="also write the results (with settings and versions) as JSON")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --json file")
    p.add_argument("-k", "--filter", metavar="PATTERN", help="only checks whose name contains PATTERN")
    p.add_argument("--area", metavar="AREA", help="only checks of this area (see --list)")
    p.add_argument("--list", action="store_true", help="list the checks with their identities, run nothing")
    p.add_argument("--quiet", action="store_true", help="print only the summary line")
    C.add_threads(p)
    p.set_defaults(func=run)
    return p


def measured_order(result):
    """(measured, theory) of an order check, read from its detail "slope X (expected P)"; theory falls back to
    measured +- residual when only the slope is stated (the sign is unknown then: None); None for other checks."""
    if result.check.kind != "order":
        return None
    m = _SLOPE.search(result.detail or "")
    if not m:
        return None
    measured = float(m.group(1))
    theory = float(m.group(2)) if m.group(2) is not None else None
    return measured, theory


def _value(result) -> str:
    """The result column: the verdict of a claim, the measured order of an order check, else the residual."""
    from theory_checks.report import _fmt

    c = result.check
    if c.kind == "claim":
        return result.verdict or "error"
    mo = measured_order(result)
    if mo is not None:
        measured, theory = mo
        return f"order {measured:.2f}" + (f" (theory {theory:g})" if theory is not None else "")
    return _fmt(result.residual)


def _tolerance(check) -> str:
    from theory_checks.report import _fmt

    if check.kind == "claim":
        return f"-> {check.expected_verdict}"
    if check.kind == "order":
        return f"+-{check.tol:g}"
    return _fmt(check.tol)


def _stream(checks, quiet: bool):
    """Run the checks one by one, printing each line as it finishes (a tqdm bar on a terminal); returns results."""
    bar = None
    if sys.stderr.isatty():
        from tqdm import tqdm

        bar = tqdm(total=len(checks), desc="theory checks", leave=False)
    say = (lambda line: bar.write(line, file=sys.stdout)) if bar is not None else (lambda line: print(line, flush=True))
    wn = max(len("name"), *(len(c.name) for c in checks))
    wa = max(len("area"), *(len(c.area) for c in checks))
    header = f"{'name':{wn}s}  {'area':{wa}s}  {'kind':10s}  {'result':26s}  {'tol':9s}  pass  seconds"
    if not quiet:
        say(header)
        say("-" * len(header))
    results = []
    try:
        for c in checks:
            if bar is not None:
                bar.set_postfix_str(c.name[:40])
            r = c.run()
            results.append(r)
            if not quiet:
                say(f"{c.name:{wn}s}  {c.area:{wa}s}  {c.kind:10s}  {_value(r):26s}  {_tolerance(c):9s}  "
                    f"{'PASS' if r.passed else 'FAIL'}  {r.seconds:7.2f}")
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return results


def run(args, parser) -> int:
    from theory_checks import catalogue

    C.set_threads(args, parser)  # small tensors throughout: intra-op threads only add OpenMP wake-up latency
    if args.json:
        C.check_file_out(args.json, parser, args.overwrite, "--json")
    cat = catalogue()
    areas = sorted({c.area for c in cat.checks})
    if args.area and args.area not in areas:
        parser.error(f"unknown area {args.area!r}; choose one of {areas}")
    cat = cat.select(args.filter, args.area)
    if not cat.checks:
        parser.error(f"no check matches filter {args.filter!r}" + (f" in area {args.area!r}" if args.area else ""))
    if args.list:
        for c in cat.checks:
            print(f"{c.name}  [{c.area}, {c.kind}, tol {c.tol:g}]  {c.identity.splitlines()[0] if c.identity else ''}")
        return 0
    t0 = time.perf_counter()
    results = _stream(cat.checks, args.quiet)
    seconds = time.perf_counter() - t0
    if not args.quiet:
        for r in results:
            if r.check.kind == "claim" or not r.passed:
                print(f"  {r.check.name}: {r.detail}")
    n_pass = sum(r.passed for r in results)
    print(f"{n_pass} passed, {len(results) - n_pass} failed: {len(results)} checks in {seconds:.1f} s")
    if args.json:
        from theory_checks.report import to_json

        def write(tmp):
            import json

            to_json(results, tmp, seconds)
            with open(tmp) as fh:
                doc = json.load(fh)
            for row, r in zip(doc["checks"], results):  # order checks: the measured order beside the theory's
                mo = measured_order(r)
                if mo is not None:
                    row["measured_order"], row["theory_order"] = mo
            with open(tmp, "w") as fh:
                json.dump(doc, fh, indent=2)

        C.atomic_write(args.json, write)
        print(f"wrote {args.json}")
    return 0 if n_pass == len(results) else 1
