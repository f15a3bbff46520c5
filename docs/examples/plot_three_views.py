"""
Three views of one field
========================

The noised marginal :math:`p_t` of a 2-D mixture, obtained four ways from the same velocity field: in closed
form, by solving the forward Fokker-Planck equation on a grid, by integrating the reverse SDE from the prior down
to :math:`t`, and by running Langevin dynamics at fixed :math:`t` from a standard normal start. Each panel gives
its total-variation distance to the closed form; the sample-based panels cannot go below the Monte-Carlo floor
(the TV of a histogram of as many exact samples).
"""
import matplotlib.pyplot as plt
import torch

import diffusion_lab
from diffusion_lab import fokker_planck as fp
from diffusion_lab import langevin, samplers, schedules, targets

diffusion_lab.set_threads(1)
schedule = schedules.VPLinear()
target = targets.ring8()
field = target.field(schedule)
t, n = 0.1, 20_000
grid = fp.Grid.box(-4.0, 4.0, 64, dim=2)
gen = torch.Generator().manual_seed(0)

exact = fp.exact_density(target, schedule, grid, t)
forward = fp.solve_forward(schedule, target, grid, [schedule.t_min, t], steps=100).density(t)

x_T = target.marginal(schedule, schedule.t_max).sample(n, gen)
sde_grid = samplers.time_grid(schedule, 200, "logsnr", t_min=t)
sde = samplers.sample(field, x_T, "em", grid=sde_grid, generator=gen).x
h = 0.1 * langevin.stability_bound(target, schedule, t)
chains = langevin.ula(field, torch.randn(n, 2, generator=gen, dtype=torch.float64), t, h, 300, generator=gen).x

floor = fp.tv(fp.density_from_samples(target.marginal(schedule, t).sample(n, gen), grid), exact, grid)
views = {
    "closed form": exact,
    "Fokker-Planck grid": forward,
    "reverse SDE samples": fp.density_from_samples(sde, grid),
    "Langevin at fixed t": fp.density_from_samples(chains, grid),
}

# %%
# One colour scale for all panels, so that they can be compared by eye.

vmax = max(float(d.max()) for d in views.values())
fig, axes = plt.subplots(1, 4, figsize=(11, 3.3), sharey=True, layout="constrained")
for ax, (name, dens) in zip(axes, views.items()):
    im = ax.imshow(dens.T, origin="lower", extent=(-4, 4, -4, 4), vmin=0, vmax=vmax, cmap="viridis")
    label = "" if name == "closed form" else f"\nTV {fp.tv(dens, exact, grid):.3f}"
    ax.set_title(name + label)
    ax.set_xlabel("x1")
    print(f"{name:22s} TV to the closed form {fp.tv(dens, exact, grid):.4f}")
print(f"Monte-Carlo floor of a {n}-sample histogram: TV {floor:.4f}")
axes[0].set_ylabel("x2")
fig.colorbar(im, ax=axes, shrink=0.85, label=f"p_t(x), t = {t}")
fig.suptitle(f"ring8 under VP at t = {t}; Monte-Carlo floor of the sample panels: TV {floor:.3f}")
plt.show()
