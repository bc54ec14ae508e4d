"""C15 ics: the smoke path end to end, the ICS summary, and the verdict rule on synthetic run tables."""

from __future__ import annotations

import json
import math

import pytest

from normlab.lab.experiments import STATUSES, get_experiment, run_experiment
from normlab.lab.experiments.ics import ICSConfig, arm, ics_mean, shift_mean

PNG = b"\x89PNG\r\n\x1a\n"


def test_smoke_trains_probes_stores_analyses_and_plots(tmp_path):
    exp = get_experiment("ics")
    assert exp.claim == "C15"
    cfg = exp.scales["smoke"]
    res = run_experiment("ics", scale="smoke", root=tmp_path, progress=False)
    assert res.verdict.status in STATUSES and "\n" not in res.verdict.summary
    assert {r["norm"] for r in res.rows} == set(cfg.norms)
    noisy_arms = {f"noisybatchnorm k={k:g}" for k in cfg.noise_strengths}
    assert {arm(r) for r in res.rows} == {"none", "batchnorm"} | noisy_arms
    assert len(res.rows) == (2 + len(cfg.noise_strengths)) * cfg.seeds
    for r in res.rows:
        assert r["probe_steps"][0] == 1 and len(r["probe_steps"]) == cfg.epochs + 1
        n_layers = cfg.depth + 1
        assert r["ics_layers"][0] == "blocks.0.linear" and len(r["ics_layers"]) == n_layers
        # the first Linear layer has nothing preceding it: G' = G exactly
        first = [(per[0], l2[0], c[0]) for per, l2, c in zip(r["ics_preceding"], r["ics_l2"], r["ics_cosine"])]
        assert all(p == 0 and l2 == 0.0 and c == pytest.approx(1.0) for p, l2, c in first)
        assert all(-1.0 - 1e-9 <= c <= 1.0 + 1e-9 for per in r["ics_cosine"] for c in per)
        # distributional shift one step after every probe point but the last (no step follows the last epoch)
        assert r["shift_steps"] == r["probe_steps"][:-1] and len(r["shift_layers"]) == n_layers
        assert all(per[0] == 0.0 for per in r["shift_mean"])  # the first layer's input is the (fixed) data
    noisy = [r for r in res.rows if r["norm"] == "noisybatchnorm"]
    assert noisy and all(r["norm_kwargs.noise_mean"] == cfg.noise_mean for r in noisy)
    assert all(r["norm_kwargs.strength"] == r["noise_strength"] for r in noisy)
    assert json.loads(res.verdict_path.read_text())["status"] == res.verdict.status
    assert res.figures and all(p.read_bytes()[:8] == PNG for p in res.figures)


def test_ics_mean_skips_layers_without_predecessors_and_non_finite_values():
    row = {
        "ics_cosine": [[1.0, 0.5, 0.7], [1.0, 0.9, float("nan")]],
        "ics_preceding": [[0, 2, 4], [0, 2, 4]],
        "ics_l2": [[0.0, 2.0, 4.0], [0.0, 6.0, 8.0]],
    }
    assert ics_mean(row) == pytest.approx((0.5 + 0.7 + 0.9) / 3)
    assert ics_mean(row, "ics_l2") == pytest.approx(5.0)


def _rows(table: dict[str, list[tuple[float, float]]]) -> list[dict]:
    """arm ("none", "batchnorm", "noisybatchnorm k=<k>") -> per seed (final training accuracy, mean cos(G, G'))."""
    rows = []
    for name, per_seed in table.items():
        norm, _, k = name.partition(" k=")
        for seed, (acc, cos) in enumerate(per_seed):
            rows.append(
                {
                    "norm": norm,
                    "noise_strength": float(k) if k else None,
                    "seed": seed,
                    "final_train_acc": acc,
                    "final_test_acc": acc - 0.01,
                    "ics_cosine": [[1.0, cos, cos]],
                    "ics_preceding": [[0, 1, 2]],
                    "ics_l2": [[0.0, 1.0, 1.0]],
                    "ics_relative": [[0.0, 0.5, 0.5]],
                }
            )
    return rows


