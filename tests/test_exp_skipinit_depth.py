"""C11 skipinit-depth: the smoke path end to end, the variants, failure and accuracy per run, the verdict on rows."""

from __future__ import annotations

import json
import math

import pytest

from normlab.lab.experiments import get_experiment, run_experiment
from normlab.lab.experiments.framework import judge_rows
from normlab.lab.experiments.skipinit_depth import VARIANTS, SkipInitDepthConfig, accuracy, failed, variant_options

PNG = b"\x89PNG\r\n\x1a\n"


def test_smoke_trains_stores_judges_and_plots(tmp_path):
    exp = get_experiment("skipinit-depth")
    assert exp.claim == "C11" and get_experiment("C11") is exp
    cfg = exp.scales["smoke"]
    res = run_experiment("skipinit-depth", scale="smoke", root=tmp_path, progress=False, device="cpu")
    assert len(res.rows) == (len(cfg.variants) + len(cfg.shallow_variants)) * cfg.max_seeds
    assert {(r["variant"], r["depth"]) for r in res.rows} == {(v, cfg.depth) for v in cfg.variants} | {
        (v, cfg.shallow_depth) for v in cfg.shallow_variants
    }
    for r in res.rows:
        assert 0.0 <= r["final_test_acc"] <= 1.0 and 0.0 <= r["final_train_eval_acc"] <= 1.0
        assert len(r["step_loss"]) >= 1 and "threads" not in r
    stored = json.loads(res.verdict_path.read_text())
    assert stored["claim"] == "C11" and stored["meaningful"] is False
    assert [p["name"] for p in stored["parts"] if p["decides"]] == [
        "alpha1-fails",
        "merge-fails",
        "skipinit-sqrt-trains",
        "skipinit-matches-bn",
    ]
    assert {p.name for p in res.figures} == {"skipinit-depth.png", "parts.png"}
    assert all(p.read_bytes()[:8] == PNG for p in res.figures)
    again = run_experiment("skipinit-depth", scale="smoke", root=tmp_path, progress=False, device="cpu")
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


def test_a_run_fails_when_it_diverges_or_stays_near_chance():
    assert failed({"final_train_eval_acc": 0.9, "diverged": False}, 0.2) == 0
    assert failed({"final_train_eval_acc": 0.15, "diverged": False}, 0.2) == 1
    assert failed({"final_train_eval_acc": 0.9, "diverged": True}, 0.2) == 1  # learned, then blew up
    assert failed({"final_train_eval_acc": float("nan"), "diverged": False}, 0.2) == 1
    assert accuracy({"final_test_acc": 0.7, "diverged": False}) == 0.7
    assert accuracy({"final_test_acc": 0.7, "diverged": True}) is None
    assert accuracy({"final_test_acc": None}) is None


def test_config_must_include_the_compared_arms():
    exp = get_experiment("skipinit-depth")
    with pytest.raises(ValueError, match="batchnorm"):
        exp.runs(SkipInitDepthConfig(variants=("none", "none-merge", "skipinit-0", "skipinit-sqrt")))
    with pytest.raises(ValueError, match="shallow_depth"):
        exp.runs(SkipInitDepthConfig(depth=6, shallow_depth=6))


# --------------------------------------------------------------------------- the verdict on synthetic rows

CFG = SkipInitDepthConfig()
D, S = CFG.depth, CFG.shallow_depth
BN = [0.90, 0.91, 0.92, 0.90, 0.91, 0.92, 0.90, 0.91]


def _rows(deep: dict[str, list], shallow: dict[str, list] | None = None) -> list[dict]:
    """variant -> per seed final accuracy (train = test), or None for a diverged run; stored-row shape."""
    rows = []
    for depth, table in ((D, deep), (S, shallow or {"none": [0.9] * 8, "none-merge": [0.9] * 8})):
        for variant, xs in table.items():
            for seed, acc in enumerate(xs):
                rows.append(
                    {
                        "variant": variant,
                        "depth": depth,
                        "seed": seed,
                        "diverged": acc is None,
                        "final_test_acc": float("nan") if acc is None else acc,
                        "final_train_eval_acc": float("nan") if acc is None else acc,
                    }
                )
    return rows


GOOD = {
    "batchnorm": BN,
    "none": [None] * 8,
    "none-merge": [0.10] * 8,
    "skipinit-0": [x - 0.005 for x in BN],
    "skipinit-sqrt": [x - 0.01 for x in BN],
}


def _judge(rows):
    return judge_rows(get_experiment("skipinit-depth"), CFG, rows, "quick")


def _status(v, name):
    return next(r.status for r in v.judgement.parts if r.part.name == name)


def test_verdict_holds_at_eight_seeds_when_alpha1_and_merge_fail_and_skipinit_trains_like_bn():
    v = _judge(_rows(GOOD))
    assert v.status == "holds", v.summary
    assert v.judgement.seeds == 8  # every seed failing: a rate above one half is shown at 8 seeds, not at 4
    assert _status(v, "alpha1-trains-shallow") == "holds"
    assert "α = 1 8/8 (diverged 8)" in v.finding


def test_unanimous_rates_decide_at_the_quick_budget_even_when_the_accuracy_part_does_not():
    # SkipInit trails BN by 0.03 ± 0.03: the "≈ BN" part stays open, but 8 of 8 failing (or training) is shown
    noisy = [x - 0.03 + d for x, d in zip(BN, [0.03, -0.03, 0.02, -0.02, 0.04, -0.04, 0.0, 0.0])]
    v = _judge(_rows(dict(GOOD, **{"skipinit-0": noisy})))
    assert v.status == "inconclusive", v.summary
    assert _status(v, "skipinit-matches-bn") == "inconclusive"
    for name in ("alpha1-fails", "merge-fails", "skipinit-sqrt-trains"):
        assert _status(v, name) == "holds", name


def test_verdict_does_not_hold_when_alpha1_trains_at_depth():
    v = _judge(_rows(dict(GOOD, none=[0.8] * 8)))
    assert v.status == "does not hold" and _status(v, "alpha1-fails") == "does not hold"


def test_verdict_does_not_hold_when_skipinit_trails_bn():
    v = _judge(_rows(dict(GOOD, **{"skipinit-0": [x - 0.2 for x in BN]})))
    assert v.status == "does not hold" and _status(v, "skipinit-matches-bn") == "does not hold"


def test_verdict_inconclusive_when_failure_is_a_coin_flip_for_sqrt_init():
    # α = 1/√d fails in 3 of 8 runs: the rate's interval holds one half
    v = _judge(_rows(dict(GOOD, **{"skipinit-sqrt": [None, 0.9, None, 0.9, 0.9, None, 0.9, 0.9]})))
    assert v.status == "inconclusive", v.summary
    assert _status(v, "skipinit-sqrt-trains") == "inconclusive"
    # its accuracy part counts the diverged runs as chance (reported)
    sqrt_acc = next(r for r in v.judgement.parts if r.part.name == "skipinit-sqrt-matches-bn")
    want = sum((0.1 if a is None else a) - b for a, b in zip([None, 0.9, None, 0.9, 0.9, None, 0.9, 0.9], BN)) / 8
    assert sqrt_acc.effect == pytest.approx(want)
