"""Fuzz test of the public API and the CLI parsers: Hypothesis drives ``sample``, the Langevin samplers, the
Fokker-Planck solver, ``log_likelihood`` and the command-line parsers with adversarial shapes, dtypes, NaN / inf,
empty batches and extreme sizes.

The only acceptable outcomes are a correct result (finite, of the right shape) or a documented exception
(ValueError, TypeError, or FloatingPointError for non-finite model values) raised by the
package's own code with a non-empty message: an exception whose innermost frame is inside torch / numpy / scipy
("a traceback from deep inside") fails. Sizes are capped so that every example runs in milliseconds; the default
Hypothesis profile keeps the file within a few tens of seconds, ``HYPOTHESIS_PROFILE=thorough`` runs 500 examples
per test.
"""
import math
import traceback
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from diffusion_lab import langevin as L
from diffusion_lab import schedules as S
from diffusion_lab import targets as T
from diffusion_lab.likelihood import log_likelihood
from diffusion_lab.samplers import sample

PACKAGE = Path(__import__("diffusion_lab").__file__).resolve().parent
DOCUMENTED = (ValueError, TypeError, FloatingPointError)

# ---------------------------------------------------------------------------------------------
# strategies


def _values():
    return st.one_of(st.floats(-1e3, 1e3), st.sampled_from([math.nan, math.inf, -math.inf, 0.0, 1e300, -1e-300]))


@st.composite
def inputs(draw, dim: int = 2):
    """A batch x: usually a float tensor of shape (n, dim), sometimes an adversarial one (wrong width, empty batch,
    integer / bool / float32 dtype, NaN or inf entries, 1-D, a Python list, None)."""
    kind = draw(st.sampled_from(["ok", "ok", "ok", "width", "empty", "dtype", "nonfinite", "1d", "list", "none"]))
    n = draw(st.integers(1, 4))
    if kind == "none":
        return None
    if kind == "list":
        return [[0.0] * dim for _ in range(n)]
    if kind == "empty":
        return torch.zeros(0, dim, dtype=torch.float64)
    if kind == "1d":
        return torch.zeros(n, dtype=torch.float64)
    width = draw(st.integers(1, 4).filter(lambda w: w != dim)) if kind == "width" else dim
    vals = draw(st.lists(_values() if kind == "nonfinite" else st.floats(-5, 5), min_size=n * width,
                         max_size=n * width))
    x = torch.tensor(vals, dtype=torch.float64).reshape(n, width)
    if kind == "dtype":
        x = x.to(draw(st.sampled_from([torch.int64, torch.bool, torch.float32])))
    return x


def _outcome(fn):
    """Run fn; return its result, or None after checking that an exception is documented and raised by the package
    itself with a message."""
    try:
        return fn()
    except DOCUMENTED as exc:
        frames = traceback.extract_tb(exc.__traceback__)
        inner = Path(frames[-1].filename).resolve()
        assert PACKAGE in inner.parents, (
            f"{type(exc).__name__} from inside {inner} (not the package's own check): {exc}")
        assert str(exc).strip(), f"{type(exc).__name__} without a message"
        return None


_FIELD = {}


def _field(schedule: str = "vp"):
    if schedule not in _FIELD:
        _FIELD[schedule] = T.ring8().field(S.SCHEDULES[schedule]())
    return _FIELD[schedule]


def _check_result(x_in, x_out):
    assert isinstance(x_out, torch.Tensor) and x_out.shape == x_in.shape, (tuple(x_out.shape), tuple(x_in.shape))
    assert torch.isfinite(x_out).all()


# ---------------------------------------------------------------------------------------------
# sample()

@given(x=inputs(), method=st.sampled_from(["euler", "heun", "ddim", "dpm_solver_2", "dpmpp_2m", "unipc", "em",
                                           "euler_ancestral", "lms", "no_such_method"]),
       steps=st.one_of(st.integers(-2, 6), st.sampled_from([1.5, math.nan, 10**12])),
       schedule=st.sampled_from(["vp", "ve", "edm", "rf"]))
def test_fuzz_sample(x, method, steps, schedule):
    f = _field(schedule)
    res = _outcome(lambda: sample(f, x, method, steps=steps, generator=torch.Generator().manual_seed(0)))
    if res is not None:
        _check_result(x, res.x)


@given(x=inputs(), grid=st.lists(st.one_of(st.floats(-0.5, 1.5), st.sampled_from([math.nan, math.inf])),
                                  min_size=0, max_size=5))
