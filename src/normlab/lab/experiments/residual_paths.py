"""C10 ``paths``: with BN, shallow paths carry the output variance of a deep residual net at initialisation.

Pre-registration
----------------
**Claim** (S4, the passage under Fig. 3; De & Smith 2020, "Batch
Normalization Biases Residual Blocks Towards the Identity Function in Deep
Networks", §3 and Fig. 3, after Veit et al. 2016): unroll a residual network
of ``d`` blocks into its ``2^d`` paths (one per subset of branches taken).
With BN on each branch, the variance before block ``i`` is about ``i`` while
the branch adds 1, so every path through branch ``i`` is scaled down by
``1/i`` in variance and long paths are suppressed: for a network of 10,000
residual blocks 97 % of the output variance comes from shallow paths
through 15 or fewer branches.

The quantity is exact in the paper's model: branch ``i`` carries the share
``p_i = 1/(i+1)`` of the variance at its depth, and the share of the output
variance through paths of exactly ``k`` branches is the Poisson-binomial law
of ``p_1 .. p_d`` (:func:`normlab.lab.probes.bn_path_distribution`, exact in
float64). Per ``d`` the runs record its cumulative share through at most 15
branches (metric ``share_at_15``) and ``k97``, the fewest branches whose
paths carry at least 97 % (metric ``k97``). These are the same in every
seed's run (no sampling), so their intervals are points: the parts are
decided exactly at the first look.

Deciding parts (arm ``kind=analytic, d=10000``, one-sample against the
paper's number):

* ``k97`` — ``k97`` ≈ 15 ("equivalent"), margin δ = 3 branches. Why: the
  **paper's number** "15 or fewer" (CLAIMS.md: "~15"), a count read off the
  simulated curve of Fig. 3; we accept it within ±20 % (3 branches).
* ``share15`` — ``share_at_15`` ≈ 0.97, margin δ = 0.02. Why: the **paper's
  number** 97 % (CLAIMS.md: "about 97 %"), read off the same curve: ±2
  percentage points.

Reported parts (never deciding):

* ``simulation`` — Monte-Carlo check of the exact law, as De & Smith computed
  Fig. 3: ``num_paths`` paths drawn per seed (branch ``i`` taken with
  probability ``p_i``; a path is then drawn with probability equal to its
  share of the variance), metric ``sim_minus_exact`` = simulated minus exact
  share through ≤ 15 branches at ``d = 10,000``, ≈ 0 with δ = 0.005. Why: the
  **measurement's precision** — 20,000 paths give a standard error of about
  0.0009 on a share near 0.985, so a disagreement above 0.005 (5 standard
  errors) would mean a bug, not chance. Reported: it checks our computation,
  not the claim.
* ``network-relu`` / ``network-linear`` — an actual BN ResNet at
  initialisation (``net_depth`` = 100 blocks, ReLU and linear, float64, BN in
  train mode): the share of block ``i``'s output variance carried by its
  branch is measured, ``Var(branch_i) / Var(out_i)``; the mean path length of
  the path-length law of these measured shares (metric ``mean_length``) is
  compared with the paper's model at the same depth, ``H_{d+1} - 1`` (4.20
  for ``d = 100``), log scale, ≈ within ×1.25. Why: a **practical
  threshold** — a 25 % longer or shorter typical path would change which
  depths dominate visibly, less would not. Reported: CLAIMS.md C10 asks for
  the analysis and its simulation; the network is C9's territory (skip
  variance ~ i, branch ~ 1), shown here as the bridge from model to network.

**Does not hold** if the exact law puts ``k97`` 3 or more branches away from
15, or the share through ≤ 15 branches 2 points or more away from 97 %.

**Seeds and budget** (quick): 3 seeds per round, at most 6 (the deciding
parts are exact and decide at the first look; seeds only add Monte-Carlo
paths and networks to the reported parts). Measured on the 2-core CPU, one
thread per run (``/usr/bin/time``, user + system): 12 s of CPU at 3 seeds,
17 s at the full budget of 6.

Design
------
* **Exact and simulated** (one run per ``d`` in ``depths`` and seed): the
  exact law (:func:`~normlab.lab.probes.bn_path_distribution`, ``v_1 = α = 1``
  so ``p_i = 1/(i+1)``), its ``share_at_15``, ``k97`` and mean path length
  (``H_{d+1} - 1``), the law without normalisation for contrast (binomial,
  mean ``d/2``), and ``num_paths`` simulated paths
  (:func:`~normlab.lab.probes.simulate_path_lengths`, seeded by the run's
  seed).
* **An actual network** (one run per activation and seed): the BN ResNet of
  C9 (:func:`normlab.lab.experiments.residual_variance.probe_blocks`: built as
  ``train`` builds it for the seed, on one seeded batch of MNIST-1D — why
  MNIST-1D: see C9), its measured per-block shares, their path-length law,
  and the model's shares with the network's own two constants
  (``p_i = b / (v_1 + i b)``, ``v_1`` the measured variance entering block 1,
  ``b`` the mean measured branch variance) for the figure.

Command: ``normlab run paths`` (quick). ``full``: 10^6 simulated paths per
depth and a 1,000-block network.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from normlab.lab.experiments.framework import (
    Experiment,
    Part,
    Run,
    fmt_mean_std,
    pyplot,
    register_experiment,
    save_figure,
)
from normlab.lab.experiments.residual_variance import probe_blocks
from normlab.lab.experiments.verdicts import Judgement

__all__ = ["PathsConfig", "EXPERIMENT", "CLAIM_DEPTH", "CLAIM_BRANCHES", "CLAIM_SHARE"]

CLAIM_DEPTH = 10_000  # the paper's "a network of 10,000 residual blocks"
CLAIM_BRANCHES = 15  # "... through 15 or fewer branches"
CLAIM_SHARE = 0.97  # "... about 97 % of the variance"
_KEEP = 200  # distribution entries stored per run (k = 0..199) plus the tail mass


@dataclass(frozen=True)
class PathsConfig:
    """C10's configuration; see the module docstring for the procedure and the parts."""

    seeds: int = 3  # seeds per round: of the path simulation, and of the network's initialisation and batch
    max_seeds: int = 6  # seed budget
    threads: int = 1  # torch threads per run (not part of the run id)
    depths: tuple[int, ...] = (10, 100, 1000, CLAIM_DEPTH)  # residual blocks d of the exact law (must hold 10,000)
    num_paths: int = 20000  # simulated paths per depth and seed
    net_depth: int = 100  # residual blocks of the measured BN ResNet
    net_width: int = 16  # its channels
    net_activations: tuple[str, ...] = ("relu", "identity")  # ReLU ResNet and deep linear ResNet
    dataset: str = "mnist1d"  # the network's probe data (see C9 for why not digits)
    data_dir: str | None = None  # folder of the CIFAR batches; not part of the run id
    batch_size: int = 128  # examples in the network's probe batch


