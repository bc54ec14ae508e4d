"""C14 saturation: the smoke path end to end, the per-run summaries, and the verdict rule on synthetic run tables."""

from __future__ import annotations

import json
import math

import pytest

from normlab.lab.experiments import STATUSES, get_experiment, run_experiment
from normlab.lab.experiments.saturation import SaturationConfig, grad_drift, grad_spread, saturated_mean

PNG = b"\x89PNG\r\n\x1a\n"


def test_smoke_trains_probes_stores_analyses_and_plots(tmp_path):
    exp = get_experiment("saturation")
    assert exp.claim == "C14"
    cfg = exp.scales["smoke"]
    res = run_experiment("saturation", scale="smoke", root=tmp_path, progress=False)
    assert res.verdict.status in STATUSES and "\n" not in res.verdict.summary
    assert len(res.rows) == len(cfg.activations) * len(cfg.norms) * cfg.seeds
    for r in res.rows:
        # step 1 and the end of every epoch
        assert r["probe_steps"][0] == 1 and len(r["probe_steps"]) == cfg.epochs + 1
        assert len(r["saturated"][0]) == cfg.depth  # one entry per activation layer
        assert len(r["grad_norm"][0]) == cfg.depth + 1  # hidden Linear layers + classifier
        assert all(0.0 <= f <= 1.0 for per in r["saturated"] for f in per)
        assert all(g >= 0 for per in r["grad_norm"] for g in per)
    assert json.loads(res.verdict_path.read_text())["status"] == res.verdict.status
    assert res.figures and all(p.read_bytes()[:8] == PNG for p in res.figures)


def test_per_run_summaries():
    row = {"saturated": [[0.0, 0.2], [0.4, 0.2]], "grad_norm": [[1.0, 10.0, 100.0], [1.0, 1.0, 1000.0]]}
    assert saturated_mean(row) == pytest.approx(0.2)
    assert grad_spread(row) == pytest.approx((2.0 + 3.0) / 2)
    # per layer: log10 over time (0, 0), (1, 0), (2, 3) -> stds 0, 0.707, 0.707
    assert grad_drift(row) == pytest.approx((0 + math.sqrt(0.5) + math.sqrt(0.5)) / 3)
    # a diverged checkpoint (non-finite norms) is skipped
    row["grad_norm"].append([float("nan"), 1.0, 1.0])
    assert grad_spread(row) == pytest.approx(2.5)


def _rows(table: dict[tuple[str, str], list[tuple[float, float]]]) -> list[dict]:
    """(activation, norm) -> per seed (saturated fraction, decades of gradient spread)."""
    rows = []
    for (act, norm), per_seed in table.items():
        for seed, (sat, decades) in enumerate(per_seed):
            rows.append(
                {
                    "activation": act,
                    "norm": norm,
                    "seed": seed,
                    "final_test_acc": 0.5,
                    "probe_steps": [1, 10],
                    "saturated": [[sat, sat], [sat, sat]],
                    "grad_norm": [[1.0, 10.0**decades], [1.0, 10.0**decades]],
                }
            )
    return rows


def _analyse(rows):
    return get_experiment("saturation").call_analyse(rows, SaturationConfig())


def test_verdict_holds_when_bn_has_fewer_saturated_units_and_smaller_spread():
    v = _analyse(
        _rows(
            {
                ("sigmoid", "batchnorm"): [(0.01, 0.3), (0.02, 0.35), (0.01, 0.32)],
                ("sigmoid", "none"): [(0.30, 4.0), (0.35, 4.2), (0.32, 3.9)],
                ("tanh", "batchnorm"): [(0.01, 0.3), (0.01, 0.3), (0.02, 0.4)],
                ("tanh", "none"): [(0.20, 1.0), (0.25, 1.2), (0.22, 1.1)],
            }
        )
    )
    assert v.status == "holds", v.summary


def test_verdict_does_not_hold_when_bn_saturates_more():
    v = _analyse(
        _rows(
            {
                ("sigmoid", "batchnorm"): [(0.30, 0.3), (0.32, 0.35), (0.31, 0.32)],
                ("sigmoid", "none"): [(0.01, 4.0), (0.02, 4.2), (0.01, 3.9)],
            }
        )
    )
    assert v.status == "does not hold" and v.numbers["sigmoid saturated"]["status"] == "does not hold"


def test_verdict_inconclusive_when_nothing_saturates():
    v = _analyse(
        _rows(
            {
                ("sigmoid", "batchnorm"): [(0.0, 0.3), (0.0, 0.35), (0.0, 0.32)],
                ("sigmoid", "none"): [(0.0, 4.0), (0.0, 4.2), (0.0, 3.9)],
            }
        )
    )
    assert v.status == "inconclusive"
    assert v.numbers["sigmoid saturated"]["status"] == "inconclusive"
    assert v.numbers["sigmoid grad spread"]["status"] == "holds"
