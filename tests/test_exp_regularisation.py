"""C3 regularisation: the smoke path end to end, and the verdict rule on synthetic run tables."""

from __future__ import annotations

import json

import pytest

from normlab.lab.experiments import get_experiment, run_experiment
from normlab.lab.experiments.framework import STATUSES
from normlab.lab.experiments.regularisation import RegularisationConfig, narrowing

PNG = b"\x89PNG\r\n\x1a\n"


def test_smoke_trains_stores_analyses_and_draws(tmp_path):
    exp = get_experiment("C3")
    assert exp.name == "regularisation"
    cfg = exp.scales["smoke"]
    res = run_experiment("regularisation", scale="smoke", root=tmp_path, progress=False)
    assert len(res.rows) == len(list(exp.grid(cfg))) * cfg.seeds
    assert res.verdict.status in STATUSES and "gap" in res.verdict.summary
    assert json.loads(res.verdict_path.read_text())["status"] == res.verdict.status
    (fig,) = res.figures
    assert fig.name == "regularisation.png" and fig.read_bytes().startswith(PNG)
    for r in res.rows:
        # the gap is train accuracy (eval mode, whole reduced training set) minus test accuracy
        assert r["gap"] == pytest.approx(r["final_train_eval_acc"] - r["final_test_acc"])
        assert r["lr"] == pytest.approx(cfg.lr * r["batch_size"] / cfg.lr_batch)  # linear scaling rule
        assert (r["model_kwargs.dropout"] > 0) == ("dropout" in r["condition"])


def _rows(gaps: dict[tuple[str, int], list[float]]) -> list[dict]:
    return [
        {
            "condition": c,
            "batch_size": bs,
            "seed": s,
            "gap": g,
            "final_test_acc": 0.8 - g / 2,
            "final_train_eval_acc": 0.8 + g / 2,
        }
        for (c, bs), gs in gaps.items()
        for s, g in enumerate(gs)
    ]


def _verdict(rows):
    return get_experiment("regularisation").analyse(rows, RegularisationConfig())


def test_holds_when_bn_narrows_the_gap_at_small_batch_and_less_at_large_batch():
    rows = _rows(
        {
            ("none", 16): [0.30, 0.31, 0.32],
            ("batchnorm", 16): [0.10, 0.11, 0.12],
            ("none", 256): [0.20, 0.21, 0.22],
            ("batchnorm", 256): [0.19, 0.20, 0.21],
        }
    )
    v = _verdict(rows)
    assert v.status == "holds"
    assert narrowing(rows, 16) == pytest.approx([0.2, 0.2, 0.2]) and narrowing(rows, 256) == pytest.approx([0.01] * 3)
    assert v.numbers["BN narrows the gap"]["status"] == "holds"


def test_does_not_hold_when_bn_widens_the_gap():
    rows = _rows(
        {
            ("none", 16): [0.10, 0.11, 0.12],
            ("batchnorm", 16): [0.30, 0.31, 0.32],
            ("none", 256): [0.10, 0.11, 0.12],
            ("batchnorm", 256): [0.20, 0.21, 0.22],
        }
    )
    assert _verdict(rows).status == "does not hold"


def test_does_not_hold_when_the_effect_grows_with_batch_size():
    rows = _rows(
        {
            ("none", 16): [0.30, 0.31, 0.32],
            ("batchnorm", 16): [0.20, 0.21, 0.22],
            ("none", 256): [0.40, 0.41, 0.42],
            ("batchnorm", 256): [0.10, 0.11, 0.12],
        }
    )
    v = _verdict(rows)
    assert v.status == "does not hold"
    assert v.numbers["the effect fades with batch size"]["status"] == "does not hold"


def test_inconclusive_when_the_spreads_overlap():
    rows = _rows(
        {
            ("none", 16): [0.10, 0.30, 0.20],
            ("batchnorm", 16): [0.15, 0.25, 0.19],
            ("none", 256): [0.20, 0.21, 0.22],
            ("batchnorm", 256): [0.19, 0.20, 0.21],
        }
    )
    assert _verdict(rows).status == "inconclusive"


def test_dropout_placement_is_reported_beside_the_verdict():
    gaps = {
        ("none", 16): [0.3] * 3,
        ("batchnorm", 16): [0.1] * 3,
        ("none", 256): [0.2] * 3,
        ("batchnorm", 256): [0.2] * 3,
        ("batchnorm+dropout", 16): [0.05] * 3,
        ("batchnorm+dropout-before-bn", 16): [0.2] * 3,
    }
    v = _verdict(_rows(gaps))
    assert "right before BN" in v.summary and v.numbers["gaps"]["bs16"]["batchnorm+dropout"] == [0.05] * 3


def test_config_checks():
    with pytest.raises(ValueError, match="'none' and 'batchnorm'"):
        RegularisationConfig(conditions=("none", "dropout"))
    with pytest.raises(ValueError, match="lr_scaling"):
        RegularisationConfig(lr_scaling="sqrt")
