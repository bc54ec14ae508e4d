"""C4 smoothness: the smoke path end to end, probes leave training untouched, the per-seed summary against numpy,
the parts reaching each outcome on synthetic rows."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from normlab.lab.experiments import framework, get_experiment, run_experiment
from normlab.lab.experiments.smoothness import MISSING, SmoothnessConfig, summarise_run

PNG = b"\x89PNG\r\n\x1a\n"


def test_smoke_path_end_to_end(tmp_path):
    exp = get_experiment("C4")
    assert exp.name == "smoothness"
    res = run_experiment("smoothness", scale="smoke", root=tmp_path, progress=False, device="cpu")
    cfg = exp.scales["smoke"]
    assert len(res.rows) == len(cfg.depths) * len(cfg.norms) * cfg.seeds == len(res.ran)
    for r in res.rows:  # every probe point was measured, with finite numbers
        assert r["probe_step"] == [1, cfg.steps]
        assert len(r["beta"]) == 2 and len(r["beta"][0]) == len(cfg.etas)
        assert all(b > 0 for b in r["beta_eff"]) and all(abs(x) > 0 for x in r["lambda_max"])
        assert r["beta_eff"][0] == pytest.approx(max(r["beta"][0]))
    saved = json.loads((tmp_path / "smoothness" / "verdict.json").read_text())
    assert saved["status"] == res.verdict.status and saved["numbers"]["hessian_mode"] == "train"
    assert [p["name"] for p in saved["parts"] if p["decides"]] == ["beta-deep", "lambda-deep"]
    assert all(p["scale"] == "log10 ratio" for p in saved["parts"])
    assert not [k for r in res.rows for k in r if k.startswith(("data_kwargs", "data_dir", "threads"))]  # not in ids
    assert res.figures and all(p.read_bytes()[:8] == PNG for p in res.figures)
    again = run_experiment("smoothness", scale="smoke", root=tmp_path, progress=False, device="cpu")
    assert again.ran == [] and len(again.skipped) == len(res.rows)
    assert again.verdict.summary == res.verdict.summary


def test_probing_inside_the_training_callback_changes_nothing():
    """Probes in the callback leave the trajectory exactly as without them (same losses, same weights)."""
    from normlab.lab.config import TrainConfig
    from normlab.lab.probes import gradient_landscape, hessian_eigenvalues
    from normlab.lab.train import load_data, train

    cfg = TrainConfig(dataset="digits", model="mlp", model_kwargs={"width": 8, "depth": 2}, norm="batchnorm",
                      lr=0.05, epochs=1, max_steps=6, threads=1, device="cpu")  # fmt: skip
    ds = load_data(cfg)
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


def test_summarise_run_takes_geometric_means_of_finite_values_and_the_eigenvalue_magnitude():
    beta = [10.0, 1000.0, float("nan"), 0.0]
    lam = [1.0, -3.0, 2.5]
    s = summarise_run({"beta_eff": beta, "lambda_max": lam, "loss_range": [0.1, 0.4]})
    assert s["beta_mean"] == pytest.approx(np.exp(np.mean(np.log([10.0, 1000.0]))), rel=1e-12)
    assert s["dropped_beta_mean"] == 2
    # the top eigenvalue by magnitude may be negative: its magnitude is the curvature that matters
    assert s["lambda_mean"] == pytest.approx(np.exp(np.mean(np.log(np.abs(lam)))), rel=1e-12)
    assert s["loss_range_mean"] == pytest.approx(0.2, rel=1e-12)
    assert s["beta_first"] == 10.0 and s["lambda_first"] == 1.0
    empty = summarise_run({"beta_eff": [float("inf")], "lambda_max": [], "loss_range": [float("nan")]})
    assert empty["beta_mean"] is None and empty["lambda_mean"] is None and empty["beta_first"] is None


# --------------------------------------------------------------------------- the parts on synthetic rows

EXP = get_experiment("smoothness")
CFG = SmoothnessConfig()


def _rows(beta, lam, seeds=12, noise=0.03):
    """Stored-row shaped runs; beta/lam: {(depth, norm): typical value}, drawn log-normally per seed and probe."""
    rng = np.random.default_rng(1)
    rows = []
    for s in range(seeds):
        for (d, n), b in beta.items():
            jitter = lambda v: list(v * 10 ** (noise * rng.standard_normal(6)))  # noqa: E731
            rows.append({"depth": d, "norm": n, "seed": s, "probe_step": [1, 10, 30, 100, 200, 400],
                         "beta_eff": jitter(b), "lambda_max": jitter(lam[(d, n)]),
                         "loss_range": jitter(0.1), "diverged": False})  # fmt: skip
    return rows


def test_parts_hold_when_the_deep_net_is_smoother_with_bn_even_if_the_shallow_one_is_not():
    beta = {(2, "batchnorm"): 10.0, (2, "none"): 5.0, (10, "batchnorm"): 20.0, (10, "none"): 30.0}
    lam = {(2, "batchnorm"): 8.0, (2, "none"): 4.0, (10, "batchnorm"): 10.0, (10, "none"): 20.0}
    v = framework.judge_rows(EXP, CFG, _rows(beta, lam), "quick")
    assert v.status == "holds", v.summary
    by = {r.part.name: r for r in v.judgement.parts}
    assert by["beta-shallow"].status == "does not hold" and not by["beta-shallow"].part.decides
    assert 10 ** by["beta-deep"].effect == pytest.approx(20 / 30, rel=0.05)
    assert "deep net (10 layers)" in v.finding


def test_parts_do_not_hold_when_bn_is_rougher_in_the_deep_net():
    beta = {(2, "batchnorm"): 10.0, (2, "none"): 10.0, (10, "batchnorm"): 20.0, (10, "none"): 30.0}
    lam = {(2, "batchnorm"): 8.0, (2, "none"): 8.0, (10, "batchnorm"): 30.0, (10, "none"): 15.0}
    v = framework.judge_rows(EXP, CFG, _rows(beta, lam), "quick")
    assert v.status == "does not hold"
    assert {r.part.name: r.status for r in v.judgement.parts}["lambda-deep"] == "does not hold"


def test_parts_are_inconclusive_when_seeds_overlap():
    beta = {(2, "batchnorm"): 10.0, (2, "none"): 10.0, (10, "batchnorm"): 25.0, (10, "none"): 30.0}
    lam = {(2, "batchnorm"): 8.0, (2, "none"): 8.0, (10, "batchnorm"): 12.0, (10, "none"): 15.0}
    v = framework.judge_rows(EXP, CFG, _rows(beta, lam, seeds=3, noise=0.3), "quick")
    assert v.status == "inconclusive"


def test_a_run_without_a_finite_probe_counts_as_missing_not_dropped():
    beta = {(2, "batchnorm"): 10.0, (2, "none"): 5.0, (10, "batchnorm"): 20.0, (10, "none"): 30.0}
    lam = {(2, "batchnorm"): 8.0, (2, "none"): 4.0, (10, "batchnorm"): 10.0, (10, "none"): 20.0}
    rows = _rows(beta, lam, seeds=3)
    bad = next(r for r in rows if r["depth"] == 10 and r["norm"] == "batchnorm" and r["seed"] == 0)
    bad["beta_eff"] = [float("nan")] * 6
    per = {(r["depth"], r["norm"], r["seed"]): r for r in EXP.measure(rows, CFG)}
    assert per[(10, "batchnorm", 0)]["beta_mean"] is None
    a = [MISSING] + [per[(10, "batchnorm", s)]["beta_mean"] for s in (1, 2)]
    b = [per[(10, "none", s)]["beta_mean"] for s in range(3)]
    v = framework.judge_rows(EXP, CFG, rows, "quick")
    got = {r.part.name: r for r in v.judgement.parts}["beta-deep"]
    assert got.n_a == 3 and got.effect == pytest.approx(np.mean(np.log10(a) - np.log10(b)), rel=1e-12)