def _analyse(rows):
    return get_experiment("ics").call_analyse(rows, ICSConfig())


def test_verdict_holds_when_noisy_bn_matches_bn_and_bn_does_not_reduce_ics():
    v = _analyse(
        _rows(
            {
                "none": [(0.80, 0.90), (0.82, 0.91), (0.81, 0.92)],
                "batchnorm": [(0.95, 0.80), (0.96, 0.82), (0.95, 0.81)],
                "noisybatchnorm k=1": [(0.95, 0.70), (0.955, 0.72), (0.96, 0.71)],
            }
        )
    )
    assert v.status == "holds", v.summary
    assert v.numbers["ics_cosine"]["batchnorm"]["mean"] == pytest.approx(0.81)


def test_verdict_does_not_hold_when_bn_clearly_reduces_ics():
    v = _analyse(
        _rows(
            {
                "none": [(0.80, 0.50), (0.82, 0.55), (0.81, 0.52)],
                "batchnorm": [(0.95, 0.95), (0.96, 0.96), (0.95, 0.94)],
                "noisybatchnorm k=1": [(0.95, 0.90), (0.955, 0.90), (0.96, 0.91)],
            }
        )
    )
    assert v.status == "does not hold"
    assert v.numbers["ICS not lower with BN"]["status"] == "does not hold"
    assert v.numbers["noisy BN ≈ BN"]["status"] == "holds"


def test_verdict_does_not_hold_when_noisy_bn_trains_much_worse():
    v = _analyse(
        _rows(
            {
                "none": [(0.80, 0.90), (0.82, 0.91), (0.81, 0.92)],
                "batchnorm": [(0.95, 0.80), (0.96, 0.82), (0.95, 0.81)],
                "noisybatchnorm k=1": [(0.60, 0.70), (0.62, 0.72), (0.65, 0.71)],
            }
        )
    )
    assert v.status == "does not hold" and v.numbers["noisy BN ≈ BN"]["status"] == "does not hold"


def test_verdict_inconclusive_when_spread_straddles_the_tolerances():
    v = _analyse(
        _rows(
            {
                "none": [(0.80, 0.80), (0.82, 0.80), (0.81, 0.80)],
                "batchnorm": [(0.95, 0.75), (0.96, 0.85), (0.95, 0.95)],  # BN − none: -0.05, 0.05, 0.15 -> 0.05 ± 0.1
                "noisybatchnorm k=1": [(0.95, 0.70), (0.92, 0.72), (0.98, 0.71)],
            }
        )
    )
    assert v.status == "inconclusive", v.summary


def test_norms_must_include_both_sides():
    with pytest.raises(ValueError, match="batchnorm"):
        get_experiment("ics").runs(ICSConfig(norms=("none", "noisybatchnorm")))


def test_noisy_part_is_judged_at_the_strongest_noise():
    table = {
        "none": [(0.80, 0.90), (0.82, 0.91), (0.81, 0.92)],
        "batchnorm": [(0.95, 0.80), (0.96, 0.82), (0.95, 0.81)],
        "noisybatchnorm k=0.25": [(0.95, 0.70), (0.955, 0.72), (0.96, 0.71)],
        "noisybatchnorm k=1": [(0.60, 0.70), (0.62, 0.72), (0.65, 0.71)],
    }
    v = _analyse(_rows(table))
    assert v.numbers["noisy BN ≈ BN"]["status"] == "does not hold" and "k=1" in v.numbers["noisy BN ≈ BN"]["metric"]
    assert v.numbers["train_acc"]["noisybatchnorm k=0.25"]["mean"] == pytest.approx(0.955)
    del table["noisybatchnorm k=1"]
    assert _analyse(_rows(table)).numbers["noisy BN ≈ BN"]["status"] == "holds"


def test_shift_mean_skips_the_first_layer():
    row = {"shift_mean": [[0.0, 0.2, 0.4], [0.0, 0.6, float("nan")]]}
    assert shift_mean(row) == pytest.approx(0.4)
    assert math.isnan(shift_mean({}))
