"""C1 high-lr: the smoke path end to end, and the verdict rule on synthetic run tables."""

from __future__ import annotations

import json
import math

import pytest

from normlab.lab.experiments import get_experiment, run_experiment
from normlab.lab.experiments.framework import STATUSES, analyse_stored
from normlab.lab.experiments.high_lr import HighLRConfig, is_stable, largest_stable_lr

PNG = b"\x89PNG\r\n\x1a\n"


def test_smoke_trains_stores_analyses_and_draws(tmp_path):
    exp = get_experiment("C1")
    assert exp.name == "high-lr"
    cfg = exp.scales["smoke"]
    res = run_experiment("high-lr", scale="smoke", root=tmp_path, progress=False)
    n = len(list(exp.grid(cfg))) * cfg.seeds
    assert len(res.rows) == len(res.ran) == n
    assert res.verdict.status in STATUSES and "largest stable lr" in res.verdict.summary
    saved = json.loads(res.verdict_path.read_text())
    assert saved["status"] == res.verdict.status and saved["claim"] == "C1"
    (fig,) = res.figures
    assert fig.name == "high-lr.png" and fig.read_bytes().startswith(PNG)
    for r in res.rows:
        assert r["threads"] == 1 and len(r["step_loss"]) >= 1
    # Adam at lr 10 without a norm blows up: recorded as a result (the run ends cleanly), never raised.
    blown = [r for r in res.rows if r["norm"] == "none" and r["lr"] == 10.0]
    assert blown and all(r["diverged"] and r["diverged_step"] is not None for r in blown)
    assert all(len(r["step_loss"]) == r["diverged_step"] + 1 for r in blown)
    # re-analysis reads the store only and gives the same verdict
    again, rows, _ = analyse_stored("high-lr", "smoke", root=tmp_path, plot=False)
    assert again == res.verdict and len(rows) == n


# --------------------------------------------------------------------------- the verdict rule


def _rows(stable_up_to: dict[tuple[str, str, int], float], grids=None) -> list[dict]:
    """Synthetic rows: a run is stable (acc 0.95) up to the given lr, diverged above it (or stalled for SGD)."""
    grids = grids or {"adam": [0.01, 0.03, 0.1, 0.3, 1.0], "sgd": [0.03, 0.1, 0.3, 1.0, 3.0]}
    rows = []
    for (opt, norm, seed), top in stable_up_to.items():
        for lr in grids[opt]:
            ok = lr <= top
            stalled = not ok and opt == "sgd"
            rows.append(
                {
                    "optimizer": opt,
                    "norm": norm,
                    "seed": seed,
                    "lr": lr,
                    "diverged": not ok and not stalled,
                    "final_test_acc": 0.95 if ok else 0.1,
                }
            )
    return rows


def _table(bn: dict[str, list[float]], none: dict[str, list[float]]) -> list[dict]:
    spec = {}
    for norm, tops in (("batchnorm", bn), ("none", none)):
        for opt, per_seed in tops.items():
            for seed, top in enumerate(per_seed):
                spec[(opt, norm, seed)] = top
    return _rows(spec)


def _verdict(rows):
    return get_experiment("high-lr").analyse(rows, HighLRConfig())


def test_holds_when_bn_is_stable_at_larger_lrs_for_both_optimizers():
    rows = _table(
        bn={"adam": [0.3, 0.3, 0.1], "sgd": [0.3, 0.3, 0.3]}, none={"adam": [0.03, 0.01, 0.03], "sgd": [0.1, 0.1, 0.1]}
    )
    v = _verdict(rows)
    assert v.status == "holds"
    assert v.numbers["largest_stable_lr"]["adam/none/seed1"] == 0.01
    assert "adam: batchnorm" in v.summary and "sgd: batchnorm" in v.summary


def test_does_not_hold_when_no_bn_is_stable_further():
    rows = _table(
        bn={"adam": [0.03, 0.03, 0.03], "sgd": [0.1, 0.1, 0.1]}, none={"adam": [0.3, 0.3, 0.3], "sgd": [0.3, 0.3, 1.0]}
    )
    assert _verdict(rows).status == "does not hold"


def test_one_optimizer_the_other_way_makes_the_claim_fail():
    rows = _table(
        bn={"adam": [0.3, 0.3, 0.3], "sgd": [0.1, 0.1, 0.1]}, none={"adam": [0.03, 0.03, 0.03], "sgd": [1.0, 1.0, 1.0]}
    )
    v = _verdict(rows)
    assert v.status == "does not hold"
    assert v.numbers["adam"]["status"] == "holds" and v.numbers["sgd"]["status"] == "does not hold"


def test_inconclusive_when_the_seeds_disagree():
    rows = _table(
        bn={"adam": [1.0, 0.01, 0.3], "sgd": [3.0, 0.03, 0.3]}, none={"adam": [0.1, 0.1, 0.03], "sgd": [0.3, 0.3, 0.1]}
    )
    assert _verdict(rows).status == "inconclusive"


def test_the_source_setting_is_reported_when_in_the_grid():
    rows = _table(
        bn={"adam": [0.3, 0.3, 0.3], "sgd": [0.3, 0.3, 0.3]}, none={"adam": [0.03, 0.03, 0.03], "sgd": [0.1, 0.1, 0.1]}
    )
    v = _verdict(rows)
    assert "Adam lr 0.1" in v.summary and "3/3 none runs failed" in v.summary
    assert v.numbers["adam_lr0.1_test_acc"]["none"] == [0.1, 0.1, 0.1]


def test_stability_needs_no_divergence_and_the_accuracy_threshold():
    assert is_stable({"diverged": False, "final_test_acc": 0.9}, 0.5)
    assert not is_stable({"diverged": True, "final_test_acc": 0.9}, 0.5)  # blew up, whatever the accuracy
    assert not is_stable({"diverged": False, "final_test_acc": 0.1}, 0.5)  # stalled at chance
    assert not is_stable({"diverged": False, "final_test_acc": math.nan}, 0.5)


def test_a_seed_stable_nowhere_sits_one_grid_step_below_the_grid():
    rows = _rows({("adam", "none", 0): 0.0}, grids={"adam": [0.01, 0.03, 0.1]})
    assert largest_stable_lr(rows, 0.5)[("adam", "none", 0)] == pytest.approx(0.01 / 3)
