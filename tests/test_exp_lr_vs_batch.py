"""C12 lr-vs-batch: the smoke path end to end, the best-lr / slope rules, and the verdict on synthetic run tables."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from normlab.lab.config import ConfigError
from normlab.lab.experiments import get_experiment, run_experiment
from normlab.lab.experiments.framework import judge_rows
from normlab.lab.experiments.lr_vs_batch import CHANCE, LRvsBatchConfig, best_lr_table, slopes

PNG = b"\x89PNG\r\n\x1a\n"
LRS = [2.0**k for k in (-7, -5, -3, -1, 1, 3)]
SIZES = [32, 128, 512]


def test_smoke_trains_stores_judges_and_draws(tmp_path):
    exp = get_experiment("lr-vs-batch")
    assert exp.claim == "C12"
    res = run_experiment("C12", scale="smoke", root=tmp_path, progress=False, device="cpu")
    cfg = res.config
    assert len(res.rows) == len(res.ran) == len(list(exp.grid(cfg))) * cfg.max_seeds
    stored = json.loads(res.verdict_path.read_text())
    assert stored["claim"] == "C12" and stored["meaningful"] is False
    assert {p["name"] for p in stored["parts"] if p["decides"]} == {"lr-grows-faster", "advantage-grows"}
    assert {p.name for p in res.figures} == {"lr-vs-batch.png", "parts.png"}
    assert all(p.read_bytes()[:8] == PNG for p in res.figures)
    # SkipInit is the ResNet without norm whose branches start at alpha = 0; BN keeps alpha = 1
    skip = [r for r in res.rows if r["variant"] == "skipinit"]
    assert skip and all(r["norm"] == "none" and r["model_kwargs.residual_scale"] == 0.0 for r in skip)
    assert all("model_kwargs.residual_scale" not in r for r in res.rows if r["variant"] == "batchnorm")
    assert all("threads" not in r for r in res.rows)


# --------------------------------------------------------------------------- synthetic tables


def _rows(peaks, top_acc=None, noise: float = 0.0, rng_seed: int = 0) -> list[dict]:
    """Accuracy peaked at ``peaks[(variant, seed)][batch]`` (value ``top_acc``), 0.05 lower per octave away."""
    rng = np.random.default_rng(rng_seed)
    rows = []
    for (variant, seed), by_bs in peaks.items():
        for bs, peak in by_bs.items():
            best = (top_acc or {}).get((variant, bs), 0.95)
            for lr in LRS:
                acc = best - 0.05 * abs(math.log2(lr) - math.log2(peak)) + noise * rng.standard_normal()
                rows.append({"variant": variant, "seed": seed, "batch_size": bs, "lr": lr, "diverged": False,
                             "final_test_acc": float(acc), "steps": 10 * (1437 // bs)})  # fmt: skip
    return rows


def _growing(seeds):  # best lr x4 per x4 batch: slope 1
    return {s: dict(zip(SIZES, (2**-5, 2**-3, 2**-1))) for s in range(seeds)}


def _flat(seeds):  # best lr the same at every batch size: slope 0
    return {s: dict(zip(SIZES, (2**-3, 2**-3, 2**-3))) for s in range(seeds)}


def _table(bn, skip, **kw):
    peaks = {**{("batchnorm", s): p for s, p in bn.items()}, **{("skipinit", s): p for s, p in skip.items()}}
    return _rows(peaks, **kw)


def _verdict(rows):
    exp = get_experiment("lr-vs-batch")
    return judge_rows(exp, exp.config_for("quick"), rows, "quick")


def test_best_lr_is_the_argmax_and_the_slope_follows():
    table = best_lr_table(_table(_growing(1), _flat(1)), plateau=0.0)
    assert table[("batchnorm", 0, 32)]["lr"] == pytest.approx(2**-5)
    assert table[("batchnorm", 0, 512)]["acc"] == pytest.approx(0.95)
    sl = slopes(table)
    assert sl[("batchnorm", 0)] == pytest.approx(1.0) and sl[("skipinit", 0)] == pytest.approx(0.0)
    # least squares against numpy's fit
    xs, ys = np.log2(SIZES), np.log2([2**-5, 2**-2, 2**-1])
    t = {("v", 0, bs): {"lr": 2.0**y, "acc": 0.9, "top": 0.0} for bs, y in zip(SIZES, ys)}
    assert slopes(t)[("v", 0)] == pytest.approx(np.polyfit(xs, ys, 1)[0])


def test_the_plateau_averages_near_best_lrs_and_a_diverged_run_counts_at_chance():
    rows = [
        {"variant": "batchnorm", "seed": 0, "batch_size": 32, "lr": 2**-5, "final_test_acc": 0.900},
        {"variant": "batchnorm", "seed": 0, "batch_size": 32, "lr": 2**-3, "final_test_acc": 0.905},
        {"variant": "batchnorm", "seed": 0, "batch_size": 32, "lr": 2**-1, "final_test_acc": 0.5},
    ]
    assert best_lr_table(rows, 0.0)[("batchnorm", 0, 32)]["lr"] == pytest.approx(2**-3)
    assert best_lr_table(rows, 0.01)[("batchnorm", 0, 32)]["lr"] == pytest.approx(2**-4)  # geometric mean
    # a diverged run (whatever accuracy it recorded) counts at chance, never as the best
    rows.append({"variant": "batchnorm", "seed": 0, "batch_size": 32, "lr": 2.0, "diverged": True,
                 "final_test_acc": 0.99})  # fmt: skip
    assert best_lr_table(rows, 0.0)[("batchnorm", 0, 32)]["lr"] == pytest.approx(2**-3)
    only_failed = [{**rows[-1], "final_test_acc": math.nan}]
    assert best_lr_table(only_failed, 0.0)[("batchnorm", 0, 32)]["acc"] == CHANCE


def test_measure_gives_slopes_advantages_and_their_growth():
    acc = {("batchnorm", 512): 0.95, ("skipinit", 512): 0.80, ("batchnorm", 32): 0.95, ("skipinit", 32): 0.94}
    rows = _table(_growing(3), _flat(3), top_acc=acc)
    per_seed = get_experiment("C12").measure(rows, LRvsBatchConfig())
    growth = [r["growth"] for r in per_seed if r["what"] == "growth"]
    assert growth == pytest.approx([(0.95 - 0.80) - (0.95 - 0.94)] * 3)
    assert sorted(r["slope"] for r in per_seed if r["what"] == "slope") == pytest.approx([0.0] * 3 + [1.0] * 3)


def test_holds_when_bns_best_lr_grows_faster_and_its_advantage_grows():
    acc = {("skipinit", 512): 0.85}
    v = _verdict(_table(_growing(6), _flat(6), top_acc=acc, noise=0.002))
    assert v.status == "holds", v.summary
    parts = {r.part.name: r for r in v.judgement.parts}
    assert parts["lr-grows-faster"].effect == pytest.approx(1.0, abs=0.05)
    assert parts["matches-at-small"].status == "holds"
    assert "batchnorm [32: lr" in v.finding and "0 of" in v.finding
    assert "batch 32: 440, batch 128: 110, batch 512: 20." in v.finding


def test_does_not_hold_when_the_baselines_best_lr_grows_faster():
    v = _verdict(_table(_flat(6), _growing(6), top_acc={("skipinit", 512): 0.85}, noise=0.002))
    assert v.status == "does not hold", v.summary
    assert {r.part.name: r.status for r in v.judgement.deciding}["lr-grows-faster"] == "does not hold"


def test_inconclusive_when_seeds_disagree():
    bn = _growing(12)
    for s in range(0, 12, 2):
        bn[s] = dict(zip(SIZES, (2**-1, 2**-3, 2**-5)))  # half the seeds shrinking: no consistent slope
    v = _verdict(_table(bn, _flat(12), top_acc={("skipinit", 512): 0.85}, noise=0.002))
    assert v.status == "inconclusive", v.summary


def test_config_checks_variants_and_batch_sizes():
    with pytest.raises(ValueError, match="unknown variant"):
        LRvsBatchConfig(variants=("batchnorm", "fixup"))
    with pytest.raises(ValueError, match="two batch sizes"):
        LRvsBatchConfig(batch_sizes=(64,))
    with pytest.raises(ConfigError):
        get_experiment("lr-vs-batch").config_for("smoke", ["baseline=none"])  # not among the smoke variants
