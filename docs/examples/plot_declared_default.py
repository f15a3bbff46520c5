"""
Samplers at a budget, and the declared default
==============================================

With ``nfe=K`` every sampler spends a budget of K model evaluations by its own rule, and ``method="auto"`` picks
the solver, its grid and its options from the budget by a rule declared in advance
(:mod:`diffusion_lab.samplers.auto`). Here each one integrates the probability-flow ODE of the 8-Gaussian ring
from the same exact samples of the prior, and is scored by its distance to the exact flow map (a float64
Dormand-Prince solve at relative tolerance 1e-10, :func:`diffusion_lab.reference.flow_map`).
"""
import matplotlib.pyplot as plt
import torch

import diffusion_lab
from diffusion_lab import reference, samplers, schedules, targets

diffusion_lab.set_threads(1)
schedule = schedules.VPLinear()
target = targets.ring8()
field = target.field(schedule)
x_T = target.marginal(schedule, schedule.t_max).sample(300, torch.Generator().manual_seed(0))
exact, reference_nfe = reference.flow_map(field, x_T, schedule.t_max, schedule.t_min)

# %%
# The same budgets for every method; ``res.method`` says what ``auto`` ran.

budgets = [5, 8, 10, 15, 20, 30, 50]
methods = ["auto", "euler", "heun", "dpmpp_2m", "unipc", "ipndm"]
markers = "o^sDvP"
fig, ax = plt.subplots(figsize=(7.5, 4), layout="constrained")
for marker, name in zip(markers, methods):
    errors, used = [], []
    for k in budgets:
        res = samplers.sample(field, x_T, name, nfe=k)
        errors.append(float((res.x - exact).norm(dim=1).mean()))
        used.append(res.method if name == "auto" else "")
    ax.loglog(budgets, errors, marker=marker, lw=2.5 if name == "auto" else 1, label=name)
    if name == "auto":
        print("auto ran: " + ", ".join(f"NFE {k}: {m}" for k, m in zip(budgets, used)))
    print(f"{name:9s} " + "  ".join(f"{e:.1e}" for e in errors))
ax.set_xticks(budgets, [str(k) for k in budgets])
ax.minorticks_off()
ax.set_xlabel("model evaluations (NFE)")
ax.set_ylabel("mean |x - exact flow map|")
ax.set_title("ring8 under VP: PF-ODE samplers at a budget")
ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), frameon=False)
plt.show()

# %%
# The rule was fixed on a design set of targets and schedules before it was measured on others, so it is not the
# best method at every budget of every target: here, at NFE 5, multistep DPM-Solver++ is ahead of it. The
# benchmark against diffusers and k-diffusion on a held-out suite, including where the rule misses, is on the
# results page.