def _grid(cfg: PathsConfig):
    if CLAIM_DEPTH not in cfg.depths:
        raise ValueError(f"depths must include {CLAIM_DEPTH} (the claim's depth), got {cfg.depths}")
    for d in cfg.depths:
        yield {"kind": "analytic", "d": d, "num_paths": cfg.num_paths, "branches": CLAIM_BRANCHES}
    for act in cfg.net_activations:
        yield {
            "kind": "network",
            "d": cfg.net_depth,
            "activation": act,
            "dataset": cfg.dataset,
            "model": "resnet",
            "model_kwargs": {
                "depth": cfg.net_depth,
                "width": 1,
                "base_width": cfg.net_width,
                "stages": 1,
                "activation": act,
                "residual_scale": None,
            },
            "norm": "batchnorm",
            "batch_size": cfg.batch_size,
            "mode": "train",
            "dtype": "float64",
        }


def _truncate(dist: np.ndarray) -> tuple[list[float], float]:
    return dist[:_KEEP].tolist(), float(dist[_KEEP:].sum())


def _law(shares: np.ndarray, k: int) -> dict[str, float]:
    """``share_at_<k>``, ``k97`` and ``mean_length`` of the path-length law of ``shares``."""
    from normlab.lab.probes import paths as P

    dist = P.path_length_distribution(shares)
    return {
        "share_at_k": float(P.cumulative_share(dist)[min(k, dist.size - 1)]),
        "k97": P.paths_needed(dist, CLAIM_SHARE),
        "mean_length": P.mean_path_length(dist),
    }


