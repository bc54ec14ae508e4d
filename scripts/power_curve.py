#!/usr/bin/env python3
"""The verdict engine's power curve at the quick budget, measured by simulation.

    python scripts/power_curve.py [--out docs]   # writes docs/power.json and docs/figures/power.png

For true effects of 0 to 2.5 per-seed standard deviations, 4,000 simulated
experiments each are judged by the engine's own sequential code path
(:func:`normlab.lab.experiments.verdicts.judge_arrays`) with the quick plan
(looks at 3, 6, 9 and 12 seeds, α = 0.05 split over the looks) and a margin
of half a standard deviation; the curve is the fraction that ends "holds",
for one deciding part (paired and unpaired) and for three deciding parts
(paired, correlated 0.5, all with the same effect). Also recorded: the
fraction ending "does not hold" and the mean number of seeds used.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from normlab.lab.experiments.verdicts import Part, SeedPlan, judge_arrays

EFFECTS = [0.0, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5]
DELTA = 0.5
S = 4000


def simulate(effect: float, m: int, paired: bool, rho: float, seed: int, plan: SeedPlan) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    n = plan.max_seeds
    shared = rng.standard_normal((S, n))
    parts, arrays = [], []
    for j in range(m):
        own = np.sqrt(rho) * shared + np.sqrt(1 - rho) * rng.standard_normal((S, n))
        b = rng.standard_normal((S, n))
        a = (b + own if paired else own) + effect
        parts.append(Part(f"p{j}", "simulated", "v", {"arm": "a"}, {"arm": "b"}, margin=DELTA, why="simulation",
                          paired=paired))  # fmt: skip
        arrays.append((a, b))
    claim, _, look, _, _ = judge_arrays(parts, arrays, plan)
    seeds = np.array(plan.looks)[look]
    return {"holds": float(np.mean(claim == 1)), "does_not_hold": float(np.mean(claim == -1)),
            "mean_seeds": float(np.mean(seeds))}  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="docs", help="folder for power.json and figures/power.png (default: docs)")
    args = ap.parse_args(argv)
    plan = SeedPlan.rounds(3, 12)
    designs = {
        "one part, paired": (1, True, 0.0),
        "one part, unpaired": (1, False, 0.0),
        "three parts, paired, correlated 0.5": (3, True, 0.5),
    }
    curves = {
        name: [
            dict(effect=e, **simulate(e, m, paired, rho, seed=100 * i + k, plan=plan)) for k, e in enumerate(EFFECTS)
        ]
        for i, (name, (m, paired, rho)) in enumerate(designs.items())
    }
    out = Path(args.out)
    (out / "figures").mkdir(parents=True, exist_ok=True)
    result = {"plan": list(plan.looks), "alpha": plan.alpha, "margin_sd": DELTA, "simulations": S, "curves": curves}
    (out / "power.json").write_text(json.dumps(result, indent=1) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4))
    for name, pts in curves.items():
        ax.plot([p["effect"] for p in pts], [p["holds"] for p in pts], marker="o", label=name)
    ax.axhline(0.8, color="grey", lw=0.8, ls="--")
    ax.axvline(1.5, color="grey", lw=0.8, ls=":")
    ax.axvspan(0, DELTA, color="#d5d9df", alpha=0.5, lw=0, label="inside the margin δ = 0.5 SD")
    ax.set(xlabel="true effect (per-seed standard deviations)", ylabel='P(verdict "holds")', ylim=(0, 1.02),
           title="Power at the quick budget (3, 6, 9, 12 seeds; α = 0.05)")  # fmt: skip
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out / "figures" / "power.png", dpi=120)
    for name, pts in curves.items():
        at = next(p for p in pts if p["effect"] == 1.5)
        print(f"{name}: P(holds) at 1.5 SD = {at['holds']:.3f}; at 0: {pts[0]['holds']:.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
