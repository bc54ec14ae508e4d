"""C15 ics: the smoke path end to end, the ICS summaries, the choice of k*, the verdict on synthetic rows."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from normlab.lab.experiments import get_experiment, run_experiment
from normlab.lab.experiments.framework import judge_rows
from normlab.lab.experiments.ics import PAPER, ICSConfig, arm, ics_mean, measure, paper_strength, shift_mean

PNG = b"\x89PNG\r\n\x1a\n"


def test_smoke_trains_probes_stores_judges_and_plots(tmp_path):
    exp = get_experiment("ics")
    assert exp.claim == "C15" and get_experiment("C15") is exp
    cfg = exp.scales["smoke"]
    res = run_experiment("ics", scale="smoke", root=tmp_path, progress=False, device="cpu")
    noisy_arms = {f"noisybatchnorm k={k:g}" for k in cfg.noise_strengths}
    assert {arm(r) for r in res.rows} == {"none", "batchnorm"} | noisy_arms
    assert len(res.rows) == (2 + len(cfg.noise_strengths)) * cfg.max_seeds
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
        assert "threads" not in r  # threads are never part of a run id
    noisy = [r for r in res.rows if r["norm"] == "noisybatchnorm"]
    assert all(r["norm_kwargs.strength"] == r["noise_strength"] for r in noisy)
    stored = json.loads(res.verdict_path.read_text())
    assert stored["claim"] == "C15" and stored["meaningful"] is False
    deciding = [p["name"] for p in stored["parts"] if p["decides"]]
    assert deciding == ["bn-helps", "noisy-bn-matches-bn", "ics-not-reduced-by-bn"]
    assert stored["numbers"]["k_star"] in cfg.noise_strengths
    assert {p.name for p in res.figures} == {"ics.png", "ics-strength.png", "parts.png"}
    assert all(p.read_bytes()[:8] == PNG for p in res.figures)


def test_ics_mean_skips_layers_without_predecessors_and_non_finite_values():
    row = {
        "ics_cosine": [[1.0, 0.5, 0.7], [1.0, 0.9, float("nan")]],
        "ics_preceding": [[0, 2, 4], [0, 2, 4]],
        "ics_l2": [[0.0, 2.0, 4.0], [0.0, 6.0, 8.0]],
    }
    assert ics_mean(row) == pytest.approx((0.5 + 0.7 + 0.9) / 3)
    assert ics_mean(row, "ics_l2") == pytest.approx(5.0)


def test_shift_mean_skips_the_first_layer():
    rng = np.random.default_rng(1)
    shifts = rng.uniform(0, 1, size=(4, 5))
    shifts[:, 0] = 0.0
    assert shift_mean({"shift_mean": shifts.tolist()}) == pytest.approx(shifts[:, 1:].mean(), rel=1e-12)
    assert math.isnan(shift_mean({}))


# --------------------------------------------------------------------------- synthetic rows

CFG = ICSConfig()


def _row(norm, k, seed, acc, cos, shift=(0.1, 0.1), diverged=False):
    return {
        "norm": norm,
        "noise_strength": k,
        "seed": seed,
        "diverged": diverged,
        "final_train_acc": acc,
        "final_test_acc": acc - 0.01,
        "ics_cosine": [[1.0, cos, cos]],
        "ics_preceding": [[0, 1, 2]],
        "ics_l2": [[0.0, 1.0, 1.0]],
        "ics_relative": [[0.0, 0.5, 0.5]],
        "shift_mean": [[0.0, shift[0], shift[0]]],
        "shift_log_var": [[0.0, shift[1], shift[1]]],
    }


def _rows(acc_by_k, *, bn=(0.98, 0.981, 0.979), none=(0.80, 0.82, 0.81), cos_bn=(0.800, 0.801, 0.800),
          cos_none=(0.801, 0.800, 0.800), shift_none=(0.1, 0.1), shift_by_k=None):  # fmt: skip
    """Rows of every arm for 3 seeds; noisy BN's per-step shift is 0.4 k in both moments unless given."""
    rows = []
    for s in range(3):
        rows.append(_row("batchnorm", None, s, bn[s], cos_bn[s], (0.01, 0.01)))
        rows.append(_row("none", None, s, none[s], cos_none[s], shift_none))
        for k, accs in acc_by_k.items():
            shift = (shift_by_k or {}).get(k, (0.4 * k, 0.4 * k))
            rows.append(_row("noisybatchnorm", k, s, accs[s], 0.7, shift))
    return rows