def test_fuzz_sample_grid(x, grid):
    res = _outcome(lambda: sample(_field(), x, "heun", grid=grid))
    if res is not None:
        _check_result(x, res.x)


# ---------------------------------------------------------------------------------------------
# Langevin samplers

_H = st.one_of(st.floats(-1.0, 3.0), st.sampled_from([0.0, math.nan, math.inf, 1e-300]))
_T = st.one_of(st.floats(-0.5, 1.5), st.sampled_from([math.nan, 0.05, 0.5]))


@given(x=inputs(), which=st.sampled_from(["ula", "mala", "kinetic_langevin"]), h=_H, t=_T,
       n_steps=st.one_of(st.integers(-1, 4), st.sampled_from([2.5, math.nan])))
@example(x=[[0.0, 0.0]], which="mala", h=0.01, t=0.05, n_steps=1)  # found: AttributeError on a list x
def test_fuzz_langevin(x, which, h, t, n_steps):
    fn = getattr(L, which)
    f = _field()
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a mixture's step above its bound is a documented warning
        res = _outcome(lambda: fn(f, x, t, h, n_steps, generator=torch.Generator().manual_seed(1)))
    if res is not None:
        _check_result(x, res.x)


# ---------------------------------------------------------------------------------------------
# log_likelihood

@given(x=inputs(), divergence=st.sampled_from(["exact", "hutchinson", "trace"]),
       probe=st.sampled_from(["rademacher", "gaussian", "sphere"]),
       n_probes=st.one_of(st.integers(-1, 3), st.just(2.5)),
       rtol=st.sampled_from([1e-6, 0.0, -1.0, 2.0, math.nan]))
def test_fuzz_log_likelihood(x, divergence, probe, n_probes, rtol):
    f = _field()
    res = _outcome(lambda: log_likelihood(f, x, divergence=divergence, probe=probe, n_probes=n_probes, rtol=rtol,
                                          generator=torch.Generator().manual_seed(2)))
    if res is not None:
        assert res.log_prob.shape == (x.shape[0],) and torch.isfinite(res.log_prob).all()


# ---------------------------------------------------------------------------------------------
# the Fokker-Planck solver

# boxes with cells narrower than Grid.MIN_CELL_WIDTH are refused by Grid (tested in test_bad_input.py),
# so the fuzz draws any half-width down to 1e-300
@given(n=st.one_of(st.integers(-1, 40), st.just(2.5)),
       box=st.one_of(st.floats(1e-3, 8.0), st.floats(1e-300, 1e-3), st.floats(-1.0, 0.0), st.just(math.nan)),
       t1=st.one_of(st.floats(-0.5, 1.5), st.just(math.nan)), steps=st.one_of(st.integers(-1, 20), st.none()),
       method=st.sampled_from(["trbdf2", "backward_euler", "crank_nicolson", "no_such_method"]))
def test_fuzz_fokker_planck(n, box, t1, steps, method):
    from diffusion_lab import fokker_planck as FP

    tg, sch = T.bimodal_1d(), S.VPLinear()

    def run():
        grid = FP.Grid.box(-box, box, n)
        return FP.solve_forward(sch, tg, grid, [sch.t_min, t1], method=method, steps=steps)

    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        sol = _outcome(run)
    if sol is not None:
        dens = np.asarray(sol.densities if hasattr(sol, "densities") else sol.p)
        assert np.isfinite(dens).all()


# ---------------------------------------------------------------------------------------------
# CLI parsers: parsing alone never raises anything but argparse's exit 2 (or 0 for --help)

_TOKENS = st.sampled_from(["--n", "-5", "3e8", "nan", "inf", "--steps", "0", "--out", "/dev/null/x", "--seed",
                           "--method", "ddim:eta=2", "--box", "1e-300", "--device", "tpu", "--probes", "1",
                           "--threads", "-1", "--format", "bmp", "--dpi", "0", "", "--", "x" * 300, "é"])


@given(command=st.sampled_from(["check", "compare", "likelihood", "fokker-planck", "train", "sample", "nope"]),
       tokens=st.lists(_TOKENS, max_size=6))
def test_fuzz_cli_parsers(command, tokens):
    import contextlib
    import io

    from diffusion_lab.cli import build_parser

    parser = build_parser()
    with contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        try:
            parser.parse_args([command, *tokens])
        except SystemExit as exc:
            assert exc.code in (0, 2), exc.code
