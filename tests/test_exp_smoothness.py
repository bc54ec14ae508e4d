"""C4 smoothness: the smoke path end to end, the verdict rule on synthetic rows, probes leave training untouched."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from normlab.lab.experiments import get_experiment, run_experiment
from normlab.lab.experiments.smoothness import SmoothnessConfig, summarise_run

PNG = b"\x89PNG\r\n\x1a\n"


def test_smoke_path_end_to_end(tmp_path):
    exp = get_experiment("C4")
    assert exp.name == "smoothness"
    res = run_experiment("smoothness", scale="smoke", root=tmp_path, progress=False)
    cfg = exp.scales["smoke"]
    assert len(res.rows) == len(cfg.depths) * len(cfg.norms) * cfg.seeds == len(res.ran)
    assert res.verdict.status in ("holds", "does not hold", "inconclusive")
    assert "beta_eff" in res.verdict.summary and "lambda_max" in res.verdict.summary
    for r in res.rows:  # every probe point was measured, with finite numbers
        assert r["probe_step"] == [1, cfg.steps]
        assert len(r["beta"]) == 2 and len(r["beta"][0]) == len(cfg.etas)
        assert all(b > 0 for b in r["beta_eff"]) and all(abs(x) > 0 for x in r["lambda_max"])
        assert r["beta_eff"][0] == pytest.approx(max(r["beta"][0]))
    saved = json.loads((tmp_path / "smoothness" / "verdict.json").read_text())
    assert saved["status"] == res.verdict.status and saved["numbers"]["hessian_mode"] == "train"
    assert res.figures and all(p.read_bytes()[:8] == PNG for p in res.figures)
    again = run_experiment("smoothness", scale="smoke", root=tmp_path, progress=False)
    assert again.ran == [] and len(again.skipped) == len(res.rows)
    assert again.verdict.summary == res.verdict.summary


def test_probing_inside_the_training_callback_changes_nothing():
    """Probes in the callback leave the trajectory exactly as without them (same losses, same weights)."""
    from normlab.lab.config import TrainConfig
    from normlab.lab.probes import gradient_landscape, hessian_eigenvalues
    from normlab.lab.train import train

    cfg = TrainConfig(
        dataset="digits",
        model="mlp",
        model_kwargs={"width": 8, "depth": 2},
        norm="batchnorm",
        lr=0.05,
        epochs=1,
        max_steps=6,
        threads=1,
    )
    from normlab.lab.data import load_dataset

    ds = load_dataset("digits", seed=0)
    batch = (ds.x_train[:32], ds.y_train[:32])

    def probe(state):
        if state.event == "step" and state.step in (1, 4):
            gradient_landscape(state.model, F.cross_entropy, batch, mode="train", etas=[0.1, 1.0])
            hessian_eigenvalues(state.model, F.cross_entropy, batch, mode="train", max_iter=3)

    a = train(cfg, callback=probe)
    b = train(cfg)
    assert a.step_loss == b.step_loss
    for (n, p), (_, q) in zip(a.model.state_dict().items(), b.model.state_dict().items()):
        assert torch.equal(p, q), n


# --------------------------------------------------------------------------- the verdict rule


def _rows(beta, lam, depths=(2, 10), norms=("batchnorm", "none")):
    """beta/lam: {(depth, norm): [log10 value per seed]}"""
    rows = []
    for d in depths:
        for n in norms:
            for s, (b, l) in enumerate(zip(beta[(d, n)], lam[(d, n)])):
                rows.append(
                    {
                        "depth": d,
                        "norm": n,
                        "seed": s,
                        "log10_beta_eff": b,
                        "log10_lambda_max": l,
                        "log10_loss_range": -1.0,
                        "diverged": False,
                    }
                )
    return rows


CFG = SmoothnessConfig()
ANALYSE = get_experiment("smoothness").analyse


def test_verdict_holds_when_the_deep_net_is_smoother_with_bn_even_if_the_shallow_one_is_not():
    beta = {
        (2, "batchnorm"): [1.0, 1.1, 1.0],
        (2, "none"): [0.5, 0.5, 0.6],  # shallow: BN *rougher*
        (10, "batchnorm"): [1.0, 1.1, 1.05],
        (10, "none"): [1.5, 1.6, 1.55],
    }
    lam = {
        (2, "batchnorm"): [0.9, 1.0, 0.95],
        (2, "none"): [0.5, 0.4, 0.5],
        (10, "batchnorm"): [0.9, 1.0, 0.95],
        (10, "none"): [1.5, 1.4, 1.6],
    }
    v = ANALYSE(_rows(beta, lam), CFG)
    assert v.status == "holds"
    assert v.numbers["decided_by_depth"] == 10
    assert v.numbers["parts"]["depth 2 beta_eff"]["status"] == "does not hold"  # reported, not deciding
    assert "depth 10 (deep, decides)" in v.summary


def test_verdict_does_not_hold_when_bn_is_rougher_in_the_deep_net():
    beta = {k: [1.0, 1.05, 1.1] for k in [(2, "batchnorm"), (2, "none")]}
    beta.update({(10, "batchnorm"): [1.0, 1.1, 1.05], (10, "none"): [1.5, 1.6, 1.55]})
    lam = {k: [1.0, 1.05, 1.1] for k in [(2, "batchnorm"), (2, "none")]}
    lam.update({(10, "batchnorm"): [2.0, 2.1, 2.05], (10, "none"): [1.0, 1.1, 1.05]})  # lambda_max larger with BN
    assert ANALYSE(_rows(beta, lam), CFG).status == "does not hold"


def test_verdict_is_inconclusive_when_seeds_overlap():
    beta = {k: [1.0, 1.5, 1.2] for k in [(2, "batchnorm"), (2, "none"), (10, "batchnorm"), (10, "none")]}
    lam = {k: [0.0, 0.6, 0.3] for k in [(2, "batchnorm"), (2, "none"), (10, "batchnorm"), (10, "none")]}
    lam[(10, "none")] = [0.1, 0.7, 0.4]
    assert ANALYSE(_rows(beta, lam), CFG).status == "inconclusive"


def test_summarise_run_drops_non_finite_points_and_uses_geometric_means():
    s = summarise_run(
        {
            "beta_eff": [10.0, 1000.0, float("nan")],
            "lambda_max": [1.0, -3.0],
            "loss_range": [0.1],
            "grad_change": [[1.0, 10.0]],
        }
    )
    assert s["log10_beta_eff"] == pytest.approx(2.0) and s["dropped_beta_eff"] == 1
    # the top eigenvalue by magnitude may be negative: its magnitude is the curvature that matters
    assert s["log10_lambda_max"] == pytest.approx(0.5 * math.log10(3.0)) and s["dropped_lambda_max"] == 0
    assert s["log10_max_grad_change"] == pytest.approx(1.0)