GOOD = {0.125: (0.98, 0.98, 0.979), 0.25: (0.979, 0.98, 0.978), 0.5: (0.95, 0.94, 0.95), 1.0: (0.58, 0.6, 0.57),
        2.0: (0.3, 0.32, 0.31)}  # fmt: skip


def _judge(rows):
    return judge_rows(get_experiment("ics"), CFG, rows, "quick")


def _status(v, name):
    return next(r.status for r in v.judgement.parts if r.part.name == name)


def test_k_star_is_the_weakest_noise_that_moves_layer_inputs_as_much_as_no_norm():
    per = [r for r in measure(_rows(GOOD), CFG) if r["arm"] != PAPER]
    # noisy shift 0.4 k in both moments vs no norm's 0.1: k = 0.25 is the first with 0.1 >= 0.1
    k, reached, shifts = paper_strength(per, CFG.seeds)
    assert (k, reached) == (0.25, True)
    assert shifts["none"] == {"mean": pytest.approx(0.1), "log_var": pytest.approx(0.1)}
    # both moments must reach it: a k that moves the mean but not the variance does not count
    rows = _rows(GOOD, shift_by_k={0.25: (0.2, 0.05)})
    per = [r for r in measure(rows, CFG) if r["arm"] != PAPER]
    assert paper_strength(per, CFG.seeds)[:2] == (0.5, True)
    # nothing reaches it: the largest k, flagged
    per = [r for r in measure(_rows(GOOD, shift_none=(9.0, 9.0)), CFG) if r["arm"] != PAPER]
    assert paper_strength(per, CFG.seeds)[:2] == (2.0, False)
    # k* is fixed by the first round: later seeds do not move it
    rows = _rows(GOOD) + [_row("none", None, 5, 0.8, 0.8, (50.0, 50.0))]
    per = [r for r in measure(rows, CFG) if r["arm"] != PAPER]
    assert paper_strength(per, CFG.seeds)[0] == 0.25


def test_measure_copies_the_k_star_runs_as_the_paper_arm_and_maps_divergence_to_none():
    rows = _rows(GOOD)
    rows.append(_row("noisybatchnorm", 0.25, 3, float("nan"), 0.7, (0.1, 0.1), diverged=True))
    per = measure(rows, CFG)
    paper = sorted((r for r in per if r["arm"] == PAPER), key=lambda r: r["seed"])
    assert [r["seed"] for r in paper] == [0, 1, 2, 3] and all(r["k"] == 0.25 for r in paper)
    assert [r["train_acc"] for r in paper[:3]] == list(GOOD[0.25]) and paper[3]["train_acc"] is None


def test_verdict_holds_when_noisy_bn_at_k_star_matches_bn_and_bn_leaves_ics_alone():
    v = _judge(_rows(GOOD))
    assert v.status == "holds", v.summary
    assert _status(v, "noisy-k1") == "does not hold"  # the curve: survival stops between k = 0.25 and 1
    assert "k* = 0.25" in v.finding and v.numbers["k_star"] == 0.25
    assert "neither reduces nor raises" in v.finding


def test_verdict_does_not_hold_when_bn_clearly_reduces_ics():
    v = _judge(_rows(GOOD, cos_bn=(0.95, 0.96, 0.95), cos_none=(0.84, 0.85, 0.83)))
    assert v.status == "does not hold"
    assert _status(v, "ics-not-reduced-by-bn") == "does not hold" and _status(v, "noisy-bn-matches-bn") == "holds"
    assert "BN reduces gradient-ICS here" in v.finding


def test_verdict_does_not_hold_when_noisy_bn_at_k_star_trains_much_worse():
    # noise has to reach k = 1 to move the layer inputs as much as no norm's: judged there
    v = _judge(_rows(GOOD, shift_none=(0.39, 0.39)))
    assert v.numbers["k_star"] == 1.0
    assert v.status == "does not hold" and _status(v, "noisy-bn-matches-bn") == "does not hold"


def test_verdict_inconclusive_when_the_gap_straddles_the_margin():
    acc = dict(GOOD)
    acc[0.25] = (0.97, 0.93, 0.975)  # noisy − BN per seed: -0.01, -0.051, -0.004: the interval holds -0.02
    v = _judge(_rows(acc))
    assert v.status == "inconclusive", v.summary
    assert _status(v, "noisy-bn-matches-bn") == "inconclusive"


def test_grid_rejects_bad_strengths():
    exp = get_experiment("ics")
    with pytest.raises(ValueError, match="positive"):
        exp.runs(ICSConfig(noise_strengths=()))
    with pytest.raises(ValueError, match="repeats"):
        exp.runs(ICSConfig(noise_strengths=(1.0, 1.0)))
