"""C3 regularisation: the smoke path end to end, the companion probe, the per-seed measures, and every outcome
of the verdict on synthetic runs whose truth is known."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from normlab.lab.experiments import get_experiment, run_experiment
from normlab.lab.experiments.framework import judge_rows
from normlab.lab.experiments.regularisation import CONDITIONS, RegularisationConfig, companion_flip_rate
from normlab.lab.models import build_model

PNG = b"\x89PNG\r\n\x1a\n"


def test_smoke_trains_stores_judges_and_draws(tmp_path):
    exp = get_experiment("C3")
    assert exp.name == "regularisation"
    cfg = exp.scales["smoke"]
    res = run_experiment("regularisation", scale="smoke", root=tmp_path, progress=False, device="cpu")
    assert len(res.rows) == len(list(exp.grid(cfg))) * cfg.seeds
    v = json.loads(res.verdict_path.read_text())
    assert v["claim"] == "C3" and {p["name"] for p in v["parts"]} == {p.name for p in exp.parts(cfg)}
    assert "mean gap" in v["finding"]
    assert [p.name for p in res.figures] == ["regularisation.png", "parts.png"]
    assert all(p.read_bytes().startswith(PNG) for p in res.figures)
    for r in res.rows:
        # the gap is train accuracy (eval mode, whole reduced training set) minus test accuracy
        assert r["gap"] == pytest.approx(r["final_train_eval_acc"] - r["final_test_acc"])
        assert r["lr"] == pytest.approx(cfg.lr * r["batch_size"] / cfg.lr_batch)  # linear scaling rule
        assert (r["model_kwargs.dropout"] > 0) == ("dropout" in r["condition"])
        has_bn = r["norm"] == "batchnorm"
        assert ("recal_gain" in r) == has_bn and ("companion_flip" in r) == has_bn
        if has_bn:
            assert r["recal_gain"] == pytest.approx(r["recal_test_acc"] - r["final_test_acc"])
            assert 0.0 <= r["companion_flip"] <= 1.0


def test_companion_flip_rate_is_zero_without_bn_and_leaves_the_model_untouched():
    x, pool = torch.randn(40, 1, 8, 8), torch.randn(100, 1, 8, 8)
    torch.manual_seed(0)
    plain = build_model("mlp", in_shape=(1, 8, 8), num_classes=10, norm_layer="none", width=16, depth=2)
    assert companion_flip_rate(plain, x, pool, 8, 4, seed=0) == 0.0  # no BN: the companions cannot matter
    torch.manual_seed(0)
    bn = build_model("mlp", in_shape=(1, 8, 8), num_classes=10, norm_layer="batchnorm", width=16, depth=2).eval()
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    small = companion_flip_rate(bn, x, pool, 4, 4, seed=1)
    assert not bn.training and all(torch.equal(before[k], v) for k, v in bn.state_dict().items())
    assert small == companion_flip_rate(bn, x, pool, 4, 4, seed=1)  # seeded
    assert 0.0 < small <= 1.0  # three companions of a random net's inputs move its predictions
    assert companion_flip_rate(bn, x, pool, 64, 4, seed=1) < small  # more companions, steadier statistics


# --------------------------------------------------------------------------- the verdict on synthetic runs

CFG = RegularisationConfig(seeds=6, max_seeds=6, batch_sizes=(16, 256))


def _raw(gap: dict, recal: dict, seeds: int = 6) -> list[dict]:
    """Runs as run_one stores them; ``gap[(condition, batch)]`` and ``recal[(condition, batch)]`` are mean values."""
    rng = np.random.default_rng(1)
    rows = []
    for seed in range(seeds):
        for bs in (16, 256):
            for c, (norm, _, _) in CONDITIONS.items():
                g = gap[(c, bs)] + 0.005 * rng.standard_normal()
                r = {"seed": seed, "batch_size": bs, "condition": c, "norm": norm, "gap": g,
                     "final_test_acc": 0.7 - g / 2, "final_train_eval_acc": 0.7 + g / 2}  # fmt: skip
                if norm == "batchnorm":
                    r["recal_gain"] = recal.get((c, bs), 0.0) + 0.005 * rng.standard_normal()
                    r["companion_flip"] = 0.2 if bs == 16 else 0.05
                rows.append(r)
    return rows


GOOD_GAP = {(c, bs): 0.4 for c in CONDITIONS for bs in (16, 256)} | {
    ("batchnorm", 16): 0.3, ("dropout", 16): 0.25, ("dropout", 256): 0.25, ("batchnorm+dropout", 16): 0.2,
}  # fmt: skip
SHIFT = {("batchnorm+dropout-before-bn", 16): 0.1, ("batchnorm+dropout-before-bn", 256): 0.08}


def _verdict(rows):
    return judge_rows(get_experiment("regularisation"), CFG, rows, "quick")


def _status(v, name):
    return next(r.status for r in v.judgement.parts if r.part.name == name)


def test_measure_derives_narrowings_and_pooled_shifts_per_seed():
    rows = _raw(GOOD_GAP, SHIFT)
    per = get_experiment("regularisation").measure(rows, CFG)
    by = {(r["seed"], r["batch_size"], r["condition"]): r for r in rows}
    one = next(r for r in per if r["kind"] == "per-batch" and r["seed"] == 2 and r["batch_size"] == 16)
    assert one["narrowing_bn"] == pytest.approx(by[2, 16, "none"]["gap"] - by[2, 16, "batchnorm"]["gap"])
    shift = [by[2, b, "batchnorm+dropout-before-bn"]["recal_gain"] - by[2, b, "batchnorm"]["recal_gain"]
             for b in (16, 256)]  # fmt: skip
    pooled = next(r for r in per if r["kind"] == "pooled" and r["seed"] == 2)
    assert pooled["variance_shift"] == pytest.approx(np.mean(shift))


def test_holds_when_bn_narrows_the_gap_less_at_large_batch_and_dropout_shifts_the_variance():
    v = _verdict(_raw(GOOD_GAP, SHIFT))
    assert v.status == "holds", v.summary
    assert _status(v, "dropout-effect-steady") == "holds" and _status(v, "bn-adds-to-dropout") == "holds"


def test_does_not_hold_when_bn_does_not_narrow_the_gap():
    v = _verdict(_raw(GOOD_GAP | {("batchnorm", 16): 0.4}, SHIFT))
    assert v.status == "does not hold" and _status(v, "bn-narrows-gap") == "does not hold", v.summary


def test_does_not_hold_without_a_variance_shift():
    v = _verdict(_raw(GOOD_GAP, {}))
    assert v.status == "does not hold" and _status(v, "variance-shift") == "does not hold", v.summary


def test_inconclusive_when_the_fading_is_lost_in_the_noise():
    rows = _raw(GOOD_GAP | {("batchnorm", 256): 0.36}, SHIFT)
    rng = np.random.default_rng(7)
    for r in rows:
        if r["condition"] == "batchnorm" and r["batch_size"] == 256:
            r["gap"] += 0.08 * rng.standard_normal()
    v = _verdict(rows)
    assert v.status == "inconclusive" and _status(v, "bn-effect-fades") == "inconclusive", v.summary


def test_config_needs_every_condition():
    with pytest.raises(ValueError, match="every condition"):
        RegularisationConfig(conditions=("none", "batchnorm"))
