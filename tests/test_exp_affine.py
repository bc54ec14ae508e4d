"""C16 affine: the smoke path end to end, the arms really differ only by γ/β, the spread of the learned
parameters, and every outcome of the verdict on synthetic runs whose truth is known."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from normlab.lab.experiments import get_experiment, run_experiment
from normlab.lab.experiments.affine import NETWORKS, AffineConfig, affine_spread
from normlab.lab.experiments.framework import Run, judge_rows
from normlab.lab.models import build_model
from normlab.lab.train import train

PNG = b"\x89PNG\r\n\x1a\n"


def test_smoke_trains_stores_judges_and_draws(tmp_path):
    exp = get_experiment("C16")
    assert exp.name == "affine"
    cfg = exp.scales["smoke"]
    res = run_experiment("affine", scale="smoke", root=tmp_path, progress=False, device="cpu")
    assert len(res.rows) == 2 * len(NETWORKS) * cfg.seeds
    v = json.loads(res.verdict_path.read_text())
    assert v["claim"] == "C16" and {p["name"] for p in v["parts"]} == {p.name for p in exp.parts(cfg)}
    assert [p["name"] for p in v["parts"] if p["decides"]] == [
        "cnn-accuracy", "cnn-speed", "transformer-accuracy", "transformer-speed"]  # fmt: skip
    assert "with γ/β vs" in v["finding"]
    assert [p.name for p in res.figures] == ["affine.png", "parts.png"]
    assert all(p.read_bytes().startswith(PNG) for p in res.figures)
    for r in res.rows:
        assert (r["gamma_dev"] is None) == (not r["affine"])  # no affine parameters: nothing learned
        assert 0 < r["capped_mean_loss"] <= r["chance_loss"] + 1e-12


@pytest.mark.parametrize("network", NETWORKS)
def test_the_arms_differ_only_by_the_affine_parameters(network):
    cfg = get_experiment("affine").scales["smoke"]
    params = {p["affine"]: p for p in get_experiment("affine").grid(cfg) if p["network"] == network}
    models = {}
    for affine, p in params.items():  # lr 0: one step leaves the initial draw as it was
        tc = Run("affine", "smoke", p, seed=3, device="cpu").train_config(lr=0.0, max_steps=1)
        models[affine] = train(tc).model
    with_, without = (dict(models[a].named_parameters()) for a in (True, False))
    extra = sorted(set(with_) - set(without))
    assert extra and set(without) <= set(with_) and all(k.endswith(("weight", "bias")) for k in extra)
    assert all("norm" in k for k in extra)  # only the norm layers' γ and β
    assert all(torch.equal(with_[k], without[k]) for k in without)  # same seed, same draw of every other weight


def test_affine_spread_against_hand_set_parameters():
    torch.manual_seed(0)
    model = build_model("mlp", in_shape=(4,), num_classes=3, norm_layer="batchnorm", width=5, depth=2)
    norms = [m for m in model.modules() if hasattr(m, "running_mean")]
    with torch.no_grad():
        norms[0].weight.fill_(1.5)  # |γ − 1| = 0.5 on 5 channels
        norms[1].weight.fill_(0.5)  # 0.5 on 5 more
        norms[0].bias.fill_(-0.2)
        norms[1].bias.fill_(0.4)
    out = affine_spread(model)
    assert out["gamma_dev"] == pytest.approx(0.5) and out["beta_abs"] == pytest.approx(0.3)
    plain = build_model("mlp", in_shape=(4,), num_classes=3, norm_layer="none", width=5, depth=2)
    assert affine_spread(plain) == {"gamma_dev": None, "beta_abs": None}


# --------------------------------------------------------------------------- the verdict on synthetic runs

CFG = AffineConfig(seeds=6, max_seeds=6)


def _raw(acc_cost: dict, loss_ratio: dict, noise: float = 0.003, seeds: int = 6) -> list[dict]:
    """Runs as stored: removing γ/β costs ``acc_cost[network]`` accuracy and multiplies its loss by ``loss_ratio``."""
    rng = np.random.default_rng(5)
    rows = []
    for seed in range(seeds):
        for network in NETWORKS:
            base = 0.85 + 0.01 * rng.standard_normal()
            for affine in (True, False):
                acc = base - (0.0 if affine else acc_cost.get(network, 0.0)) + noise * rng.standard_normal()
                loss = 0.4 * (1.0 if affine else loss_ratio.get(network, 1.0)) * (1 + 0.01 * rng.standard_normal())
                rows.append({"seed": seed, "network": network, "affine": affine, "final_test_acc": acc,
                             "capped_mean_loss": loss})  # fmt: skip
    return rows


def _verdict(rows):
    return judge_rows(get_experiment("affine"), CFG, rows, "quick")


def _status(v, name):
    return next(r.status for r in v.judgement.parts if r.part.name == name)


def test_holds_when_removing_the_affine_changes_nothing_that_matters():
    v = _verdict(_raw({}, {}))
    assert v.status == "holds", v.summary


def test_does_not_hold_where_the_affine_matters_and_says_where():
    v = _verdict(_raw({"cnn": 0.06}, {"transformer": 1.4}))
    assert v.status == "does not hold", v.summary
    assert _status(v, "cnn-accuracy") == "does not hold" and _status(v, "transformer-speed") == "does not hold"
    assert "cnn-accuracy" in v.finding and "transformer-speed" in v.finding


def test_a_broken_reported_network_never_decides():
    v = _verdict(_raw({"cnn-before-linear": 0.1}, {}))
    assert v.status == "holds" and _status(v, "before-linear-accuracy") == "does not hold", v.summary


def test_inconclusive_when_the_seeds_cannot_put_the_interval_inside_the_margin():
    v = _verdict(_raw({"transformer": 0.015}, {}, noise=0.02))
    assert v.status == "inconclusive" and _status(v, "transformer-accuracy") == "inconclusive", v.summary
