"""C6 placement: the smoke path end to end, the speed metric, and the verdict rule on synthetic run tables."""

from __future__ import annotations

import json
import math

import pytest

from normlab.lab.experiments import get_experiment, run_experiment
from normlab.lab.experiments.framework import STATUSES
from normlab.lab.experiments.placement import PlacementConfig, capped_mean_loss

PNG = b"\x89PNG\r\n\x1a\n"


def test_smoke_trains_stores_analyses_and_draws(tmp_path):
    exp = get_experiment("C6")
    assert exp.name == "placement"
    cfg = exp.scales["smoke"]
    res = run_experiment("placement", scale="smoke", root=tmp_path, progress=False)
    assert len(res.rows) == len(list(exp.grid(cfg))) * cfg.seeds
    assert res.verdict.status in STATUSES and "fastest" in res.verdict.summary
    assert json.loads(res.verdict_path.read_text())["status"] == res.verdict.status
    (fig,) = res.figures
    assert fig.name == "placement.png" and fig.read_bytes().startswith(PNG)
    placements = {r["placement"] for r in res.rows}
    assert placements == {"before_linear", "pre_act", "post_act", "no norm"}
    for r in res.rows:
        assert r["model_kwargs.norm_position"] == (r["placement"] if r["placement"] != "no norm" else "pre_act")
        assert r["norm"] == ("none" if r["placement"] == "no norm" else "batchnorm")
        assert 0 < r["capped_mean_loss"] <= r["chance_loss"] + 1e-12
        assert r["scheduled_steps"] == 256 // 32  # digits, 256 examples, batch 32, 1 epoch


def test_capped_mean_loss_caps_spikes_and_counts_missing_steps_as_chance():
    assert capped_mean_loss([1.0, 0.5], 2, 2.3) == pytest.approx(0.75)
    assert capped_mean_loss([1.0, 1e6], 2, 2.0) == pytest.approx(1.5)  # a spike counts as chance, not as 1e6
    assert capped_mean_loss([1.0, math.nan], 4, 2.0) == pytest.approx((1.0 + 2.0 * 3) / 4)  # diverged at step 1
    with pytest.raises(ValueError):
        capped_mean_loss([1.0], 0, 2.0)


def _rows(loss: dict[str, list[float]], lrs=(0.05, 0.5)) -> list[dict]:
    return [
        {"placement": p, "lr": lr, "seed": s, "capped_mean_loss": x, "final_test_acc": 1.0 - x / 3}
        for lr in lrs
        for p, xs in loss.items()
        for s, x in enumerate(xs)
    ]


def _verdict(rows):
    return get_experiment("placement").analyse(rows, PlacementConfig())


def test_holds_when_before_linear_trains_fastest_at_every_lr():
    loss = {"before_linear": [0.10, 0.11, 0.12], "pre_act": [0.20, 0.21, 0.22], "post_act": [0.30, 0.31, 0.29]}
    v = _verdict(_rows({**loss, "no norm": [0.5, 0.5, 0.5]}))
    assert v.status == "holds"
    assert v.numbers["lr=0.05"]["fastest"] == "before_linear" and "fastest before_linear" in v.summary


def test_does_not_hold_when_another_placement_is_faster_and_names_it():
    v = _verdict(
        _rows({"before_linear": [0.30, 0.31, 0.32], "pre_act": [0.20, 0.21, 0.22], "post_act": [0.10, 0.11, 0.09]})
    )
    assert v.status == "does not hold"
    assert v.numbers["lr=0.5"]["rival"] == "post_act" and "fastest post_act" in v.summary


def test_inconclusive_when_the_spreads_overlap():
    v = _verdict(
        _rows({"before_linear": [0.10, 0.30, 0.20], "pre_act": [0.18, 0.22, 0.20], "post_act": [0.40, 0.41, 0.42]})
    )
    assert v.status == "inconclusive"


def test_one_lr_against_makes_it_fail():
    others = {"pre_act": [0.20, 0.21, 0.22], "post_act": [0.3, 0.3, 0.3]}
    rows = _rows({"before_linear": [0.10, 0.11, 0.12], **others}, lrs=(0.05,))
    rows += _rows({"before_linear": [0.9, 0.9, 0.95], **others}, lrs=(0.5,))
    v = _verdict(rows)
    assert v.status == "does not hold"
    assert v.numbers["lr=0.05"]["status"] == "holds" and v.numbers["lr=0.5"]["status"] == "does not hold"


def test_config_needs_the_recommended_position():
    with pytest.raises(ValueError, match="before_linear"):
        PlacementConfig(positions=("pre_act", "post_act"))
