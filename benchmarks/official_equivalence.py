#!/usr/bin/env python
r"""Our exponential integrators against the official DPM-Solver and UniPC code, step for step.

Both official files are single modules (LuChengTHU/dpm-solver ``dpm_solver_pytorch.py``, wl-zhao/UniPC
``uni_pc.py``); pass their paths (nothing is downloaded). Setting: continuous VP-linear schedule (beta 0.1 .. 20,
``NoiseScheduleVP('linear')`` there, ``schedules.VPLinear()`` here), the exact noise prediction of an exact
Gaussian-mixture target as the model of both, the same start samples x_T ~ p_1, t from 1 to 1e-3, float64.
For every configuration the table gives max |ours - official| / max |official| and the NFE of each side.

Run:  python benchmarks/official_equivalence.py --dpm-solver PATH/dpm_solver_pytorch.py --unipc PATH/uni_pc.py
      [--target ring8] [--json out.json]
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import io
import json
import sys

import torch

try:
    from diffusion_lab import samplers, schedules, targets
except ImportError:  # running from a checkout without installation
    sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parents[1]))
    from diffusion_lab import samplers, schedules, targets

SKIP = {"logsnr": "logSNR", "uniform": "time_uniform", "quadratic": "time_quadratic"}


def _load(path, name):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dpm-solver", required=True, metavar="PATH", help="official dpm_solver_pytorch.py")
    p.add_argument("--unipc", required=True, metavar="PATH", help="official uni_pc.py")
    p.add_argument("--target", default="ring8")
    p.add_argument("--samples", type=int, default=256)
    p.add_argument("--json", default=None, metavar="PATH")
    a = p.parse_args(argv)
    torch.set_default_dtype(torch.float64)
    dpm, upc = _load(a.dpm_solver, "official_dpm_solver"), _load(a.unipc, "official_unipc")
    sch = schedules.VPLinear()
    target = targets.get_target(a.target)
    field = target.field(sch)
    x_T = target.marginal(sch, 1.0).sample(a.samples, torch.Generator().manual_seed(0))
    calls = {"n": 0}

    def eps_model(x, t):  # UniPC's official update is written for image tensors (b, c, h, w): d -> (d, 1, 1)
        calls["n"] += 1
        return field.eps(x.reshape(x.shape[0], -1), t.reshape(-1)[0].to(torch.float64)).reshape(x.shape)

    rows = []

    def compare(label, theirs_fn, ours_kwargs):
        calls["n"] = 0
        with contextlib.redirect_stdout(io.StringIO()):  # the official UniPC loop prints at its last step
            theirs = theirs_fn()
        their_nfe = calls["n"]
        ours = samplers.sample(field, x_T, **ours_kwargs)
        dev = float((ours.x - theirs).abs().max() / theirs.abs().max())
        rows.append({"config": label, "rel_max_dev": dev, "nfe_official": their_nfe, "nfe_ours": ours.nfe})
        print(f"{label:58s} {dev:10.2e} {their_nfe:6d} {ours.nfe:6d}", flush=True)

    print(f"{'configuration (official -> ours)':58s} {'max dev':>10s} {'NFE':>6s} {'ours':>6s}")
    for order_, method in ((1, "dpm_solver_1"), (2, "dpm_solver_2"), (3, "dpm_solver_3")):
        for algo, predict in (("dpmsolver", "eps"), ("dpmsolver++", "x0")):
            for nfe in (3, 5, 10, 20):
                ns = dpm.NoiseScheduleVP("linear", continuous_beta_0=0.1, continuous_beta_1=20.0)
                fn = dpm.model_wrapper(eps_model, ns, model_type="noise")
                solver = dpm.DPM_Solver(fn, ns, algorithm_type=algo)
                compare(f"singlestep (fast) order {order_} {algo} NFE {nfe} logSNR",
                        lambda: solver.sample(x_T.clone(), steps=nfe, order=order_, skip_type="logSNR",
                                              method="singlestep"),
                        dict(method=method, nfe=nfe, predict=predict, grid_kind="logsnr"))
    for order_, method, extra in ((2, "dpmpp_2m", {}), (3, "dpmpp_3m", {})):
        for grid in ("logsnr", "uniform", "quadratic"):
            for steps in (6, 10, 20):
                ns = dpm.NoiseScheduleVP("linear", continuous_beta_0=0.1, continuous_beta_1=20.0)
                fn = dpm.model_wrapper(eps_model, ns, model_type="noise")
                solver = dpm.DPM_Solver(fn, ns, algorithm_type="dpmsolver++")
                compare(f"multistep dpmsolver++ order {order_} {SKIP[grid]} N {steps}",
                        lambda: solver.sample(x_T.clone(), steps=steps, order=order_, skip_type=SKIP[grid],
                                              method="multistep", lower_order_final=True),
                        dict(method=method, steps=steps, grid_kind=grid, **extra))
    for order_ in (1, 2, 3):
        for grid in ("logsnr", "uniform"):
            for steps in (6, 10, 20):
                ns = upc.NoiseScheduleVP("linear", continuous_beta_0=0.1, continuous_beta_1=20.0)
                fn = upc.model_wrapper(eps_model, ns, model_type="noise")
                solver = upc.UniPC(fn, ns, algorithm_type="data_prediction", variant="bh2")
                compare(f"UniPC bh2 data order {order_} {SKIP[grid]} N {steps}",
                        lambda: solver.sample(x_T.clone()[:, :, None, None], steps=steps, order=order_,
                                              skip_type=SKIP[grid], method="multistep",
                                              lower_order_final=True).reshape(x_T.shape),
                        dict(method="unipc", steps=steps, grid_kind=grid, order=order_))
    worst = max(r["rel_max_dev"] for r in rows)
    nfe_ok = all(r["nfe_official"] == r["nfe_ours"] for r in rows)
    print(f"\nworst relative deviation {worst:.2e} over {len(rows)} configurations; NFE equal everywhere: {nfe_ok}")
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"settings": {"target": a.target, "samples": a.samples, "schedule": sch.settings(),
                                    "torch": torch.__version__}, "rows": rows, "worst": worst, "nfe_equal": nfe_ok},
                      fh, indent=1)


if __name__ == "__main__":
    main()
