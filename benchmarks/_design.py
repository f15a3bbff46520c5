"""The selection both design studies (auto_design.py, auto_design_sde.py) use to turn a table of scores into the
declared default's choice at one budget."""
from __future__ import annotations

import math

ROBUST_FACTOR = 3.0


def robust_choice(values: dict, schedule_of) -> dict:
    """``values[(method, grid)][case]`` > 0 (an error or distance). Pairs that miss a case (a budget below a
    method's minimum) are not candidates, but their values still count for the per-case best.

    score = geometric mean over cases of value / (best value of that case); worst = the largest per-schedule
    geometric mean (``schedule_of(case)`` groups the cases); the choice is the best score among the pairs whose
    worst is within ROBUST_FACTOR of the best worst (a default must not fail on any schedule).
    Returns {"top": five best by score, "choice": the robust choice}, each entry with method, grid, score, worst.
    """
    cases = sorted(set().union(*(set(d) for d in values.values())))
    full = {k: d for k, d in values.items() if all(c in d for c in cases)}
    best = {c: min(d[c] for d in values.values() if c in d) for c in cases}
    score, worst = {}, {}
    for k, d in full.items():
        logs = {c: math.log(d[c] / best[c]) for c in cases}
        score[k] = math.exp(sum(logs.values()) / len(cases))
        per = {}
        for c in cases:
            per.setdefault(schedule_of(c), []).append(logs[c])
        worst[k] = max(math.exp(sum(v) / len(v)) for v in per.values())
    robust = [k for k in full if worst[k] <= ROBUST_FACTOR * min(worst.values())]
    choice = min(robust, key=lambda k: score[k])

    def entry(k):
        return {"method": k[0], "grid": k[1], "rel_geo_mean": score[k], "worst_schedule": worst[k]}

    return {"top": [entry(k) for k in sorted(score, key=score.get)[:5]], "choice": entry(choice)}


def print_row(nfe: int, result: dict) -> None:
    top, c = result["top"], result["choice"]
    print(f"{nfe:4d}  " + "   ".join(f"{e['method']}/{e['grid']}: {e['rel_geo_mean']:.2f} (worst "
                                     f"{e['worst_schedule']:.1f})" for e in top[:3])
          + f"   -> robust choice {c['method']}/{c['grid']}", flush=True)
