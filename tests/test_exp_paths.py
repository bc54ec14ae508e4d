"""C10 paths: the smoke path end to end, and the verdict rule on synthetic rows."""

from __future__ import annotations

import json

import numpy as np
import pytest

from normlab.lab.experiments import get_experiment, run_experiment
from normlab.lab.experiments.residual_paths import PathsConfig
from normlab.lab.probes import paths as P

PNG = b"\x89PNG\r\n\x1a\n"


def test_smoke_path_end_to_end(tmp_path):
    exp = get_experiment("C10")
    assert exp.name == "paths"
    res = run_experiment("paths", scale="smoke", root=tmp_path, progress=False)
    cfg = exp.scales["smoke"]
    assert len(res.rows) == (len(cfg.depths) + len(cfg.net_activations)) * cfg.seeds
    assert res.verdict.status in ("holds", "does not hold", "inconclusive")
    for r in res.rows:
        if r["kind"] == "analytic":
            total = sum(r["distribution"]) + r["distribution_tail"]
            assert total == pytest.approx(1.0, abs=1e-12)
            assert sum(r["sim_distribution"]) + r["sim_distribution_tail"] == pytest.approx(1.0)
        else:
            assert len(r["measured_share"]) == cfg.net_depth
            assert all(0 < p < 1 for p in r["measured_share"])
    top = next(r for r in res.rows if r["kind"] == "analytic" and r["d"] == 10000)
    assert top["analytic_share_at_k"] == pytest.approx(P.cumulative_share(P.bn_path_distribution(10000))[15])
    assert json.loads((tmp_path / "paths" / "verdict.json").read_text())["status"] == res.verdict.status
    assert res.figures and all(p.read_bytes()[:8] == PNG for p in res.figures)


# --------------------------------------------------------------------------- the verdict rule

CFG = PathsConfig()
ANALYSE = get_experiment("paths").analyse


def _analytic_rows(k_for_share=14, sim_shift=0.0, d=10000, seeds=3, num_paths=20000):
    dist = P.bn_path_distribution(d)
    cum = P.cumulative_share(dist)
    shares = P.branch_shares(d)
    rows = []
    for s in range(seeds):
        rows.append(
            {
                "kind": "analytic",
                "d": d,
                "seed": s,
                "num_paths": num_paths,
                "analytic_share_at_k": float(cum[15]),
                "analytic_k_for_share": k_for_share,
                "analytic_mean_length": P.mean_path_length(dist),
                "analytic_length_variance": float(np.sum(shares * (1 - shares))),
                "unnormalised_mean_length": d / 2,
                "sim_share_at_k": float(cum[15]) + sim_shift,
                "sim_mean_length": P.mean_path_length(dist),
            }
        )
    return rows


def _network_rows(errors=(0.05, 0.07, 0.06)):
    return [
        {
            "kind": "network",
            "activation": "relu",
            "d": 100,
            "seed": s,
            "median_rel_error": e,
            "median_rel_error_textbook": 0.1,
            "measured_k_for_share": 8,
            "analytic_k_for_share": 8,
        }
        for s, e in enumerate(errors)
    ]


def test_verdict_holds_when_analysis_simulation_and_network_agree_with_the_claim():
    v = ANALYSE(_analytic_rows() + _network_rows(), CFG)
    assert v.status == "holds", v.summary
    assert "98.5" in v.summary  # <= 15 branches carry 98.53 % at d = 10,000


def test_verdict_does_not_hold_when_the_analytic_k_is_far_from_15():
    assert ANALYSE(_analytic_rows(k_for_share=40) + _network_rows(), CFG).status == "does not hold"


def test_verdict_does_not_hold_when_the_simulation_disagrees_with_the_analysis():
    v = ANALYSE(_analytic_rows(sim_shift=-0.02) + _network_rows(), CFG)
    assert v.status == "does not hold"
    assert v.numbers["simulation"]["status"] == "does not hold"


def test_verdict_is_inconclusive_when_the_network_error_straddles_the_tolerance():
    assert ANALYSE(_analytic_rows() + _network_rows(errors=(0.05, 0.35, 0.2)), CFG).status == "inconclusive"
