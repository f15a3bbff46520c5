"""The catalogue: named checks of identities (and claims) with a residual and a tolerance class.

A *check* computes a residual on a closed-form case and passes when residual <= tol. Tolerance classes:
``exact`` (float64 algebra, rtol <= 1e-10), ``quadrature`` (limited by a reference quadrature / ODE solve),
``mc`` (|estimate - truth| <= 5 SE), ``order`` (|measured slope - p| <= 0.15).

A *claim* is a published statement (quoted in the check's reference); Hypothesis searches for a
counterexample. Its verdict is "refuted" (with the counterexample) or "holds"; the catalogue entry passes
when the verdict agrees with the expected one recorded with the claim.
"""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass, field
from typing import Callable

KINDS = ("exact", "quadrature", "mc", "order", "claim")

#: check names used to start with a one- or two-letter code; they now start with their area's name
RENAMED_PREFIXES = {"A.": "kernels.", "B.": "parameterisation.", "D.": "pde.", "E.": "solvers.", "F.": "langevin.",
                    "G.": "likelihood.", "H.": "claims.", "T.": "training.", "FP.": "fokker_planck."}


def current_name(pattern: str) -> str | None:
    """The current spelling of a check name (or name pattern) written with a former letter prefix, e.g.
    'F.corrector_keeps_p_t' -> 'langevin.corrector_keeps_p_t'; None if ``pattern`` does not use one."""
    for old, new in sorted(RENAMED_PREFIXES.items(), key=lambda kv: -len(kv[0])):
        if pattern.startswith(old):
            return new + pattern[len(old):]
    return None


@dataclass
class Outcome:
    """What a check function may return instead of a bare residual."""

    residual: float
    detail: str = ""
    verdict: str | None = None  # claims only: "refuted" / "holds"


@dataclass
class Check:
    name: str
    area: str
    kind: str
    tol: float
    case: str
    reference: str
    fn: Callable[[], object]
    expected_verdict: str | None = None
    doc: str | None = None  # the identity's statement; defaults to fn's docstring

    @property
    def identity(self) -> str:
        return inspect.cleandoc(self.doc or self.fn.__doc__ or "").split("\n\n")[0]

    def run(self) -> "Result":
        t0 = time.perf_counter()
        try:
            out = self.fn()
            if not isinstance(out, Outcome):
                out = Outcome(float(out))
            error = None
        except Exception as exc:  # a crashing check is a failing check, reported with its error
            out, error = Outcome(float("nan")), f"{type(exc).__name__}: {exc}"
        seconds = time.perf_counter() - t0
        if self.kind == "claim":
            passed = error is None and out.verdict == self.expected_verdict
        else:
            passed = error is None and out.residual == out.residual and out.residual <= self.tol
        return Result(self, out.residual, passed, seconds, out.detail if error is None else error, out.verdict)


@dataclass
class Result:
    check: Check
    residual: float
    passed: bool
    seconds: float
    detail: str = ""
    verdict: str | None = None

    def row(self) -> dict:
        c = self.check
        return {
            "name": c.name, "area": c.area, "kind": c.kind, "residual": self.residual, "tol": c.tol,
            "pass": self.passed, "seconds": round(self.seconds, 4), "case": c.case, "reference": c.reference,
            "identity": c.identity, "verdict": self.verdict, "expected_verdict": c.expected_verdict,
            "detail": self.detail,
        }


REGISTRY: list[Check] = []


def check(name: str, *, area: str, kind: str, tol: float, case: str, reference: str,
          expected_verdict: str | None = None, doc: str | None = None):
    """Register the decorated zero-argument function as a catalogue entry."""
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")

    def deco(fn):
        if any(c.name == name for c in REGISTRY):
            raise ValueError(f"duplicate check name {name!r}")
        REGISTRY.append(Check(name, area, kind, tol, case, reference, fn, expected_verdict, doc))
        return fn

    return deco


def register_many(names_and_fns, *, doc: str, **kw):
    """Register several (name, fn) pairs sharing the other fields (e.g. one check per schedule); ``doc``
    states the identity (usually the docstring of the residual function they call)."""
    for name, fn in names_and_fns:
        check(name, doc=doc, **kw)(fn)


@dataclass
class Catalogue:
    checks: list[Check] = field(default_factory=list)

    def select(self, pattern: str | None = None, area: str | None = None) -> "Catalogue":
        """Checks whose name contains ``pattern`` and whose area is ``area``. A pattern written with a former
        letter prefix (``RENAMED_PREFIXES``) is translated, with a warning naming the current spelling."""
        cs = self.checks
        new = current_name(pattern) if pattern else None
        if new is not None and not any(pattern in c.name for c in cs):
            import warnings

            warnings.warn(f"check names now start with their area: {pattern!r} is now {new!r} (selecting {new!r})",
                          UserWarning, stacklevel=2)
            pattern = new
        if pattern:
            cs = [c for c in cs if pattern in c.name]
        if area:
            cs = [c for c in cs if c.area == area]
        return Catalogue(cs)

    def run(self, progress: bool = False) -> list[Result]:
        it = self.checks
        if progress:
            try:
                from tqdm import tqdm

                it = tqdm(it, desc="theory checks", leave=False)
            except ImportError:  # pragma: no cover
                pass
        return [c.run() for c in it]


def catalogue() -> Catalogue:
    """All registered checks (importing the area modules registers them)."""
    from . import (  # noqa: F401
        claims, dit_checks, fokker_planck_checks, kernels, langevin_checks, likelihood_checks, parameterisation, pde, solvers,
        solvers_multistep, solvers_sde, solvers_stochastic, training_checks, learned_checks, elbo_checks,
        reflow_checks, flowmap_checks,
    )

    return Catalogue(list(REGISTRY))
