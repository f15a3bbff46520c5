"""Planted bugs: which realistic one-line mistakes the theory-check catalogue and the tests catch.

Each bug is a single text substitution in one source file of ``diffusion_lab``. For each bug, one at a time, the
script copies a snapshot of the repository (package, catalogue, tests) to a temporary directory, applies the
substitution there (the working tree is never modified), and runs with that copy first on ``PYTHONPATH``:

* the catalogue: ``python -m theory_checks --json ...`` (all checks, or with ``--quick`` only the areas listed
  for the bug); caught when at least one check fails, and the failing check names are recorded;
* the tests (with ``--tests``): ``pytest -x -q`` on the test files listed for the bug; caught when a test fails.

A bug whose text is no longer found in the source is reported as "stale" (the code moved on; update the table),
never silently skipped. A control run without any substitution must pass everything, or the table is meaningless.

    python benchmarks/planted_bugs.py [--quick] [--tests] [--only NAME ...] [--list] [--json PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
COPY = ("diffusion_lab", "theory_checks", "tests", "pyproject.toml")


@dataclass
class Bug:
    name: str
    what: str
    path: str  # relative to the repository root
    old: str
    new: str
    areas: tuple[str, ...]  # catalogue areas that should catch it (used by --quick)
    tests: tuple[str, ...] = ()  # test files that should catch it (used by --tests)


BUGS = [
    Bug("schedule_derivative_sign", "VP linear: sign of d sigma/dt flipped", "diffusion_lab/schedules.py",
        "    def dsigma(self, t):\n        return 0.5 * self.beta(t) * torch.exp(-self.B(t)) / self.sigma(t)",
        "    def dsigma(self, t):\n        return -0.5 * self.beta(t) * torch.exp(-self.B(t)) / self.sigma(t)",
        ("kernels", "parameterisation", "pde"), ("tests/test_schedules.py",)),
    Bug("g2_factor", "VP linear: g^2 = beta/2 instead of beta", "diffusion_lab/schedules.py",
        "        return -0.5 * self.beta(t)\n\n    def g2(self, t):\n        return self.beta(t)",
        "        return -0.5 * self.beta(t)\n\n    def g2(self, t):\n        return 0.5 * self.beta(t)",
        ("kernels", "pde", "parameterisation"), ("tests/test_schedules.py",)),
    Bug("dpm_solver_2_coefficient", "DPM-Solver-2 (noise prediction): 1/(2 r1) -> 1/2", "diffusion_lab/samplers/exponential.py",
        "return x_lin - (s_t / (2.0 * r1) * phi_1) * (m1 - m_s)", "return x_lin - (s_t / 2.0 * phi_1) * (m1 - m_s)",
        ("solvers",), ("tests/test_samplers_exponential.py",)),
    Bug("dpm_solver_2_x0_dropped_1_over_r1", "DPM-Solver++(2S) (data prediction): the 1/r1 dropped",
        "diffusion_lab/samplers/exponential.py",
        "return x_lin - (0.5 / r1 * a_t * phi_1) * (m1 - m_s)", "return x_lin - (0.5 * a_t * phi_1) * (m1 - m_s)",
        ("solvers",), ("tests/test_samplers_exponential.py",)),
    Bug("unipc_corrector_coefficient", "UniPC: the corrector's last weight hard-coded to UniC-1's 1/2",
        "diffusion_lab/samplers/exponential.py",
        "x = x - (a_t * b_h * rho_c[-1]) * (d_next - hist[0])", "x = x - (a_t * b_h * 0.5) * (d_next - hist[0])",
        ("solvers",), ("tests/test_samplers_exponential.py",)),
    Bug("ula_sqrt_2h", "ULA: noise sqrt(h) instead of sqrt(2h)", "diffusion_lab/langevin.py",
        "    c = math.sqrt(2.0 * h)\n    for i in step_iter(n, progress, \"ula\"):",
        "    c = math.sqrt(h)\n    for i in step_iter(n, progress, \"ula\"):",
        ("langevin",), ("tests/test_langevin.py",)),
    Bug("snr_step_rule_halved", "Langevin corrector: SNR step e = alpha (r|z|/|s|)^2 (factor 2 dropped)",
        "diffusion_lab/langevin.py",
        "return 2.0 * alpha * (snr * nz / max(g, 1e-300)) ** 2", "return alpha * (snr * nz / max(g, 1e-300)) ** 2",
        ("langevin",), ("tests/test_langevin.py",)),
    Bug("mala_proposal", "MALA: reverse proposal density uses the forward score s(x)", "diffusion_lab/langevin.py",
        "log_q_bwd = -((x - y - h * s_y) ** 2)", "log_q_bwd = -((x - y - h * s_x) ** 2)",
        ("langevin",), ("tests/test_langevin.py",)),
    Bug("baoab_o_step", "BAOAB: O-step noise sqrt(1 - e^{-gamma h}) instead of sqrt(1 - e^{-2 gamma h})",
        "diffusion_lab/langevin.py",
        "e2 = math.sqrt(-math.expm1(-2 * friction * h))", "e2 = math.sqrt(-math.expm1(-friction * h))",
        ("langevin",), ("tests/test_langevin.py",)),
    Bug("time_grid_off_by_one", "time_grid: u = k/(n+1) instead of k/n (the last step jumps)",
        "diffusion_lab/samplers/grids.py",
        "u = torch.arange(n + 1, dtype=torch.float64) / n", "u = torch.arange(n + 1, dtype=torch.float64) / (n + 1)",
        ("solvers",), ("tests/test_samplers_core.py",)),
    Bug("fp_flux_term", "Fokker-Planck (Scharfetter-Gummel): sign of the downwind drift term",
        "diffusion_lab/fokker_planck/operators.py",
        "return bp + diff, -bm + diff", "return bp + diff, bm + diff",
        ("fokker_planck",), ("tests/test_fokker_planck.py",)),
    Bug("v_swapped_x0_eps", "v-prediction: v = alpha x0 - sigma eps (x0 and eps swapped)", "diffusion_lab/param.py",
        "        return alpha * eps - sigma * x0", "        return alpha * x0 - sigma * eps",
        ("parameterisation",), ("tests/test_param_targets.py",)),
    Bug("hutchinson_sum_not_mean", "likelihood: Hutchinson probes summed instead of averaged",
        "diffusion_lab/likelihood.py", "log_prob = per_probe.mean(1)", "log_prob = per_probe.sum(1)",
        ("likelihood",), ("tests/test_likelihood_flows.py",)),
    Bug("likelihood_term", "likelihood: the d log(alpha_1/alpha_0) change-of-scale term dropped",
        "diffusion_lab/likelihood.py",
        "per_probe = prior_lp[:, None] + d * math.log(a1 / a0) + integral", "per_probe = prior_lp[:, None] + integral",
        ("likelihood",), ("tests/test_likelihood_flows.py",)),
    Bug("dit_head_split", "DiT attention: heads interleaved (reshape (3, d_h, h)) instead of sliced",
        "diffusion_lab/models/dit.py",
        "qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)",
        "qkv = self.qkv(x).reshape(n, t, 3, self.head_dim, self.num_heads).permute(2, 0, 4, 1, 3)",
        ("dit",), ("tests/test_models.py",)),
    Bug("adaln_plus_one", "adaLN: modulate x scale + shift (the +1 dropped)", "diffusion_lab/models/dit.py",
        "return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)", "return x * scale.unsqueeze(1) + shift.unsqueeze(1)",
        ("dit",), ("tests/test_models.py",)),
    Bug("ddim_eta_factor", "DDIM: c = sqrt(eta) sigma_t sqrt(1 - e^{-2h}) instead of eta sigma_t ...",
        "diffusion_lab/samplers/exponential.py",
        "c = eta * sigma_t * math.sqrt(q)", "c = math.sqrt(eta) * sigma_t * math.sqrt(q)",
        ("solvers",), ("tests/test_samplers_exponential.py", "tests/test_samplers_sde.py")),
    Bug("cfg_weight", "CFG: w cond - (w - 1) uncond (guidance scale read as gamma)", "diffusion_lab/guidance.py",
        "return (1.0 + w) * cond - w * uncond", "return w * cond - (w - 1.0) * uncond",
        ("training",), ("tests/test_training.py",)),
    Bug("edm_c_skip", "EDM preconditioning: c_skip = sigma_d^2/S (the alpha factor dropped)", "diffusion_lab/training.py",
        "return a * sd2 / S, s * sigma_data * rS, rS, c_noise(schedule, t)",
        "return sd2 / S, s * sigma_data * rS, rS, c_noise(schedule, t)",
        ("training",), ("tests/test_training.py",)),
]


@dataclass
class Row:
    name: str
    what: str
    status: str  # "ok" or "stale"
    catalogue_caught: bool | None = None
    failing_checks: list = field(default_factory=list)
    catalogue_seconds: float = 0.0
    tests_caught: bool | None = None
    tests_detail: str = ""


def snapshot(dest: Path) -> Path:
    """Copy the package, the catalogue and the tests (no .git, no results) to ``dest``."""
    for name in COPY:
        src = ROOT / name
        if src.is_dir():
            shutil.copytree(src, dest / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc", ".hypothesis"))
        else:
            shutil.copy2(src, dest / name)
    return dest


def _env(copy: Path) -> dict:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(copy) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env.setdefault("OMP_NUM_THREADS", "1")
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    return env


def run_catalogue(copy: Path, areas=None) -> tuple[bool, list, float, str]:
    """(all passed, failing check names, seconds, error text) of the catalogue run in ``copy``."""
    failing, t0, err = [], time.perf_counter(), ""
    for area in (areas or [None]):
        out = copy.parent / f"{copy.name}_catalogue_{area or 'all'}.json"  # outside every copy
        out.unlink(missing_ok=True)
        cmd = [sys.executable, "-m", "theory_checks", "--quiet", "--json", str(out)] + (["--area", area] if area else [])
        p = subprocess.run(cmd, cwd=copy, env=_env(copy), capture_output=True, text=True)
        if out.exists():
            doc = json.loads(out.read_text())
            failing += [c["name"] for c in doc["checks"] if not c["pass"]]
            out.unlink()
        elif p.returncode != 0:  # the catalogue itself crashed (e.g. an import error): a failure, with its error
            failing.append("<catalogue crashed>")
            err = (p.stderr or p.stdout).strip().splitlines()[-1:] and (p.stderr or p.stdout).strip().splitlines()[-1]
    return not failing, failing, time.perf_counter() - t0, err


def run_tests(copy: Path, files) -> tuple[bool, str]:
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *files]
    p = subprocess.run(cmd, cwd=copy, env=_env(copy), capture_output=True, text=True)
    last = (p.stdout.strip().splitlines() or [""])[-1]
    if p.returncode not in (0, 1):
        raise RuntimeError(f"pytest could not run {files} (exit {p.returncode}): {last}")
    return p.returncode == 0, last


def plant(copy: Path, bug: Bug) -> bool:
    path = copy / bug.path
    text = path.read_text()
    if text.count(bug.old) != 1:
        return False
    path.write_text(text.replace(bug.old, bug.new))
    return True


def run(bugs, quick: bool, tests: bool, control: bool = True, progress=print) -> tuple[list[Row], dict]:
    rows, control_row = [], {}
    with tempfile.TemporaryDirectory(prefix="planted_") as tmp:
        base = snapshot(Path(tmp) / "base")
        if control:
            areas = sorted({a for b in bugs for a in b.areas}) if quick else None
            ok, failing, secs, err = run_catalogue(base, areas)
            control_row = {"catalogue_passed": ok, "failing_checks": failing, "seconds": round(secs, 1), "error": err}
            if tests:
                files = sorted({f for b in bugs for f in b.tests})
                control_row["tests_passed"], control_row["tests_detail"] = run_tests(base, files)
            progress(f"control (no bug): catalogue {'passed' if ok else 'FAILED ' + str(failing)} in {secs:.0f} s")
        for bug in bugs:
            copy = Path(tmp) / bug.name
            shutil.copytree(base, copy)
            if not plant(copy, bug):
                rows.append(Row(bug.name, bug.what, "stale"))
                progress(f"{bug.name}: STALE (text not found exactly once in {bug.path})")
                shutil.rmtree(copy)
                continue
            passed, failing, secs, _ = run_catalogue(copy, list(bug.areas) if quick else None)
            row = Row(bug.name, bug.what, "ok", not passed, failing, round(secs, 1))
            if tests:
                t_passed, row.tests_detail = run_tests(copy, list(bug.tests))
                row.tests_caught = not t_passed
            rows.append(row)
            progress(f"{bug.name}: catalogue {'caught by ' + ', '.join(failing) if failing else 'MISSED'}"
                     + (f"; tests {'caught' if row.tests_caught else 'MISSED'} ({row.tests_detail})" if tests else "")
                     + f" [{secs:.0f} s]")
            shutil.rmtree(copy)
    return rows, control_row


def table(rows: list[Row], tests: bool) -> str:
    head = ["bug", "catalogue", "tests" if tests else None, "caught by (catalogue checks)"]
    head = [h for h in head if h]
    lines = []
    for r in rows:
        cat = "stale" if r.status == "stale" else ("caught" if r.catalogue_caught else "MISSED")
        cells = [r.name, cat]
        if tests:
            cells.append("stale" if r.status == "stale" else ("caught" if r.tests_caught else "MISSED"))
        shown = r.failing_checks[:4] + ([f"+{len(r.failing_checks) - 4} more"] if len(r.failing_checks) > 4 else [])
        cells.append(", ".join(shown))
        lines.append(cells)
    widths = [max(len(h), *(len(c[i]) for c in lines)) if lines else len(h) for i, h in enumerate(head)]
    out = ["  ".join(h.ljust(w) for h, w in zip(head, widths)), "  ".join("-" * w for w in widths)]
    out += ["  ".join(c.ljust(w) for c, w in zip(cells, widths)) for cells in lines]
    ok = [r for r in rows if r.status == "ok"]
    out.append(f"catalogue caught {sum(bool(r.catalogue_caught) for r in ok)} of {len(ok)}"
               + (f"; tests caught {sum(bool(r.tests_caught) for r in ok)} of {len(ok)}" if tests else "")
               + (f"; {len(rows) - len(ok)} stale" if len(rows) > len(ok) else ""))
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="run only the catalogue areas listed for each bug")
    ap.add_argument("--tests", action="store_true", help="also run the test files listed for each bug")
    ap.add_argument("--only", nargs="+", metavar="NAME", help="only these bugs (see --list)")
    ap.add_argument("--no-control", action="store_true", help="skip the control run without a bug")
    ap.add_argument("--list", action="store_true", help="list the bugs and exit")
    ap.add_argument("--json", metavar="PATH", help="also write the rows as JSON")
    args = ap.parse_args(argv)
    bugs = BUGS
    if args.only:
        unknown = sorted(set(args.only) - {b.name for b in BUGS})
        if unknown:
            ap.error(f"unknown bug(s) {unknown}; choose from {[b.name for b in BUGS]}")
        bugs = [b for b in BUGS if b.name in args.only]
    if args.list:
        for b in bugs:
            print(f"{b.name}: {b.what} ({b.path}; areas {', '.join(b.areas)})")
        return 0
    t0 = time.perf_counter()
    rows, control = run(bugs, args.quick, args.tests, control=not args.no_control,
                        progress=lambda s: print(s, file=sys.stderr, flush=True))
    print(table(rows, args.tests))
    scope = "catalogue areas of each bug (--quick)" if args.quick else "the whole catalogue"
    print(f"ran {scope}{' and the listed tests' if args.tests else ''} in {time.perf_counter() - t0:.0f} s")
    if control and not control.get("catalogue_passed", True):
        print(f"WARNING: the control run without a bug failed: {control['failing_checks']}")
    if args.json:
        doc = {"scope": scope, "tests": args.tests, "control": control, "rows": [asdict(r) for r in rows],
               "seconds": round(time.perf_counter() - t0, 1)}
        tmp = args.json + ".tmp"
        with open(tmp, "w") as fh:
            json.dump(doc, fh, indent=1)
        os.replace(tmp, args.json)
        print(f"wrote {args.json}")
    missed = [r for r in rows if r.status == "stale" or not r.catalogue_caught]
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
