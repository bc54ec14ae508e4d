"""C9 residual-variance: the smoke path end to end, the growth fit, the verdict rule on synthetic rows."""

from __future__ import annotations

import json

import numpy as np
import pytest

from normlab.lab.experiments import get_experiment, run_experiment
from normlab.lab.experiments.residual_variance import ResidualVarianceConfig, fit_skip_growth

PNG = b"\x89PNG\r\n\x1a\n"


def test_smoke_path_end_to_end(tmp_path):
    exp = get_experiment("C9")
    assert exp.name == "residual-variance"
    res = run_experiment("residual-variance", scale="smoke", root=tmp_path, progress=False)
    cfg = exp.scales["smoke"]
    assert len(res.rows) == len(cfg.activations) * len(cfg.variants) * cfg.seeds
    assert res.verdict.status in ("holds", "does not hold", "inconclusive")
    for r in res.rows:
        assert len(r["skip_variance"]) == len(r["branch_variance"]) == cfg.depth
        if r["variant"] == "skipinit-0":  # alpha = 0: every block is the identity at init
            assert np.allclose(r["skip_variance"], r["skip_variance"][0], rtol=1e-12)
        if r["variant"] == "none":  # alpha = 1 without norm: the skip variance grows block by block
            assert all(b > a for a, b in zip(r["skip_variance"], r["skip_variance"][1:]))
    assert json.loads((tmp_path / "residual-variance" / "verdict.json").read_text())["status"] == res.verdict.status
    assert res.figures and all(p.read_bytes()[:8] == PNG for p in res.figures)


def test_fit_skip_growth_recovers_linear_and_exponential_growth():
    i = np.arange(1, 51)
    lin = fit_skip_growth(0.7 * i + 0.3)
    assert lin["slope"] == pytest.approx(0.7) and lin["intercept"] == pytest.approx(0.3)
    assert lin["r2"] == pytest.approx(1)
    exp = fit_skip_growth(0.8 * 2.0**i)
    assert exp["growth"] == pytest.approx(2.0) and exp["total_growth"] == pytest.approx(2.0**49)
    part = fit_skip_growth([1.0, 2.0, float("inf"), 4.0])
    assert part["points"] == 3


# --------------------------------------------------------------------------- the verdict rule

CFG = ResidualVarianceConfig()
ANALYSE = get_experiment("residual-variance").analyse


def _rows(slope=(0.9, 0.91, 0.89), r2=(0.998, 0.997, 0.999), branch=(0.1, 0.12, 0.11), growth=(1.9, 1.85, 1.95)):
    rows = []
    for act in ("identity", "relu"):
        for s in range(3):
            base = {
                "activation": act,
                "seed": s,
                "depth": 100,
                "fit_total_growth": 1.0,
                "skip_last": 90.0,
                "branch_mean": 0.9,
            }
            rows.append(
                {
                    **base,
                    "variant": "batchnorm",
                    "fit_slope": slope[s],
                    "fit_r2": r2[s],
                    "branch_max_abs_log2": branch[s],
                    "fit_growth": 1.04,
                }
            )
            rows.append(
                {
                    **base,
                    "variant": "none",
                    "fit_slope": 1e20,
                    "fit_r2": 0.2,
                    "branch_max_abs_log2": 70.0,
                    "fit_growth": growth[s],
                }
            )
            rows.append(
                {
                    **base,
                    "variant": "skipinit-0",
                    "fit_slope": 0.0,
                    "fit_r2": float("nan"),
                    "branch_max_abs_log2": 0.5,
                    "fit_growth": 1.0,
                }
            )
    return rows


def test_verdict_holds_for_linear_growth_with_bn_and_doubling_without():
    v = ANALYSE(_rows(), CFG)
    assert v.status == "holds", v.summary
    assert "linear BN" in v.summary and "relu none" in v.summary


def test_verdict_does_not_hold_when_the_bn_slope_exceeds_one_or_no_norm_grows_slowly():
    assert ANALYSE(_rows(slope=(1.4, 1.5, 1.45)), CFG).status == "does not hold"
    assert ANALYSE(_rows(growth=(1.05, 1.1, 1.08)), CFG).status == "does not hold"
    assert ANALYSE(_rows(r2=(0.5, 0.6, 0.55)), CFG).status == "does not hold"


def test_verdict_is_inconclusive_when_the_slope_straddles_one():
    assert ANALYSE(_rows(slope=(0.8, 1.2, 1.0)), CFG).status == "inconclusive"
