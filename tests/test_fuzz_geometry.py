"""Identities on mixtures whose geometry Hypothesis draws (``strategies.geometric_mixtures``): condition numbers up
to 1e6, weights down to 1e-4, K and d up to 8, coincident means, every schedule with drawn parameters and times
across the whole log-SNR range. Tolerances scale with the conditioning of the noised covariances
C_t = alpha^2 Sigma + sigma^2 I, the amplification of rounding in the closed forms (float64 eps times cond(C_t))."""
import torch
from hypothesis import given
from hypothesis import strategies as st

from theory_checks.parameterisation import roundtrip_residual, score_residual, tweedie_residual
from theory_checks.strategies import geometric_mixtures, points, schedules, times

EPS = torch.finfo(torch.float64).eps


def _cond_t(tg, schedule, t) -> float:
    tt = torch.as_tensor(t, dtype=torch.float64).reshape(-1)
    a, s = schedule.alpha(tt), schedule.sigma(tt)
    worst = 1.0
    for ai, si in zip(a.tolist(), s.tolist()):
        ev = torch.linalg.eigvalsh(ai * ai * tg.covs + si * si * torch.eye(tg.dim, dtype=torch.float64))
        worst = max(worst, float((ev.max(-1).values / ev.min(-1).values).max()))
    return worst


@given(st.data(), geometric_mixtures(), schedules())
def test_score_is_the_gradient_of_log_p_on_drawn_geometry(data, tg, schedule):
    t = float(data.draw(times(schedule))[0])
    x = data.draw(points(tg.dim, n=3))
    tol = 1e4 * EPS * _cond_t(tg, schedule, t)
    assert score_residual(tg, schedule, x, t) <= max(tol, 1e-10)


@given(st.data(), geometric_mixtures(), schedules())
def test_tweedie_on_drawn_geometry(data, tg, schedule):
    t = float(data.draw(times(schedule))[0])
    x = data.draw(points(tg.dim, n=3))
    tt = torch.as_tensor(t, dtype=torch.float64)
    a, s = float(schedule.alpha(tt)), float(schedule.sigma(tt))
    # x0 = (x + sigma^2 score)/alpha cancels by |x| / |alpha x0| at low SNR on top of the conditioning
    amplification = (1.0 + float(x.abs().max()) / max(a, 1e-300)) * (1.0 + s * s / max(a * a, 1e-300))
    tol = 1e4 * EPS * _cond_t(tg, schedule, t) * amplification
    assert tweedie_residual(tg, schedule, x, t) <= max(tol, 1e-10)


@given(st.data(), schedules())
def test_prediction_conversions_on_drawn_times(data, schedule):
    t = data.draw(times(schedule, n=4))
    x0 = data.draw(points(2, n=4))
    eps = data.draw(points(2, n=4, scale=1.0))
    assert roundtrip_residual(schedule, t, x0, eps) <= 1e-9
