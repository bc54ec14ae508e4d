"""C11 skipinit-depth: the smoke path end to end, and the verdict rule on synthetic run tables."""

from __future__ import annotations

import json
import math

import pytest

from normlab.lab.experiments import STATUSES, get_experiment, run_experiment
from normlab.lab.experiments.skipinit_depth import VARIANTS, SkipInitDepthConfig, accuracy, variant_options

PNG = b"\x89PNG\r\n\x1a\n"


def test_smoke_trains_stores_analyses_and_plots(tmp_path):
    exp = get_experiment("skipinit-depth")
    assert exp.claim == "C11" and get_experiment("C11") is exp
    cfg = exp.scales["smoke"]
    res = run_experiment("skipinit-depth", scale="smoke", root=tmp_path, progress=False)
    assert res.verdict.status in STATUSES and "\n" not in res.verdict.summary
    assert len(res.rows) == len(cfg.depths) * len(cfg.variants) * cfg.seeds
    assert {r["variant"] for r in res.rows} == set(VARIANTS)
    for r in res.rows:
        assert 0.0 <= r["final_test_acc"] <= 1.0 and 0.0 <= r["final_train_eval_acc"] <= 1.0
        assert len(r["step_loss"]) >= 1
    stored = json.loads(res.verdict_path.read_text())
    assert stored["status"] == res.verdict.status and stored["claim"] == "C11"
    assert res.figures and all(p.read_bytes()[:8] == PNG for p in res.figures)
    again = run_experiment("skipinit-depth", scale="smoke", root=tmp_path, progress=False)
    assert again.ran == [] and again.verdict.to_dict() == res.verdict.to_dict()


def test_variants_build_the_networks_they_name():
    from normlab.lab.models import build_model
    from normlab.normfree import SkipInit

    d = 9
    for variant in VARIANTS:
        norm, opts = variant_options(variant, d)
        net = build_model("resnet", in_shape=(1, 8, 8), num_classes=10, norm_layer=norm, depth=d, base_width=2, **opts)
        alphas = [b.alpha for b in net.blocks]
        merges = {b.merge for b in net.blocks}
        if variant.startswith("skipinit"):
            want = 0.0 if variant == "skipinit-0" else 1 / math.sqrt(d)
            assert all(isinstance(a, SkipInit) and a.alpha.item() == pytest.approx(want) for a in alphas)
        else:
            assert all(a is None for a in alphas)
        assert merges == ({1 / math.sqrt(2)} if variant == "none-merge" else {1.0})
        assert (norm == "batchnorm") == (variant == "batchnorm")
    with pytest.raises(ValueError, match="unknown variant"):
        variant_options("skipinit-2", d)


# --------------------------------------------------------------------------- the verdict rule on synthetic rows


def _rows(accs: dict[str, list[float]], depth: int = 100, shallow: dict[str, list[float]] | None = None) -> list[dict]:
    rows = []
    for d, table in ((depth, accs), (4, shallow or {})):
        for variant, xs in table.items():
            for seed, acc in enumerate(xs):
                rows.append(
                    {
                        "variant": variant,
                        "depth": d,
                        "seed": seed,
                        "final_test_acc": acc,
                        "num_classes": 10,
                        "diverged": acc is None,
                    }
                )
    return rows


def _analyse(rows, **kw):
    exp = get_experiment("skipinit-depth")
    return exp.call_analyse(rows, SkipInitDepthConfig(**kw))


def test_verdict_holds_when_skipinit_matches_bn_and_alpha1_and_merge_fail():
    v = _analyse(
        _rows(
            {
                "batchnorm": [0.90, 0.91, 0.92],
                "none": [0.10, 0.10, 0.10],
                "none-merge": [0.10, 0.11, 0.10],
                "skipinit-0": [0.89, 0.92, 0.91],
                "skipinit-sqrt": [0.90, 0.90, 0.93],
                "fixup": [0.85, 0.86, 0.84],
            }
        )
    )
    assert v.status == "holds", v.summary
    assert v.numbers["depth"] == 100 and v.numbers["test_acc"]["fixup"]["mean"] == pytest.approx(0.85)


def test_verdict_uses_the_deepest_depth_only():
    deep_ok = {"batchnorm": [0.9, 0.91, 0.92], "none": [0.1, 0.1, 0.1], "skipinit-0": [0.9, 0.91, 0.9]}
    shallow_contrary = {"batchnorm": [0.9, 0.91, 0.92], "none": [0.95, 0.96, 0.95], "skipinit-0": [0.3, 0.3, 0.3]}
    assert _analyse(_rows(deep_ok, shallow=shallow_contrary)).status == "holds"


def test_verdict_does_not_hold_when_skipinit_trails_bn_or_alpha1_trains():
    v = _analyse(_rows({"batchnorm": [0.90, 0.91, 0.92], "none": [0.1, 0.1, 0.1], "skipinit-0": [0.50, 0.52, 0.55]}))
    assert v.status == "does not hold" and "SkipInit α=0 ≈ BN: does not hold" in v.summary
    v = _analyse(_rows({"batchnorm": [0.90, 0.91, 0.92], "none": [0.93, 0.94, 0.95], "skipinit-0": [0.9, 0.91, 0.92]}))
    assert v.status == "does not hold" and "α=1 fails: does not hold" in v.summary


def test_verdict_is_inconclusive_when_spread_hides_the_gap():
    # SkipInit trails BN by ~0.05 ± 0.05: the interval of the difference contains -match_tol
    v = _analyse(_rows({"batchnorm": [0.90, 0.90, 0.90], "none": [0.1, 0.1, 0.1], "skipinit-0": [0.80, 0.86, 0.90]}))
    assert v.status == "inconclusive", v.summary
    # alpha = 1 trails BN by 0.1 ± 0.05: the interval contains the fail margin
    v = _analyse(_rows({"batchnorm": [0.90, 0.90, 0.90], "none": [0.75, 0.80, 0.85], "skipinit-0": [0.9, 0.91, 0.92]}))
    assert v.status == "inconclusive", v.summary
    # ... but trailing consistently by less than the margin is not "failing"
    v = _analyse(_rows({"batchnorm": [0.90, 0.91, 0.92], "none": [0.85, 0.86, 0.85], "skipinit-0": [0.9, 0.91, 0.92]}))
    assert v.status == "does not hold", v.summary


def test_a_run_without_accuracy_counts_as_chance():
    assert accuracy({"final_test_acc": float("nan"), "num_classes": 10}) == pytest.approx(0.1)
    assert accuracy({"final_test_acc": None, "num_classes": 4}) == pytest.approx(0.25)
    assert accuracy({"final_test_acc": 0.7}) == 0.7
    v = _analyse(_rows({"batchnorm": [0.9, 0.91, 0.92], "none": [None, None, None], "skipinit-0": [0.9, 0.91, 0.92]}))
    assert v.status == "holds" and v.numbers["diverged"]["none"] == 3


def test_config_must_include_batchnorm():
    exp = get_experiment("skipinit-depth")
    with pytest.raises(ValueError, match="batchnorm"):
        exp.runs(SkipInitDepthConfig(variants=("none", "skipinit-0")))
