"""Area H: published claims about Transformer layers (permutation symmetry of self-attention, norm growth under
Post-LN, low-pass residual Laplacian layers) and the true statements behind them.

A claim is a universal statement "for all parameters, P holds". Hypothesis (``hypothesis.find``) searches
for parameters where P fails; a found counterexample makes the verdict "refuted" and is reported. The
corrected identities are ordinary exact checks.
"""
from __future__ import annotations

import math

import torch
from hypothesis import HealthCheck, find, settings
from hypothesis import strategies as st
from hypothesis.errors import NoSuchExample

from .catalogue import Outcome, check

_FIND_SETTINGS = settings(max_examples=400, database=None, deadline=None, derandomize=True,
                          suppress_health_check=list(HealthCheck))


def claim_verdict(strategy, holds, describe) -> Outcome:
    """Search for a counterexample of ``holds``; residual is 1 if refuted, 0 if not."""
    try:
        ex = find(strategy, lambda p: not holds(p), settings=_FIND_SETTINGS)
    except NoSuchExample:
        return Outcome(0.0, "no counterexample found in 400 examples", verdict="holds")
    return Outcome(1.0, f"counterexample: {describe(ex)}", verdict="refuted")


# ---------------------------------------------------------------------------------------------
# self-attention and permutations

def attention(x, wq, wk, wv):
    """Single-head self-attention softmax(X Wq (X Wk)^T / sqrt(d)) X Wv, no mask, no position embedding."""
    q, k, v = x @ wq, x @ wk, x @ wv
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1]), dim=-1)
    return a @ v


def _attention_case(seed: int, n: int, d: int = 4):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, dtype=torch.float64, generator=g)
    w = [torch.randn(d, d, dtype=torch.float64, generator=g) / math.sqrt(d) for _ in range(3)]
    perm = torch.randperm(n, generator=g)
    return x, w, perm


def permutation_equivariance_residual(seed: int, n: int) -> float:
    """Attn(P X) = P Attn(X) for every permutation P (Vaswani et al. 2017; no mask, no position
    embedding): max abs error."""
    x, w, perm = _attention_case(seed, n)
    return float((attention(x[perm], *w) - attention(x, *w)[perm]).abs().max())


_perm_params = st.tuples(st.integers(0, 10_000), st.integers(2, 6))


@check("H.claim_attention_permutation_invariant", area="claims", kind="claim", tol=0.0,
       case="single-head attention, d=4, n in 2..6 tokens, random weights and permutation",
       reference="published claim of 'permutation invariance'; Vaswani et al. 2017", expected_verdict="refuted")
def _claim_invariance():
    """Claim (published): self-attention is permutation INVARIANT, Attn(P X) = Attn(X)."""

    def holds(p):
        x, w, perm = _attention_case(*p)
        if torch.equal(perm, torch.arange(len(perm))):
            return True  # the identity permutation cannot refute anything
        return bool(torch.allclose(attention(x[perm], *w), attention(x, *w), atol=1e-9))

    return claim_verdict(_perm_params, holds, lambda p: f"seed={p[0]}, n={p[1]} tokens: Attn(PX) != Attn(X)")


@check("H.attention_permutation_equivariant", area="claims", kind="exact", tol=1e-12,
       case="single-head attention, d=4, n in 2..6, 20 random cases",
       reference="Vaswani et al. 2017 (why Transformers add position encodings)")
def _equivariance():
    """Self-attention is permutation EQUIVARIANT: Attn(P X) = P Attn(X) (no mask, no position embedding)."""
    return max(permutation_equivariance_residual(seed, 2 + seed % 5) for seed in range(20))


# ---------------------------------------------------------------------------------------------
# norm growth in residual stacks

def layer_norm(x, eps: float = 0.0):
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps)


def residual_stack_norms(kind: str, depth: int, d: int, gain: float, seed: int):
    """||x_l|| for l = 0..depth of a residual stack with linear sub-layers F_l = gain * W_l (||W_l||_2 = 1):
    'none'  x_{l+1} = x_l + F_l(x_l)          (un-normalised)
    'pre'   x_{l+1} = x_l + F_l(LN(x_l))       (Pre-LN)
    'post'  x_{l+1} = LN(x_l + F_l(x_l))       (Post-LN)
    """
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(d, dtype=torch.float64, generator=g)
    norms = [float(x.norm())]
    for _ in range(depth):
        w = torch.randn(d, d, dtype=torch.float64, generator=g)
        w = gain * w / torch.linalg.matrix_norm(w, ord=2)
        if kind == "none":
            x = x + w @ x
        elif kind == "pre":
            x = x + w @ layer_norm(x)
        elif kind == "post":
            x = layer_norm(x + w @ x)
        else:
            raise ValueError(f"kind must be none/pre/post, got {kind!r}")
        norms.append(float(x.norm()))
    return norms


_stack_params = st.tuples(st.integers(2, 24), st.integers(4, 32), st.floats(0.05, 2.0), st.integers(0, 1000))


@check("H.claim_post_ln_exponential_growth", area="claims", kind="claim", tol=0.0,
       case="residual stacks with linear sub-layers of gain g, depth 2..24, width 4..32",
       reference="published claim of Post-LN 'exponential growth'; Xiong et al. 2020",
       expected_verdict="refuted")
