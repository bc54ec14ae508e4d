"""C14 saturation: the smoke path end to end, the per-run measures against numpy, the verdict on synthetic rows."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from normlab.lab.experiments import get_experiment, run_experiment
from normlab.lab.experiments.framework import judge_rows
from normlab.lab.experiments.saturation import (
    SPREAD_DIVERGED,
    SaturationConfig,
    grad_drift,
    grad_spread,
    measure,
    saturated_mean,
)

PNG = b"\x89PNG\r\n\x1a\n"


def test_smoke_trains_probes_stores_judges_and_plots(tmp_path):
    exp = get_experiment("saturation")
    assert exp.claim == "C14" and get_experiment("C14") is exp
    cfg = exp.scales["smoke"]
    res = run_experiment("saturation", scale="smoke", root=tmp_path, progress=False, device="cpu")
    assert len(res.rows) == len(cfg.activations) * len(cfg.norms) * cfg.max_seeds
    for r in res.rows:
        # step 1 and the end of every epoch
        assert r["probe_steps"][0] == 1 and len(r["probe_steps"]) == cfg.epochs + 1
        assert len(r["saturated"][0]) == cfg.depth  # one entry per activation layer
        assert len(r["grad_norm"][0]) == cfg.depth + 1  # hidden Linear layers + classifier
        assert all(0.0 <= f <= 1.0 for per in r["saturated"] for f in per)
        assert all(g >= 0 for per in r["grad_norm"] for g in per)
    stored = json.loads(res.verdict_path.read_text())
    assert stored["claim"] == "C14" and stored["status"] == res.verdict.status and stored["meaningful"] is False
    names = {p["name"] for p in stored["parts"]}
    assert names == {f"{a}-{k}" for a in cfg.activations for k in ("saturation", "grad-spread", "accuracy")}
    assert "Pre-registration" not in stored["preregistration"] and "sigmoid-saturation" in stored["preregistration"]
    assert {p.name for p in res.figures} == {"saturation.png", "parts.png"}
    assert all(p.read_bytes()[:8] == PNG for p in res.figures)


def test_per_run_summaries_match_numpy():
    rng = np.random.default_rng(0)
    sat = rng.uniform(0, 0.3, size=(5, 4))  # (checkpoints, activation layers)
    g = 10.0 ** rng.uniform(-6, 1, size=(5, 6))  # (checkpoints, Linear layers)
    row = {"saturated": sat.tolist(), "grad_norm": g.tolist()}
    logs = np.log10(g)
    assert saturated_mean(row) == pytest.approx(sat.mean(), rel=1e-12)
    assert grad_spread(row) == pytest.approx((logs.max(1) - logs.min(1)).mean(), rel=1e-12)
    assert grad_drift(row) == pytest.approx(logs.std(0, ddof=1).mean(), rel=1e-12)
    # a diverged checkpoint (non-finite norms) is skipped; a run with none finite has no spread
    row["grad_norm"].append([float("nan")] + [1.0] * 5)
    assert grad_spread(row) == pytest.approx((logs.max(1) - logs.min(1)).mean(), rel=1e-12)
    assert math.isnan(grad_spread({"grad_norm": [[float("inf"), 1.0]]}))


# --------------------------------------------------------------------------- the verdict on synthetic rows

CFG = SaturationConfig()


def _rows(table: dict[tuple[str, str], list[tuple[float, float]]], acc: float = 0.5) -> list[dict]:
    """(activation, norm) -> per seed (saturated fraction, decades of gradient spread), as stored rows."""
    rows = []
    for (act, norm), per_seed in table.items():
        for seed, (sat, decades) in enumerate(per_seed):
            finite = math.isfinite(decades)
            rows.append(
                {
                    "activation": act,
                    "norm": norm,
                    "seed": seed,
                    "final_test_acc": acc,
                    "diverged": not finite,
                    "probe_steps": [1, 10],
                    "saturated": [[sat, sat], [sat, sat]],
                    "grad_norm": [[1.0, 10.0**decades if finite else decades]] * 2,
                }
            )
    return rows


def _judge(rows):
    return judge_rows(get_experiment("saturation"), CFG, rows, "quick")


def _status(verdict, name):
    return next(r.status for r in verdict.judgement.parts if r.part.name == name)


HOLDS = {
    ("sigmoid", "batchnorm"): [(0.010, 0.30), (0.011, 0.31), (0.012, 0.30)],
    ("sigmoid", "none"): [(0.300, 4.00), (0.301, 4.01), (0.302, 4.00)],
    ("tanh", "batchnorm"): [(0.010, 0.30), (0.010, 0.31), (0.011, 0.30)],
    ("tanh", "none"): [(0.200, 1.50), (0.201, 1.51), (0.200, 1.50)],
}


def test_verdict_holds_when_bn_has_fewer_saturated_units_and_a_narrower_spread():
    v = _judge(_rows(HOLDS))
    assert v.status == "holds", v.summary
    assert v.judgement.seeds == 3 and all(r.status == "holds" for r in v.judgement.deciding)


def test_verdict_does_not_hold_when_nothing_saturates_although_gradients_vanish():
    table = dict(HOLDS)
    table[("sigmoid", "batchnorm")] = [(1e-6, 0.30), (0.0, 0.31), (2e-6, 0.30)]
    table[("sigmoid", "none")] = [(5e-6, 5.40), (1e-5, 5.41), (0.0, 5.40)]
    v = _judge(_rows(table))
    assert v.status == "does not hold", v.summary
    assert _status(v, "sigmoid-saturation") == "does not hold"  # no practical difference: inside ±0.01
    assert _status(v, "sigmoid-grad-spread") == "holds"
    assert "vanishes without saturation" in v.finding


def test_verdict_does_not_hold_when_bn_widens_the_spread():
    table = dict(HOLDS)
    table[("tanh", "batchnorm")] = [(0.010, 2.50), (0.010, 2.51), (0.011, 2.50)]
    v = _judge(_rows(table))
    assert v.status == "does not hold" and _status(v, "tanh-grad-spread") == "does not hold"


def test_verdict_inconclusive_when_the_saturation_gap_straddles_the_margin():
    table = dict(HOLDS)
    # none − BN per seed: 0.0, 0.03, -0.005 -> mean 0.008, the interval holds 0 and 0.01
    table[("tanh", "none")] = [(0.010, 1.50), (0.040, 1.51), (0.006, 1.50)]
    v = _judge(_rows(table))
    assert v.status == "inconclusive", v.summary
    assert _status(v, "tanh-saturation") == "inconclusive"


def test_a_diverged_run_counts_as_the_declared_spread_and_chance_accuracy():
    rows = _rows(HOLDS)
    rows[0]["grad_norm"] = [[float("nan"), 1.0]] * 2  # sigmoid, batchnorm, seed 0: no finite checkpoint
    rows[0]["diverged"] = True
    per = {(r["activation"], r["norm"], r["seed"]): r for r in measure(rows, CFG)}
    assert per[("sigmoid", "batchnorm", 0)]["grad_spread"] is None
    assert per[("sigmoid", "batchnorm", 0)]["test_acc"] is None
    v = _judge(rows)
    spread = next(r for r in v.judgement.parts if r.part.name == "sigmoid-grad-spread")
    acc = next(r for r in v.judgement.parts if r.part.name == "sigmoid-accuracy")
    # BN − none over seeds, with seed 0 of BN counted as SPREAD_DIVERGED decades and 0.1 accuracy
    assert spread.effect == pytest.approx(np.mean([SPREAD_DIVERGED - 4.0, 0.31 - 4.01, 0.30 - 4.0]))
    assert acc.effect == pytest.approx(np.mean([0.1 - 0.5, 0.0, 0.0]))
