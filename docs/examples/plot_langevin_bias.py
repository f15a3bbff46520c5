"""
The bias of unadjusted Langevin
===============================

At a fixed time :math:`t` the Langevin diffusion :math:`dx = \\nabla \\log p_t(x)\\,d\\tau + \\sqrt{2}\\,dW` has
:math:`p_t` as its stationary law, but its Euler discretisation :math:`x' = x + h\\,s(x) + \\sqrt{2h}\\,z` (ULA)
does not. On a Gaussian :math:`N(m, v)` the chain is Gaussian too, with stationary variance
:math:`v / (1 - h/(2v))` (Roberts & Tweedie 1996), and it diverges for :math:`h \\ge 2v`. MALA's
Metropolis-Hastings correction removes the bias at the same step.
"""
import matplotlib.pyplot as plt
import numpy as np
import torch

import diffusion_lab
from diffusion_lab import langevin, schedules, targets

diffusion_lab.set_threads(1)
schedule = schedules.VPLinear()
target = targets.Gaussian([0.0], [[0.25]])
field = target.field(schedule)
t = 0.05
v = float(target.marginal(schedule, t).covs[0, 0, 0])
gen = torch.Generator().manual_seed(0)

# %%
# Run 4000 chains from the exact law for 100 steps at each step size and compare the sample variance with the
# closed form.

fractions = np.array([0.05, 0.2, 0.4, 0.6, 0.8, 0.9])
ula_var, mala_var = [], []
for frac in fractions:
    h = float(frac * 2 * v)
    x0 = target.marginal(schedule, t).sample(4000, gen)
    ula_var.append(float(langevin.ula(field, x0, t, h, 100, generator=gen).x.var()))
    mala_var.append(float(langevin.mala(field, x0, t, h, 100, generator=gen).x.var()))
h_fine = np.linspace(0.0, 0.92, 200) * 2 * v
fig, ax = plt.subplots(figsize=(6, 4))
ax.plot(h_fine / (2 * v), v / (1 - h_fine / (2 * v)), color="k", lw=1, label="ULA, closed form v / (1 - h/2v)")
ax.plot(fractions, ula_var, "o", label="ULA, 4000 chains")
ax.plot(fractions, mala_var, "s", label="MALA, 4000 chains")
ax.axhline(v, color="grey", ls="--", lw=1, label="variance of p_t")
ax.set_xlabel("step h / stability bound 2v")
ax.set_ylabel("stationary variance")
ax.set_title(f"Langevin at fixed t = {t} on N(0, 0.25) under VP (v = {v:.3f})")
ax.legend(frameon=False)
fig.tight_layout()
plt.show()
for frac, u, m in zip(fractions, ula_var, mala_var):
    print(f"h = {frac:.2f} x 2v: ULA {u:.4f} (closed form {v / (1 - frac):.4f}), MALA {m:.4f} (exact {v:.4f})")
