"""Area "training" (learned scores): the score-error profile e(t) against closed forms and the KL bound of a score
with a known error (Song, Durkan, Murray & Ermon 2021, Thm 1), run through diffusion_lab.diagnostics itself.

The bound KL(p_{t_min} || q_theta) <= KL(p_{t_max} || pi) + 1/2 int g^2 e dt is an equality when s_theta is the exact
score of another law q noised by the same forward SDE and pi = q_{t_max} (d/dt KL(p_t || q_t) =
-1/2 g^2 E_{p_t} ||grad log p_t - grad log q_t||^2; Lyu 2009). That case tests the factor 1/2 and the weight g^2: the
Monte-Carlo bound must equal the Fokker-Planck truth within its standard error.
"""
from __future__ import annotations

import torch

from diffusion_lab import diagnostics as Dg
from diffusion_lab import schedules as S
from diffusion_lab.targets import GaussianMixture, bimodal_1d, ring8

from .catalogue import Outcome, check

VP = S.VPLinear()


def _other_law(tp: GaussianMixture) -> GaussianMixture:
    """q_0: p_0's components moved (means 1.15 mu + 0.2) and widened (covariances x 1.3)."""
    return GaussianMixture(tp.weights, 1.15 * tp.means + 0.2, 1.3 * tp.covs, name="bimodal_1d shifted")


def kl_bound_equality_z(n: int = 4000, cells: int = 400, steps: int = 100):
    """KL(p_{t_min} || q_{t_min}) (Fokker-Planck solution of the reverse SDE driven by the exact score of q from
    q_{t_max}) equals KL(p_{t_max} || q_{t_max}) + 1/2 int g^2 E_{p_t}||grad log p_t - grad log q_t||^2 dt:
    z = |bound - truth| / SE(bound)."""
    tp = bimodal_1d()
    tq = _other_law(tp)
    kb = Dg.kl_bound(tq.field(VP), tp, start=tq.marginal(VP, VP.t_max), cells=cells, half_width=6.0, steps=steps, n=n)
    return abs(kb.bound - kb.truth) / kb.bound_se, kb


@check("training.kl_bound_equality_noised_law", area="training", kind="mc", tol=5.0,
       case="bimodal_1d/VP, s_theta = exact score of a shifted, widened mixture q, pi = q_t_max; e(t) from 4,000 "
            "exact samples at 24 Gauss-Legendre nodes in log-SNR; truth on a 400-cell grid, 100 TR-BDF2 steps",
       reference="Song, Durkan, Murray & Ermon 2021, Thm 1; Lyu 2009")
def _kl_equality():
    """The KL bound of a score that is the exact score of another noised law is an equality: |bound - truth| <= 5 SE."""
    z, kb = kl_bound_equality_z()
    return Outcome(z, f"bound {kb.bound:.5f} +- {kb.bound_se:.1e} (KL(p_T||q_T) {kb.kl_start:.1e} + score term "
                      f"{kb.score_term:.5f}), Fokker-Planck truth {kb.truth:.5f}, ratio {kb.ratio:.4f}")


def kl_bound_holds_ratio(c: float = 0.3, cells: int = 300, steps: int = 80):
    """For the perturbed score grad log p_t + c x (not the score of any noised law) from the exact p_{t_max}:
    truth / bound <= 1, truth from the Fokker-Planck solution."""
    tg = bimodal_1d()
    field = Dg.perturbed_field(tg, VP, Dg.linear_perturbation(lambda t: c * torch.ones_like(t)))
    kb = Dg.kl_bound(field, tg, cells=cells, half_width=6.0, steps=steps, n=2000)
    return kb.truth / kb.bound, kb


@check("training.kl_bound_holds_perturbed_score", area="training", kind="quadrature", tol=1.0,
       case="bimodal_1d/VP, s_theta = grad log p_t + 0.3 x, pi = p_t_max; truth on a 300-cell grid",
       reference="Song, Durkan, Murray & Ermon 2021, Thm 1")
def _kl_holds():
    """KL(p_{t_min} || q_theta) <= 1/2 int g^2 e dt for a perturbed exact score: residual truth / bound <= 1."""
    r, kb = kl_bound_holds_ratio()
    return Outcome(r, f"truth {kb.truth:.5f}, bound {kb.bound:.5f} +- {kb.bound_se:.1e}")


def score_error_closed_form_z(n: int = 4000, seed: int = 0) -> float:
    """e(t) of grad log p_t + c(t)(A x + b) equals c^2 [tr(A M_t A^T) + 2 b^T A m_t + |b|^2] (moments of p_t):
    max z over 6 times."""
    tg = ring8()
    A = torch.tensor([[1.0, 0.5], [-0.3, 0.8]], dtype=torch.float64)
    b = torch.tensor([0.4, -0.2], dtype=torch.float64)
    c = lambda t: 0.5 + t  # noqa: E731
    field = Dg.perturbed_field(tg, VP, Dg.linear_perturbation(c, A, b))
    prof = Dg.score_error_profile(field, tg, n_times=6, n=n, seed=seed)
    zs = [abs(float(prof.e[i]) - Dg.linear_perturbation_error(tg, VP, t, 0.5 + t, A, b)) / float(prof.se[i])
          for i, t in enumerate(prof.t.tolist())]
    return max(zs)


@check("training.score_error_closed_form", area="training", kind="mc", tol=5.0,
       case="ring8/VP, delta = (0.5 + t)(A x + b), 4,000 exact samples of p_t at 6 times",
       reference="Song, Durkan, Murray & Ermon 2021 (e(t) is the integrand of Thm 1)")
def _score_error():
    """The Monte-Carlo score-error profile matches the closed form of a linear perturbation within 5 SE."""
    return score_error_closed_form_z()