def _run_analytic(run: Run) -> dict[str, Any]:
    from normlab.lab.probes import paths as P

    d, k = run["d"], run["branches"]
    shares = P.branch_shares(d)  # 1/(i+1)
    dist = P.bn_path_distribution(d)
    exact = _law(shares, k)
    sim = P.simulate_path_lengths(shares, run["num_paths"], seed=run.seed)
    unnorm = _law(P.branch_shares(d, normalized=False), k)
    head, tail = _truncate(dist)
    sim_head, sim_tail = _truncate(sim.distribution)
    return {
        "share_at_15": exact["share_at_k"],
        "k97": exact["k97"],
        "mean_length": exact["mean_length"],
        "length_variance": float(np.sum(shares * (1 - shares))),  # of the path length (a sum of Bernoullis)
        "unnormalised_mean_length": unnorm["mean_length"],
        "unnormalised_share_at_15": unnorm["share_at_k"],
        "sim_share_at_15": float(np.mean(sim.lengths <= k)),
        "sim_mean_length": sim.mean,
        "num_paths": sim.num_paths,
        "distribution": head,
        "distribution_tail": tail,
        "sim_distribution": sim_head,
        "sim_distribution_tail": sim_tail,
    }


def _run_network(run: Run) -> dict[str, Any]:
    from normlab.lab.probes import branch_shares

    a = probe_blocks(run)
    skip, branch, out = a["skip_variance"], a["branch_variance"], a["output_variance"]
    measured = np.clip(branch / out, 0.0, 1.0)  # (d,) share of block i's output variance carried by its branch
    d = measured.size
    b = float(branch.mean())
    model = branch_shares(d, alpha=math.sqrt(b), initial_variance=float(skip[0]))  # the network's own constants
    textbook = branch_shares(d)  # 1/(i+1)
    laws = {name: _law(p, CLAIM_BRANCHES) for name, p in (("", measured), ("model_", model), ("textbook_", textbook))}
    return {
        "measured_share": measured.tolist(),
        "model_share": model.tolist(),
        "textbook_share": textbook.tolist(),
        "skip_variance": skip.tolist(),
        "branch_variance": branch.tolist(),
        "output_variance": out.tolist(),
        "v1": float(skip[0]),
        "branch_mean": b,
        **{f"{pre}{key}": v for pre, law in laws.items() for key, v in law.items()},
    }


def _run_one(run: Run) -> dict[str, Any]:
    return _run_analytic(run) if run["kind"] == "analytic" else _run_network(run)


def _measure(rows: list[dict[str, Any]], cfg: PathsConfig) -> list[dict[str, Any]]:
    """Adds ``sim_minus_exact`` to the exact/simulated rows (simulated minus exact share through ≤ 15 branches)."""
    return [
        {**r, "sim_minus_exact": r["sim_share_at_15"] - r["share_at_15"]} if r["kind"] == "analytic" else r
        for r in rows
    ]


def textbook_mean_length(d: int) -> float:
    """``H_{d+1} - 1``: the mean path length of the paper's model (``p_i = 1/(i+1)``) at depth ``d``."""
    return float(np.sum(1.0 / np.arange(2, d + 2, dtype=np.float64)))


