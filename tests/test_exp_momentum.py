"""C7 ``momentum``: the smoke path, the EMA bank against a real BN layer, the probes against closed forms,
and every outcome of the verdict on synthetic runs whose truth is known."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from normlab.lab.config import TrainConfig
from normlab.lab.experiments import get_experiment, run_experiment
from normlab.lab.experiments.framework import judge_rows
from normlab.lab.experiments.momentum import (
    EmaBank,
    MomentumConfig,
    best_momentum,
    dist_early,
    jitter_late,
    population_stats,
    running_stats,
    stat_distance,
)
from normlab.lab.models import build_model
from normlab.lab.train import train

PNG = b"\x89PNG\r\n\x1a\n"


def test_momentum_smoke_end_to_end(tmp_path):
    result = run_experiment("momentum", scale="smoke", root=tmp_path, progress=False, device="cpu")
    cfg = result.config
    assert len(result.rows) == len(cfg.batch_sizes) * cfg.seeds
    for path in result.figures:
        assert path.read_bytes()[:8] == PNG
    assert [p.name for p in result.figures] == ["momentum.png", "parts.png"]
    v = json.loads(result.verdict_path.read_text())
    assert v["claim"] == "C7" and v["meaningful"] is False
    assert {p["name"] for p in v["parts"]} == {p.name for p in get_experiment("momentum").parts(cfg)}
    assert "best momentum for eval accuracy" in v["finding"]
    for r in result.rows:
        assert r["momenta"] == list(cfg.momenta) and r["probe_step"][0] == 1 and r["probe_step"][-1] == cfg.steps
        for dist, jitter in zip(r["dist"], r["jitter"]):
            assert len(dist) == len(jitter) == len(r["probe_step"]) and jitter[0] is None
            assert all(d >= 0 for d in dist)
        assert len(r["ema_test_acc"]) == len(r["ema_test_loss"]) == len(cfg.momenta)


def test_the_ema_bank_holds_what_a_bn_layer_with_that_momentum_holds():
    # one run with BN momentum 1 feeds the bank; a second run trains with momentum 0.1 itself
    base = dict(dataset="digits", n_train=256, model="cnn", model_kwargs={"channels": [4, 8]}, norm="batchnorm",
                optimizer="adam", lr=1e-3, batch_size=16, max_steps=12, epochs=12, device="cpu")  # fmt: skip
    bank: list[EmaBank] = []

    def feed(state):
        if state.event == "step":
            if not bank:
                bank.append(EmaBank(state.model, [0.1, 0.5]))
            bank[0].update(running_stats(state.model))

    one = train(TrainConfig(**base, norm_kwargs={"momentum": 1.0}), callback=feed)
    ref = train(TrainConfig(**base, norm_kwargs={"momentum": 0.1}))
    assert one.step_loss == ref.step_loss  # the running statistics never enter a training-mode forward
    for (m1, v1), (m2, v2) in zip(bank[0].stats(0.1), running_stats(ref.model)):
        torch.testing.assert_close(m1, m2, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(v1, v2, rtol=1e-5, atol=1e-6)
    loaded = bank[0].load_into(one.model, 0.1)
    assert all(torch.equal(a, b) for (a, _), (b, _) in zip(running_stats(loaded), bank[0].stats(0.1)))
    assert not torch.equal(running_stats(one.model)[0][0], running_stats(loaded)[0][0])  # a copy was loaded


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
    a = [(torch.full((3,), 2.0), torch.full((3,), 4.0))]  # mean off by one std in every channel
    d, dm, dv = stat_distance(a, pop, pop, eps=0.0)
    assert dm == pytest.approx(1.0) and dv == 0.0 and d == pytest.approx(1.0)
    b = [(torch.zeros(3), torch.tensor([4.0, 4.0, 4.0 * torch.e**2]))]  # variance off by e^2 in one channel of 3
    d, dm, dv = stat_distance(b, pop, pop, eps=0.0)
    assert dm == 0.0 and dv == pytest.approx((4 / 3) ** 0.5, rel=1e-6)


def test_running_stats_are_copies():
    model = _model()
    stats = running_stats(model)
    stats[0][0].add_(1.0)
    assert torch.equal(model.blocks[0].norm.running_mean, torch.zeros(4))


def test_curve_summaries_and_best_momentum():
    steps = [1, 5, 10, 15, 20]
    assert dist_early(steps, [2.0, 1.8, 1.6, 1.5, 1.4], 10) == pytest.approx((2.0 + 1.8 + 1.6) / 3)
    assert jitter_late(steps, [None, 0.5, 0.02, 0.01, 0.03]) == pytest.approx(0.02)  # steps 15, 20 only
    assert best_momentum([0.01, 0.1, 0.5], [0.90, 0.95, 0.95], [0.3, 0.25, 0.2]) == 0.5  # tie: the lower loss
    assert best_momentum([0.01, 0.1, 0.5], [0.96, 0.95, 0.95], [0.3, 0.25, 0.2]) == 0.01


# --------------------------------------------------------------------------- the verdict on synthetic runs

CFG = MomentumConfig(seeds=6, max_seeds=6, momenta=(0.01, 0.1, 0.5), batch_sizes=(4, 64), reference_batch=64,
                     steps=20, probe_every=5, early_steps=10)  # fmt: skip
STEPS = [1, 5, 10, 15, 20]


def _raw(best_small, best_big, *, precise_gap=0.0, slow_jitter=0.01, seeds=6):
    """Stored runs as run_one returns them; ``best_*``: per seed, the index of the best momentum at each batch."""
    rng = np.random.default_rng(0)
    rows = []
    for seed in range(seeds):
        for bs, best in ((4, best_small[seed]), (64, best_big[seed])):
            acc = [0.9 - 0.05 * abs(i - best) for i in range(3)]
            dist = [[2.0, 1.9, 1.8, 1.7, 1.6], [1.5, 0.6, 0.3, 0.2, 0.2], [0.4, 0.3, 0.3, 0.3, 0.3]]
            dist = [[d * (1 + 0.05 * rng.standard_normal()) for d in curve] for curve in dist]
            jit = [slow_jitter * (1 + 0.1 * seed), 0.05, 0.2]
            rows.append({
                "seed": seed, "batch_size": bs, "momenta": [0.01, 0.1, 0.5], "probe_step": STEPS, "dist": dist,
                "jitter": [[None] + [j] * 4 for j in jit], "ema_test_acc": acc, "ema_test_loss": [1 - a for a in acc],
                "precise_test_acc": 0.9 + precise_gap + 0.004 * rng.standard_normal(),
                "train_mode_test_acc": 0.7,
            })  # fmt: skip
    return rows


def _verdict(rows):
    return judge_rows(get_experiment("momentum"), CFG, rows, "quick")


def test_measure_gives_per_momentum_and_summary_rows_per_run():
    rows = _raw([0] * 6, [2] * 6)
    per = get_experiment("momentum").measure(rows, CFG)
    assert len(per) == len(rows) * 4  # three momenta + one summary
    slow = next(r for r in per if r["kind"] == "ema" and r["momentum"] == 0.01 and r["seed"] == 0 and
                r["batch_size"] == 64)  # fmt: skip
    assert slow["jitter_late"] == pytest.approx(0.01) and slow["dist_end"] == rows[1]["dist"][0][-1]
    assert slow["precise_minus_ema"] == pytest.approx(rows[1]["precise_test_acc"] - rows[1]["ema_test_acc"][0])
    summary = next(r for r in per if r["kind"] == "best" and r["seed"] == 0 and r["batch_size"] == 4)
    assert summary["best_momentum"] == 0.01 and summary["best_momentum_by_distance"] == 0.1  # dist ends 1.6, 0.2, 0.3


def test_holds_when_every_part_goes_the_claimed_way():
    v = _verdict(_raw([0] * 6, [2, 2, 1, 2, 2, 1], precise_gap=0.0))
    assert v.status == "holds", v.summary


def test_does_not_hold_when_the_best_momentum_grows_as_the_batch_shrinks():
    v = _verdict(_raw([2] * 6, [0, 0, 1, 0, 0, 1]))
    parts = {r.part.name: r.status for r in v.judgement.parts}
    assert v.status == "does not hold" and parts["best-momentum-shifts"] == "does not hold", v.summary


def test_does_not_hold_when_precise_statistics_are_worse():
    v = _verdict(_raw([0] * 6, [2, 2, 1, 2, 2, 1], precise_gap=-0.08))
    parts = {r.part.name: r.status for r in v.judgement.parts}
    assert v.status == "does not hold" and parts["precise-not-worse"] == "does not hold", v.summary


def test_inconclusive_when_the_best_momentum_moves_both_ways():
    v = _verdict(_raw([0, 2, 0, 1, 0, 2], [2, 0, 1, 2, 1, 1]))
    parts = {r.part.name: r.status for r in v.judgement.parts}
    assert v.status == "inconclusive" and parts["best-momentum-shifts"] == "inconclusive", v.summary


def test_config_checks_the_reference_values():
    with pytest.raises(ValueError, match="reference_momentum"):
        dataclasses.replace(CFG, reference_momentum=0.2)
    with pytest.raises(ValueError, match="reference_batch"):
        dataclasses.replace(CFG, reference_batch=32)
