"""C9 residual-variance: the smoke path end to end, the growth fit, the parts reaching each outcome."""

from __future__ import annotations

import json

import numpy as np
import pytest

from normlab.lab.experiments import framework, get_experiment, run_experiment
from normlab.lab.experiments.residual_variance import ResidualVarianceConfig, fit_skip_growth

PNG = b"\x89PNG\r\n\x1a\n"


def test_smoke_path_end_to_end(tmp_path):
    exp = get_experiment("C9")
    assert exp.name == "residual-variance"
    res = run_experiment("residual-variance", scale="smoke", root=tmp_path, progress=False, device="cpu")
    cfg = exp.scales["smoke"]
    assert len(res.rows) == len(cfg.activations) * len(cfg.variants) * cfg.seeds == len(res.ran)
    for r in res.rows:
        assert len(r["skip_variance"]) == len(r["branch_variance"]) == cfg.depth
        if r["variant"] == "skipinit-0":  # alpha = 0: every block is the identity at init
            assert np.allclose(r["skip_variance"], r["skip_variance"][0], rtol=1e-12)
        # every block's output is its skip path plus its branch: Var(out_i) is the next block's Var(skip_{i+1})
        assert np.allclose(r["output_variance"][:-1], r["skip_variance"][1:], rtol=1e-10)
    saved = json.loads((tmp_path / "residual-variance" / "verdict.json").read_text())
    assert saved["status"] == res.verdict.status and saved["meaningful"] is False
    names = [p["name"] for p in saved["parts"]]
    assert names == ["c-linear", "branch-linear", "c-relu", "branch-relu", "doubling-none", "doubling-none-relu"]
    assert [p["decides"] for p in saved["parts"]] == [True, True, True, False, False, False]
    assert res.figures and all(p.read_bytes()[:8] == PNG for p in res.figures)
    assert not [k for r in res.rows for k in r if k.startswith(("data_kwargs", "data_dir", "threads"))]  # not in ids


def test_fit_skip_growth_recovers_linear_and_exponential_growth():
    i = np.arange(1, 51)
    lin = fit_skip_growth(0.7 * i + 0.3)
    assert lin["c"] == pytest.approx(0.7) and lin["intercept"] == pytest.approx(0.3) and lin["r2"] == pytest.approx(1)
    noisy = 0.7 * i + 0.3 + np.random.default_rng(0).normal(0, 0.5, i.size)
    c, b = np.polyfit(i, noisy, 1)  # numpy's least squares is the oracle
    assert fit_skip_growth(noisy)["c"] == pytest.approx(c, rel=1e-12)
    ex = fit_skip_growth(0.8 * 2.0**i)
    assert ex["growth"] == pytest.approx(2.0) and ex["total_growth"] == pytest.approx(2.0**49)
    assert fit_skip_growth([1.0, 2.0, float("inf"), 4.0])["points"] == 3


# --------------------------------------------------------------------------- the parts on synthetic rows

EXP = get_experiment("residual-variance")
CFG = ResidualVarianceConfig()


def _rows(c_lin, c_relu, branch_lin, seeds=12, depth=100, noise=0.01):
    """Stored-row shaped runs: skip variance c·i + 1 with per-seed slopes, branch constant, no-norm doubling."""
    rng = np.random.default_rng(0)
    i = np.arange(1, depth + 1)
    rows = []
    for s in range(seeds):
        for act, c, br in (("identity", c_lin, branch_lin), ("relu", c_relu, 0.7)):
            cs = c[s] if isinstance(c, (list, tuple)) else c + noise * rng.standard_normal()
            rows.append({"activation": act, "variant": "batchnorm", "depth": depth, "seed": s,
                         "skip_variance": list(cs * i + 1.0),
                         "branch_variance": list(np.full(depth, br + noise * rng.standard_normal()))})  # fmt: skip
            rows.append({"activation": act, "variant": "none", "depth": depth, "seed": s,
                         "skip_variance": list(2.0 ** (i * (1 + noise * rng.standard_normal()))),
                         "branch_variance": list(2.0**i)})  # fmt: skip
    return rows


def test_parts_hold_for_linear_growth_with_branch_one():
    v = framework.judge_rows(EXP, CFG, _rows(1.0, 0.7, 1.0), "quick")
    assert v.status == "holds", v.summary
    by = {r.part.name: r for r in v.judgement.parts}
    assert by["c-linear"].effect == pytest.approx(0.0, abs=0.02)  # c - 1
    assert by["doubling-none"].status == "holds"  # growth 2 per block, reported
    assert "branch" in v.finding and "skip variance" in v.finding


def test_parts_do_not_hold_when_the_slope_is_far_from_one_or_relu_above_one():
    assert framework.judge_rows(EXP, CFG, _rows(1.3, 0.7, 1.0), "quick").status == "does not hold"
    v = framework.judge_rows(EXP, CFG, _rows(1.0, 1.2, 1.0), "quick")
    assert v.status == "does not hold" and {r.part.name: r.status for r in v.judgement.parts}["c-relu"] == (
        "does not hold"
    )
    assert framework.judge_rows(EXP, CFG, _rows(1.0, 0.7, 0.6), "quick").status == "does not hold"


def test_parts_are_inconclusive_when_seeds_straddle_the_margin():
    c = [0.8, 1.3, 1.05, 0.9, 1.2, 1.0, 0.85, 1.25, 1.1, 0.95, 1.15, 1.05]
    v = framework.judge_rows(EXP, CFG, _rows(c, 0.7, 1.0), "quick")
    assert v.status == "inconclusive" and v.judgement.seeds == 12
