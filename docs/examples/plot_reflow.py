"""
Reflow straightens the flow
===========================

Rectified flow (Liu, Gong & Liu 2023) trains a velocity on the straight line between the two ends of a coupling,
:math:`x_t = (1-t)\\,x_0 + t\\,z` with target :math:`z - x_0`. Reflow repeats it on the coupling
:math:`(\\Phi(z), z)` that the previous flow produces. The paper states three things: the straightness
:math:`S = \\int E\\|(z - x) - v(Z_t, t)\\|^2 dt` falls from round to round, one-step (Euler) sampling gets better as
it does, and each learned round loses a little accuracy. Here round 0 is the *exact* field of ring8 and of the 1-D
bimodal mixture, so every number can be checked against the exact law (MMD²).

The computation (``python -m experiments.reflow_rounds``, several CPU minutes) wrote
``docs/figures/reflow_rounds.json``; this page only plots that file.
"""
import json
from pathlib import Path

import matplotlib.pyplot as plt

from experiments.reflow_rounds import figure

try:
    here = Path(__file__).resolve().parent
except NameError:  # run interactively
    here = Path.cwd()
doc = json.loads((here.parent / "figures" / "reflow_rounds.json").read_text())
rows = doc["headline"]["rows"]
names = list(dict.fromkeys(r["target"] for r in rows))

# %%
# Straightness, one-step MMD² against the exact law, and the MMD² of each round's own ODE solution (the accuracy
# that the learned rounds give up).

figure(rows)
plt.show()

# %%
# The verdicts, measured (the MMD² comparisons use two standard errors of the estimates):

for name in names:
    v = doc["headline"]["verdicts"][name]
    fl = doc["headline"]["exact_floor"][name]
    print(f"{name}: exact samples give MMD² {fl['exact_mmd2']:.1e} ± {fl['exact_mmd2_se']:.1e}")
    for r in (r for r in rows if r["target"] == name):
        print(f"  round {r['round']}: S = {r['S']:.3g}, cost E|z - x|² = {r['cost']:.4f}, Euler NFE 1: MMD² "
              f"{r['euler1_mmd2']:.2e} ± {r['euler1_mmd2_se']:.1e}, error {r['euler1_err']:.3f}; ODE MMD² "
              f"{r['ode_mmd2']:.2e}")
    print(f"  straightness decreases: {v['straightness_decreases']}; one-step improves at round 1: "
          f"{v['one_step_improves_round1']}; no later round worse by > 2 SE: {v['one_step_monotone_within_2se']}; "
          f"ODE accuracy lost with learned rounds: {v['ode_mmd2_grows_with_learned_rounds']}")