def _claim_post_ln():
    """Claim (published): Post-LN activation norms grow with depth (exponentially, like (1+g)^L ||x_0||)."""

    def holds(p):
        depth, d, gain, seed = p
        n = residual_stack_norms("post", depth, d, gain, seed)
        return n[-1] > n[1] * (1 + 1e-6)

    return claim_verdict(
        _stack_params, holds,
        lambda p: (f"depth={p[0]}, d={p[1]}, g={p[2]:.3g}: ||x_L|| = {residual_stack_norms('post', *p)[-1]:.6g} = sqrt(d) "
                   f"at every layer (no growth)"),
    )


@check("H.norm_bounds_residual_stacks", area="claims", kind="exact", tol=1e-10,
       case="depth 1..16, d=16, g in {0.1, 0.5, 1}", reference="Xiong et al. 2020 (Pre-LN vs Post-LN)")
def _norm_bounds():
    """Post-LN output norm = sqrt(d) at every layer; Pre-LN obeys the arithmetic bound ||x_L|| <= ||x_0|| + L g sqrt(d);
    an un-normalised stack obeys ||x_L|| <= (1+g)^L ||x_0||, with equality for F_l = g I."""
    worst = 0.0
    d = 16
    for gain in (0.1, 0.5, 1.0):
        for depth in (1, 4, 16):
            post = residual_stack_norms("post", depth, d, gain, seed=depth)
            worst = max(worst, max(abs(v / math.sqrt(d) - 1.0) for v in post[1:]))
            pre = residual_stack_norms("pre", depth, d, gain, seed=depth)
            worst = max(worst, max(0.0, pre[-1] - (pre[0] + depth * gain * math.sqrt(d))) / pre[0])
            none = residual_stack_norms("none", depth, d, gain, seed=depth)
            worst = max(worst, max(0.0, none[-1] - (1 + gain) ** depth * none[0]) / none[0])
            x0 = torch.randn(d, dtype=torch.float64, generator=torch.Generator().manual_seed(depth))
            x = x0.clone()
            for _ in range(depth):
                x = x + gain * x
            worst = max(worst, abs(float(x.norm() / ((1 + gain) ** depth * x0.norm())) - 1.0))
    return worst


# ---------------------------------------------------------------------------------------------
# the Laplacian residual layer

def laplacian_layer_gain(alpha: float, k: int, n: int) -> float:
    """Measured gain of x -> x + alpha Lap_h x on cos(2 pi k j / n), periodic grid of n points."""
    j = torch.arange(n, dtype=torch.float64)
    x = torch.cos(2 * math.pi * k * j / n)
    y = x + alpha * (torch.roll(x, 1) - 2 * x + torch.roll(x, -1))
    return float((y @ x) / (x @ x))


def laplacian_gain_residual(alpha: float, k: int, n: int) -> float:
    """Measured gain on a cosine mode minus G(omega) = 1 + alpha (2 cos omega - 2), omega = 2 pi k / n."""
    om = 2 * math.pi * k / n
    return abs(laplacian_layer_gain(alpha, k, n) - (1 + alpha * (2 * math.cos(om) - 2)))


_lap_params = st.tuples(st.floats(1e-3, 0.25), st.integers(1, 4), st.integers(16, 128))


@check("H.claim_laplacian_residual_amplifies", area="claims", kind="claim", tol=0.0,
       case="x + alpha Lap x on periodic cosines, alpha in (0, 1/4], low frequencies k/n <= 1/4",
       reference="published claim: 'preserves or even amplifies low-frequency information'",
       expected_verdict="refuted")
def _claim_laplacian():
    """Claim (published): the residual Laplacian layer preserves or amplifies low-frequency modes, |G(omega)| >= 1."""
    return claim_verdict(
        _lap_params, lambda p: laplacian_layer_gain(*p) >= 1.0,
        lambda p: (f"alpha={p[0]:.3g}, k={p[1]}, n={p[2]}: gain {laplacian_layer_gain(*p):.6f} < 1 "
                   f"(G = 1 - 4 alpha sin^2(omega/2) <= 1 for every alpha > 0; only omega = 0 keeps gain 1)"),
    )


@check("H.laplacian_gain", area="claims", kind="exact", tol=1e-13,
       case="alpha in {0.05, 0.25, 0.5}, every mode k of n=64",
       reference="von Neumann analysis of the explicit heat-equation step")
def _laplacian_gain():
    """x + alpha Lap_h x has Fourier gain G(omega) = 1 - 4 alpha sin^2(omega/2): G(0) = 1, decreasing in |omega|,
    |G| <= 1 iff alpha <= 1/2 (the explicit heat-equation CFL bound)."""
    worst = max(laplacian_gain_residual(a, k, 64) for a in (0.05, 0.25, 0.5) for k in range(33))
    # |G(pi)| = |1 - 4 alpha| crosses 1 exactly at alpha = 1/2
    worst = max(worst, abs(laplacian_layer_gain(0.5, 32, 64) + 1.0))
    return worst
