"""
Convergence orders of ODE samplers
==================================

A deterministic sampler integrates the probability-flow ODE; a method of order :math:`k` has a global error
:math:`O(h^k)` in the step :math:`h`. On a 1-D Gaussian mixture the exact flow map is the monotone quantile map
:math:`F_{t}^{-1} \\circ F_{s}` (:func:`diffusion_lab.reference.quantile_flow_map`), so the error of each sampler
is measured against the exact answer, not against a finer run of itself.
"""
import matplotlib.pyplot as plt
import numpy as np
import torch

import diffusion_lab
from diffusion_lab import reference, samplers, schedules, targets

diffusion_lab.set_threads(1)
schedule = schedules.VPLinear()
target = targets.bimodal_1d()
field = target.field(schedule)

x_T = target.marginal(schedule, schedule.t_max).sample(500, torch.Generator().manual_seed(0))
exact = reference.quantile_flow_map(target, schedule, x_T, schedule.t_max, schedule.t_min)

# %%
# Each method runs on a log-SNR grid with N steps; the error is the mean distance to the exact endpoint.

methods = {"euler": 1, "heun": 2, "dpm_solver_2": 2, "dpmpp_2m": 2, "dpm_solver_3": 3, "unipc": 3}
steps = [16, 32, 64, 128]
fig, ax = plt.subplots(figsize=(9, 4.2), layout="constrained")
markers = "osD^v<>"
for i, (name, order) in enumerate(methods.items()):
    nfes, errors = [], []
    for n in steps:
        res = samplers.sample(field, x_T, name, steps=n, grid_kind="logsnr")
        nfes.append(res.nfe)
        errors.append(float((res.x - exact).abs().mean()))
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    ax.loglog(nfes, errors, marker=markers[i], label=f"{name}: measured order {slope:.2f} (theory {order})")
    print(f"{name:14s} order {slope:.2f} (theory {order})")
ax.set_xticks([16, 32, 64, 128, 256, 512], ["16", "32", "64", "128", "256", "512"])
ax.minorticks_off()
ax.set_xlabel("model evaluations (NFE)")
ax.set_ylabel("mean |x - exact flow map|")
ax.set_title("PF-ODE samplers on bimodal_1d (VP), log-SNR grid")
ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
plt.show()
