"""Closed forms written out in the tests, independently of the package's parameterisation code."""
import math

import torch


def mixture_closed_forms(tg, s, x, t):
    """Every prediction of a Gaussian mixture's noised law at (x, t), written out here independently of the
    package's conversions: p_t = sum_k w_k N(alpha mu_k, alpha^2 Sigma_k + sigma^2 I), score = sum_k r_k(x)
    C_k^{-1} (alpha mu_k - x), eps = -sigma score, x0 = (x + sigma^2 score)/alpha (Tweedie), v = alpha eps - sigma x0,
    velocity = alpha' x0 + sigma' eps (the PF-ODE drift)."""
    a, sg = s.alpha(t)[:, None], s.sigma(t)[:, None]
    da, dsg = s.dalpha(t)[:, None], s.dsigma(t)[:, None]
    eye = torch.eye(x.shape[1], dtype=torch.float64)
    C = a[:, :, None, None] ** 2 * tg.covs[None] + sg[:, :, None, None] ** 2 * eye  # (n, K, d, d)
    diff = a[:, None, :] * tg.means[None] - x[:, None, :]  # (n, K, d): alpha mu_k - x
    sol = torch.linalg.solve(C, diff.unsqueeze(-1)).squeeze(-1)
    logp = (torch.log(tg.weights)[None] - 0.5 * (diff * sol).sum(-1) - 0.5 * torch.logdet(C)
            - 0.5 * x.shape[1] * math.log(2 * math.pi))
    r = torch.softmax(logp, dim=1)
    score = (r[..., None] * sol).sum(1)
    eps = -sg * score
    x0 = (x + sg**2 * score) / a
    return {"score": score, "eps": eps, "x0": x0, "v": a * eps - sg * x0, "velocity": da * x0 + dsg * eps}