def _parts(cfg: PathsConfig) -> list[Part]:
    top = {"kind": "analytic", "d": CLAIM_DEPTH}
    h = textbook_mean_length(cfg.net_depth)
    net = [
        Part(f"network-{name}", f"{name} BN ResNet ({cfg.net_depth} blocks): measured mean path length ≈ the model's",
             "mean_length", {"kind": "network", "activation": act}, bound=h, direction="equivalent", margin=1.25,
             log=True, why="practical: a typical path 25 % longer or shorter would visibly change which depths "
             "dominate", decides=False, unit="branches", label_a=f"{name} BN ResNet")
        for act, name in (("relu", "relu"), ("identity", "linear"))
        if act in cfg.net_activations
    ]  # fmt: skip
    return [
        Part("k97", f"d = {CLAIM_DEPTH:,}: 97 % of the output variance through paths of ≤ k97 ≈ 15 branches", "k97",
             top, bound=CLAIM_BRANCHES, direction="equivalent", margin=3,
             why="the paper's '15 or fewer', a count read off Fig. 3: within ±20 % (3 branches)", unit="branches",
             label_a=f"exact, d={CLAIM_DEPTH}"),
        Part("share15", f"d = {CLAIM_DEPTH:,}: paths of ≤ 15 branches carry ≈ 97 % of the output variance",
             "share_at_15", top, bound=CLAIM_SHARE, direction="equivalent", margin=0.02,
             why="the paper's 97 %, read off the curve of Fig. 3: ±2 percentage points", unit="share",
             label_a=f"exact, d={CLAIM_DEPTH}"),
        Part("simulation", f"d = {CLAIM_DEPTH:,}: simulated paths agree with the exact law (share ≤ 15 branches)",
             "sim_minus_exact", top, bound=0.0, direction="equivalent", margin=0.005,
             why="Monte-Carlo precision: 20,000 paths give a standard error ≈ 0.0009; 0.005 is > 5 of them",
             decides=False, unit="share", label_a="simulated − exact"),
        *net,
    ]  # fmt: skip


def _explain(rows: list[dict[str, Any]], cfg: PathsConfig, judgement: Judgement):
    ana = [r for r in rows if r["kind"] == "analytic"]
    net = [r for r in rows if r["kind"] == "network" and int(r["seed"]) < judgement.seeds]
    top = next((r for r in ana if r["d"] == CLAIM_DEPTH), None)
    if top is None:
        return "", {}
    numbers: dict[str, Any] = {
        f"d{r['d']}": {
            "share_at_15": r["share_at_15"],
            "k97": r["k97"],
            "mean_length": r["mean_length"],
            "unnormalised_mean_length": r["unnormalised_mean_length"],
        }
        for r in ana
        if r["seed"] == 0
    }
    text = (
        f"In the paper's model a {CLAIM_DEPTH:,}-block BN ResNet sends {100 * top['share_at_15']:.2f} % of its output "
        f"variance through paths of ≤ 15 branches and 97 % through ≤ {top['k97']} (mean path length "
        f"{top['mean_length']:.2f} of {CLAIM_DEPTH:,} blocks; {top['unnormalised_mean_length']:.0f} without "
        "normalisation), so the text's two numbers fit each other only approximately"
    )
    for act, name in (("relu", "ReLU"), ("identity", "linear")):
        rs = [r for r in net if r["activation"] == act]
        if rs:
            ml = [r["mean_length"] for r in rs]
            numbers[f"network_{act}_mean_length"] = float(np.mean(ml))
            text += (
                f"; a real {name} BN ResNet of {rs[0]['d']} blocks has mean path length {fmt_mean_std(ml, 3)} "
                f"(model {textbook_mean_length(rs[0]['d']):.2f}), 97 % within ≤ "
                f"{fmt_mean_std([r['k97'] for r in rs], 2)} branches"
            )
    return text, numbers


