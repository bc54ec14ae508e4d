"""C7 ``momentum``: smoke path the statistics probes against closed forms, verdict rules on synthetic rows."""

from __future__ import annotations

import json

import pytest
import torch

from normlab.lab.experiments import get_experiment, run_experiment
from normlab.lab.experiments.framework import STATUSES
from normlab.lab.experiments.momentum import (
    MOMENTUM,
    MomentumConfig,
    dist_early,
    jitter_late,
    population_stats,
    running_stats,
    stat_distance,
)
from normlab.lab.models import build_model

PNG = b"\x89PNG\r\n\x1a\n"


def test_momentum_smoke_end_to_end(tmp_path):
    result = run_experiment("momentum", scale="smoke", root=tmp_path, progress=False)
    cfg = result.config
    assert result.verdict.status in STATUSES and "\n" not in result.verdict.summary
    assert len(result.rows) == len(cfg.momenta) * cfg.seeds
    for path in result.figures:
        assert path.read_bytes()[:8] == PNG
    assert json.loads(result.verdict_path.read_text())["claim"] == "C7"
    for r in result.rows:
        assert r["probe_step"][0] == 1 and r["probe_step"][-1] == cfg.steps
        assert len(r["dist"]) == len(r["jitter"]) == len(r["probe_step"]) and r["jitter"][0] is None
        assert all(d >= 0 for d in r["dist"]) and r["dist_end"] == r["dist"][-1]
    # the running statistics never enter a training-mode forward: one seed, one weight trajectory for every momentum
    for seed in range(cfg.seeds):
        runs = [r for r in result.rows if r["seed"] == seed]
        assert all(r["step_loss"] == runs[0]["step_loss"] for r in runs)
        assert all(r["precise_test_acc"] == runs[0]["precise_test_acc"] for r in runs)
    # the slowest EMA starts far from the population statistics and ends farther than the fastest
    by_m = {r[MOMENTUM]: r for r in result.rows if r["seed"] == 0}
    assert by_m[min(by_m)]["dist_end"] > by_m[max(by_m)]["dist_end"]


def _model():
    torch.manual_seed(0)
    return build_model("cnn", in_shape=(1, 8, 8), num_classes=10, norm_layer="batchnorm", channels=(4, 8))


def test_population_stats_are_the_first_layer_input_moments_and_leave_no_trace():
    model = _model().train()
    x = torch.randn(64, 1, 8, 8) * 3 + 1
    before = {k: v.clone() for k, v in model.state_dict().items()}
    pop = population_stats(model, x)
    assert model.training and all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        h = model.blocks[0].linear(x)  # (64, 4, 8, 8): the first BN's input
    n = h.numel() // h.shape[1]
    mean = h.mean((0, 2, 3))
    var = h.var((0, 2, 3), unbiased=False) * n / (n - 1)
    torch.testing.assert_close(pop[0][0], mean, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(pop[0][1], var, rtol=1e-4, atol=1e-5)
    assert len(pop) == 2


def test_stat_distance_closed_form():
    pop = [(torch.zeros(3), torch.full((3,), 4.0))]
    assert stat_distance(pop, pop, pop) == (0.0, 0.0, 0.0)
    # mean off by one std in every channel, variance exact: D_mean = 1
    a = [(torch.full((3,), 2.0), torch.full((3,), 4.0))]
    d, dm, dv = stat_distance(a, pop, pop, eps=0.0)
    assert dm == pytest.approx(1.0) and dv == 0.0 and d == pytest.approx(1.0)
    # variance off by e^2 in one channel of three: D_var = sqrt(4 / 3)
    b = [(torch.zeros(3), torch.tensor([4.0, 4.0, 4.0 * torch.e**2]))]
    d, dm, dv = stat_distance(b, pop, pop, eps=0.0)
    assert dm == 0.0 and dv == pytest.approx((4 / 3) ** 0.5, rel=1e-6)


def test_running_stats_are_copies():
    model = _model()
    stats = running_stats(model)
    stats[0][0].add_(1.0)
    assert torch.equal(model.blocks[0].norm.running_mean, torch.zeros(4))


# --------------------------------------------------------------------------- verdict rules on synthetic rows

CFG = MomentumConfig(momenta=(0.01, 0.1, 0.5), reference_momentum=0.1, steps=20, probe_every=5, early_steps=10)
STEPS = [1, 5, 10, 15, 20]


def _rows(*, jitter_slow=(0.01, 0.011, 0.012), precise_gap=0.0):
    shapes = {  # momentum -> (distance curve, jitter level)
        0.01: ([2.0, 1.8, 1.6, 1.5, 1.4], None),
        0.1: ([1.5, 0.8, 0.4, 0.3, 0.25], 0.05),
        0.5: ([0.5, 0.3, 0.3, 0.3, 0.3], 0.1),
    }
    rows = []
    for m, (dist, jit) in shapes.items():
        for seed in range(3):
            level = jitter_slow[seed] if jit is None else jit + 0.002 * seed
            curve = [d + 0.01 * seed for d in dist]
            rows.append(
                {
                    MOMENTUM: m,
                    "seed": seed,
                    "probe_step": STEPS,
                    "dist": curve,
                    "jitter": [None] + [level] * 4,
                    "dist_end": curve[-1],
                    "ema_test_acc": 0.9 - (0.2 if m == 0.01 else 0.0) + 0.005 * seed,
                    "precise_test_acc": 0.9 + precise_gap + 0.005 * seed,
                    "train_mode_test_acc": 0.88,
                }
            )
    return rows


def test_momentum_verdict_holds():
    rows = _rows()
    v = get_experiment("momentum").call_analyse(rows, CFG)
    assert v.status == "holds", v.summary
    assert dist_early(rows[0], 10) == pytest.approx((2.0 + 1.8 + 1.6) / 3)
    assert jitter_late(rows[0]) == pytest.approx(0.01)


def test_momentum_verdict_does_not_hold_when_precise_is_worse():
    v = get_experiment("momentum").call_analyse(_rows(precise_gap=-0.25), CFG)
    assert v.status == "does not hold"
    assert v.numbers["precise never worse"]["status"] == "does not hold"


def test_momentum_verdict_inconclusive_when_fluctuations_overlap():
    v = get_experiment("momentum").call_analyse(_rows(jitter_slow=(0.01, 0.2, 0.1)), CFG)
    assert v.status == "inconclusive" and v.numbers["fluctuates less"]["status"] == "inconclusive"
