"""C1 high-lr: the smoke path end to end, the largest-stable-lr rule, and the verdict on synthetic run tables."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from normlab.lab.experiments import get_experiment, run_experiment
from normlab.lab.experiments.framework import analyse_stored, judge_rows
from normlab.lab.experiments.high_lr import CHANCE, is_stable, largest_stable_lr

PNG = b"\x89PNG\r\n\x1a\n"


def test_smoke_trains_stores_judges_draws_and_records_divergence(tmp_path):
    exp = get_experiment("C1")
    assert exp.name == "high-lr"
    res = run_experiment("high-lr", scale="smoke", root=tmp_path, progress=False, device="cpu")
    cfg = res.config
    assert len(res.rows) == len(res.ran) == len(list(exp.grid(cfg))) * cfg.max_seeds
    stored = json.loads(res.verdict_path.read_text())
    assert stored["claim"] == "C1" and stored["meaningful"] is False
    assert {p["name"] for p in stored["parts"]} == {"source-setting", "stable-lr-adam", "stable-lr-sgd",
                                                    "none-fails-at-source"}  # fmt: skip
    assert "Adam:" in stored["finding"] and "SGD:" in stored["finding"]
    assert {p.name for p in res.figures} == {"high-lr.png", "parts.png"}
    assert all(p.read_bytes()[:8] == PNG for p in res.figures)
    # Adam at lr 10 without a norm blows up: recorded as a result (the run ends cleanly), never raised
    blown = [r for r in res.rows if r["norm"] == "none" and r["lr"] == 10.0]
    assert blown and all(r["diverged"] and r["diverged_step"] is not None for r in blown)
    assert all(len(r["step_loss"]) == r["diverged_step"] + 1 for r in blown)
    again = analyse_stored("high-lr", root=tmp_path)  # reads the store only
    assert again.status == res.verdict.status
    assert [p.effect for p in again.judgement.parts] == pytest.approx([p.effect for p in res.verdict.judgement.parts])


# --------------------------------------------------------------------------- the rule on synthetic tables

GRIDS = {"adam": [0.01, 0.03, 0.1, 0.3, 1.0], "sgd": [0.03, 0.1, 0.3, 1.0, 3.0]}


def _rows(stable_up_to: dict[tuple[str, str, int], float], noise: float = 0.0, rng_seed: int = 0) -> list[dict]:
    """A run is stable (acc ~0.95) up to the given lr; above it Adam diverges and SGD stalls at chance."""
    rng = np.random.default_rng(rng_seed)
    rows = []
    for (opt, norm, seed), top in stable_up_to.items():
        for lr in GRIDS[opt]:
            ok = lr <= top
            acc = 0.95 + noise * rng.standard_normal() if ok else 0.1
            rows.append({"optimizer": opt, "norm": norm, "seed": seed, "lr": lr,
                         "diverged": not ok and opt == "adam", "final_test_acc": float(acc)})  # fmt: skip
    return rows


def _table(bn: dict[str, list[float]], none: dict[str, list[float]], **kw) -> list[dict]:
    spec = {}
    for norm, tops in (("batchnorm", bn), ("none", none)):
        for opt, per_seed in tops.items():
            for seed, top in enumerate(per_seed):
                spec[(opt, norm, seed)] = top
    return _rows(spec, **kw)


def _verdict(rows):
    exp = get_experiment("high-lr")
    return judge_rows(exp, exp.config_for("quick"), rows, "quick")


def test_largest_stable_lr_and_a_seed_stable_nowhere_one_grid_step_below():
    rows = _table({"adam": [0.3, 0.1], "sgd": [1.0, 1.0]}, {"adam": [0.0, 0.03], "sgd": [0.1, 0.3]})
    best = largest_stable_lr(rows, 0.5)
    assert best[("adam", "batchnorm", 0)] == 0.3 and best[("sgd", "none", 1)] == 0.3
    assert best[("adam", "none", 0)] == pytest.approx(0.01 * 0.01 / 0.03)


def test_stability_needs_no_divergence_and_the_accuracy_threshold():
    assert is_stable({"diverged": False, "final_test_acc": 0.9}, 0.5)
    assert not is_stable({"diverged": True, "final_test_acc": 0.9}, 0.5)  # blew up, whatever the accuracy
    assert not is_stable({"diverged": False, "final_test_acc": 0.1}, 0.5)  # stalled at chance
    assert not is_stable({"diverged": False, "final_test_acc": math.nan}, 0.5)


def test_measure_gives_log_ratio_inputs_and_counts_a_diverged_source_run_at_chance():
    rows = _table({"adam": [0.3, 0.3, 0.3], "sgd": [1.0] * 3}, {"adam": [0.03, 0.03, 0.3], "sgd": [0.1] * 3})
    v = _verdict(rows)
    parts = {r.part.name: r for r in v.judgement.parts}
    # Adam: BN 0.3 in every seed, none 0.03, 0.03, 0.3: the mean log10 ratio is (1 + 1 + 0) / 3
    assert parts["stable-lr-adam"].effect == pytest.approx(2 / 3)
    assert parts["stable-lr-sgd"].effect == pytest.approx(1.0)
    # at Adam lr 0.1 "none" diverged in seeds 0 and 1 (counted at chance) and trained in seed 2
    assert parts["source-setting"].effect == pytest.approx((0.95 - CHANCE) * 2 / 3)
    assert v.numbers["source_none"]["diverged"] == 2


def test_verdict_holds_when_bn_is_stable_further_for_both_optimizers_and_trains_at_the_source_setting():
    rows = _table({"adam": [0.3] * 6, "sgd": [1.0] * 6}, {"adam": [0.03] * 6, "sgd": [0.1] * 6}, noise=0.01)
    v = _verdict(rows)
    assert v.status == "holds", v.summary
    assert "Adam: batchnorm 0.3 vs none 0.03" in v.finding and "SGD: batchnorm 1 vs none 0.1" in v.finding


def test_verdict_does_not_hold_when_no_bn_is_stable_further():
    rows = _table({"adam": [0.03] * 6, "sgd": [0.1] * 6}, {"adam": [0.3] * 6, "sgd": [1.0] * 6}, noise=0.01)
    v = _verdict(rows)
    assert v.status == "does not hold", v.summary
    assert {r.part.name: r.status for r in v.judgement.deciding}["stable-lr-sgd"] == "does not hold"


def test_verdict_inconclusive_when_the_seeds_disagree():
    bn = {"adam": [1.0, 0.01, 0.3, 0.03] * 3, "sgd": [3.0, 0.03, 1.0, 0.1] * 3}
    none = {"adam": [0.1, 0.1, 0.03, 0.1] * 3, "sgd": [0.3, 0.3, 0.1, 0.3] * 3}
    v = _verdict(_table(bn, none, noise=0.01))
    assert v.status == "inconclusive", v.summary
    assert v.judgement.seeds == 12