def _plot(rows: list[dict[str, Any]], out_dir: Path, cfg: PathsConfig) -> list[Path]:
    plt = pyplot()
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(16, 4.4))
    ana = [r for r in rows if r["kind"] == "analytic"]
    net = [r for r in rows if r["kind"] == "network"]
    kmax = 40
    for c, d in enumerate(sorted({r["d"] for r in ana})):
        rs = [r for r in ana if r["d"] == d]
        dist = np.array(rs[0]["distribution"])
        ks = np.arange(min(kmax, dist.size))
        ax1.plot(ks, np.minimum(np.cumsum(dist), 1.0)[: ks.size], color=f"C{c}", lw=1.5, label=f"d = {d:,} (exact)")
        sim = np.mean([np.array(r["sim_distribution"]) for r in rs], axis=0)
        ax1.plot(ks, np.minimum(np.cumsum(sim), 1.0)[: ks.size], color=f"C{c}", ls="none", marker="o", ms=3,
                 alpha=0.7, label=f"d = {d:,} (simulated, {len(rs)}×{rs[0]['num_paths']} paths)")  # fmt: skip
        ax2.plot(ks, dist[: ks.size], color=f"C{c}", lw=1.5, label=f"d = {d:,}")
        ax2.plot(ks, sim[: ks.size], color=f"C{c}", ls="none", marker="o", ms=3, alpha=0.7)
    ax1.axhline(CLAIM_SHARE, color="k", ls=":", lw=1)
    ax1.axvline(CLAIM_BRANCHES, color="k", ls=":", lw=1)
    ax1.text(CLAIM_BRANCHES + 0.5, 0.05, f"k = {CLAIM_BRANCHES}", fontsize=8)
    ax1.text(1, CLAIM_SHARE + 0.01, f"{100 * CLAIM_SHARE:g} %", fontsize=8)
    ax1.set(xlabel="path length k (branches taken)", ylabel="share of output variance through ≤ k branches",
            title="cumulative share, BN (branch i carries 1/(i+1))", ylim=(0, 1.02))  # fmt: skip
    ax1.legend(fontsize=6.5)
    ax2.set(xlabel="path length k", ylabel="share of output variance through exactly k branches",
            title="path-length law (lines exact, dots simulated)")  # fmt: skip
    ax2.legend(fontsize=7)
    for c, act in enumerate(dict.fromkeys(r["activation"] for r in net)):
        rs = [r for r in net if r["activation"] == act]
        name = "linear" if act == "identity" else ("ReLU" if act == "relu" else act)
        for k, r in enumerate(rs):
            i = np.arange(1, len(r["measured_share"]) + 1)
            ax3.plot(i, r["measured_share"], color=f"C{c}", lw=0.8, alpha=0.6,
                     label=f"{name} BN ResNet, measured Var(branch)/Var(out)" if k == 0 else None)  # fmt: skip
            if k == 0:
                ax3.plot(i, r["model_share"], color=f"C{c}", ls="--", lw=1.2, label=f"{name}: b/(v₁ + i·b), seed 0")
    if net:
        i = np.arange(1, len(net[0]["textbook_share"]) + 1)
        ax3.plot(i, net[0]["textbook_share"], color="k", ls=":", lw=1, label="1/(i+1)")
    ax3.set(xscale="log", yscale="log", xlabel="block i", ylabel="share of block i's output variance",
            title="per-block share in a BN ResNet at init (train mode)")  # fmt: skip
    ax3.legend(fontsize=7)
    fig.suptitle("C10 residual net as an ensemble of paths: output variance by path length", fontsize=10)
    fig.tight_layout()
    return [save_figure(fig, out_dir, "paths")]


EXPERIMENT = register_experiment(
    Experiment(
        name="paths",
        claim="C10",
        title="With BN, shallow paths dominate: ~97 % of the output variance of 10,000 blocks through <= ~15 branches",
        config=PathsConfig,
        scales={
            "smoke": PathsConfig(
                seeds=2,
                max_seeds=2,
                depths=(10, CLAIM_DEPTH),
                num_paths=2000,
                net_depth=8,
                net_width=4,
                batch_size=32,
                net_activations=("relu",),
            ),  # fmt: skip
            "quick": PathsConfig(),
            "full": PathsConfig(seeds=5, max_seeds=10, num_paths=1_000_000, net_depth=1000),
        },
        grid=_grid,
        run_one=_run_one,
        parts=_parts,
        measure=_measure,
        explain=_explain,
        plot=_plot,
        description=__doc__ or "",
    )
)
