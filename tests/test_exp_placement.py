"""C6 placement: the smoke path end to end, the speed metric, S0's input term against a numpy oracle, and every
outcome of the verdict on synthetic runs whose truth is known."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from torch import nn

from normlab.lab.experiments import get_experiment, run_experiment
from normlab.lab.experiments.framework import judge_rows
from normlab.lab.experiments.placement import PlacementConfig, capped_mean_loss, input_terms
from normlab.lab.experiments.verdicts import arm_values

PNG = b"\x89PNG\r\n\x1a\n"


def test_smoke_trains_stores_judges_and_draws(tmp_path):
    exp = get_experiment("C6")
    assert exp.name == "placement"
    cfg = exp.scales["smoke"]
    res = run_experiment("placement", scale="smoke", root=tmp_path, progress=False, device="cpu")
    assert len(res.rows) == len(list(exp.grid(cfg))) * cfg.seeds
    v = json.loads(res.verdict_path.read_text())
    assert v["claim"] == "C6" and {p["name"] for p in v["parts"]} == {p.name for p in exp.parts(cfg)}
    assert "fastest" in v["finding"] and "input term" in v["finding"]
    assert [p.name for p in res.figures] == ["placement.png", "parts.png"]
    assert all(p.read_bytes().startswith(PNG) for p in res.figures)
    assert {r["placement"] for r in res.rows} == {"before_linear", "pre_act", "post_act", "no norm"}
    for r in res.rows:
        assert r["model_kwargs.norm_position"] == (r["placement"] if r["placement"] != "no norm" else "pre_act")
        assert r["norm"] == ("none" if r["placement"] == "no norm" else "batchnorm")
        assert 0 < r["capped_mean_loss"] <= r["chance_loss"] + 1e-12
        assert r["scheduled_steps"] == 256 // 32  # digits, 256 examples, batch 32, 1 epoch
        assert len(r["input_terms"]) == len(cfg.channels)
        if not r["diverged"]:
            terms = [t[0] for t in r["input_terms"]]
            assert r["input_term"] == pytest.approx(math.exp(np.mean(np.log(terms))))


def test_capped_mean_loss_caps_spikes_and_counts_missing_steps_as_chance():
    assert capped_mean_loss([1.0, 0.5], 2, 2.3) == pytest.approx(0.75)
    assert capped_mean_loss([1.0, 1e6], 2, 2.0) == pytest.approx(1.5)  # a spike counts as chance, not as 1e6
    assert capped_mean_loss([1.0, math.nan], 4, 2.0) == pytest.approx((1.0 + 2.0 * 3) / 4)  # diverged at step 1
    with pytest.raises(ValueError):
        capped_mean_loss([1.0], 0, 2.0)


def _patch_moments(x: np.ndarray, k: int, pad: int) -> tuple[float, float]:
    """numpy oracle: E[p pᵀ] over every example and output position of a stride-1 conv (1-D or 2-D)."""
    spatial = x.shape[2:]
    xp = np.pad(x, [(0, 0), (0, 0)] + [(pad, pad)] * len(spatial))
    rows = []
    for n in range(x.shape[0]):
        for pos in np.ndindex(*spatial):
            window = xp[(n, slice(None)) + tuple(slice(i, i + k) for i in pos)]
            rows.append(window.reshape(-1))  # (C * k^ndim): channel-major, then taps
    p = np.array(rows)
    m = p.T @ p / len(p)
    return np.abs(m).sum() / len(m), np.trace(m) / len(m)


@pytest.mark.parametrize("ndim", [1, 2])
def test_input_terms_match_a_numpy_oracle_on_the_convs_inputs(ndim):
    torch.manual_seed(0)
    conv = nn.Conv1d if ndim == 1 else nn.Conv2d
    model = nn.Sequential(conv(2, 3, 3, padding=1), nn.ReLU(), conv(3, 4, 3, padding=1))
    x = torch.randn(5, 2, *([6] * ndim)) + 0.5
    terms = input_terms(model.train(), x)
    assert model.training  # the mode is restored
    with torch.no_grad():
        h = torch.relu(model[0](x))
    for got, inp in zip(terms, (x, h)):
        want = _patch_moments(inp.double().numpy(), 3, 1)
        assert got == pytest.approx(want, rel=1e-10)


# --------------------------------------------------------------------------- the verdict on synthetic runs

CFG = PlacementConfig(seeds=6, max_seeds=6)


def _raw(term: dict, loss: dict, seeds: int = 6, trace: dict | None = None) -> list[dict]:
    """Runs as run_one stores them: ``term[placement]`` (lr 0.05) and ``loss[(placement, lr)]`` are mean values."""
    trace = trace or {}
    rng = np.random.default_rng(3)
    rows = []
    for seed in range(seeds):
        for lr in (0.05, 0.5):
            for p in ("before_linear", "pre_act", "post_act", "no norm"):
                x = loss[(p, lr)] * math.exp(0.02 * rng.standard_normal())
                t = term.get(p, 8.0) * (1 + 0.05 * seed)
                rows.append({"seed": seed, "lr": lr, "placement": p, "capped_mean_loss": x, "diverged": False,
                             "final_test_acc": 1 - x / 3, "input_term": t,
                             "input_trace": trace.get(p, 1.0)})  # fmt: skip
    return rows


TERM = {"before_linear": 2.0, "pre_act": 6.0, "post_act": 5.0}
FAST = {(p, lr): 0.3 for p in ("pre_act", "post_act", "no norm") for lr in (0.05, 0.5)} | {
    ("before_linear", 0.05): 0.3, ("before_linear", 0.5): 0.2,
}  # fmt: skip


def _verdict(rows):
    return judge_rows(get_experiment("placement"), CFG, rows, "quick")


def _status(v, name):
    return next(r.status for r in v.judgement.parts if r.part.name == name)


def test_holds_when_the_input_term_is_smaller_and_training_faster_at_the_high_lr():
    v = _verdict(_raw(TERM, FAST))
    assert v.status == "holds", v.summary
    assert _status(v, "faster-at-moderate-lr") == "does not hold"  # equal speed: reported, never deciding


def test_does_not_hold_when_the_common_placement_trains_faster():
    v = _verdict(_raw(TERM, FAST | {("before_linear", 0.5): 0.45}))
    assert v.status == "does not hold" and _status(v, "faster-at-high-lr") == "does not hold", v.summary


def test_the_finding_separates_centring_from_scale_when_the_raw_term_is_larger():
    # BN before the conv: raw term 8 with mean square 2; common: 6 with mean square 1 (both ×1.125 over the seeds)
    v = _verdict(_raw(TERM | {"before_linear": 8.0}, FAST, trace={"before_linear": 2.0, "pre_act": 1.0}))
    assert _status(v, "input-term-smaller") == "does not hold"
    assert (
        "centres the convs' inputs (term/trace 4.5 vs 6.75)" in v.finding
        and "so S0's raw term ends up larger" in v.finding
    )


def test_does_not_hold_when_the_input_terms_are_alike():
    v = _verdict(_raw(TERM | {"before_linear": 6.1}, FAST))
    assert v.status == "does not hold" and _status(v, "input-term-smaller") == "does not hold", v.summary


def test_inconclusive_when_one_seed_diverges():
    rows = _raw(TERM, FAST)
    for r in rows:
        if r["placement"] == "before_linear" and r["lr"] == 0.5 and r["seed"] == 2:
            r["capped_mean_loss"], r["diverged"] = math.log(10), True  # counted as knowing nothing, not dropped
    v = _verdict(rows)
    assert v.status == "inconclusive" and _status(v, "faster-at-high-lr") == "inconclusive", v.summary


def test_a_diverged_input_term_counts_as_declared():
    rows = _raw(TERM, FAST)
    rows[0]["input_term"] = None  # before_linear, lr 0.05, seed 0: weights diverged
    part = next(p for p in get_experiment("placement").parts(CFG) if p.name == "input-term-smaller")
    assert arm_values(part, rows, part.a)[0] == 1e6 and arm_values(part, rows, part.a)[1] == pytest.approx(2.1)
    v = _verdict(rows)  # judged, never dropped: one seed far on the wrong side leaves the part undecided
    assert _status(v, "input-term-smaller") == "inconclusive"


def test_config_needs_the_three_placements_and_two_lrs():
    with pytest.raises(ValueError, match="before_linear"):
        PlacementConfig(positions=("pre_act", "post_act"))
    with pytest.raises(ValueError, match="moderate"):
        PlacementConfig(lrs=(0.5, 0.05))
