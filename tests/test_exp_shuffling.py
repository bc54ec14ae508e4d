"""C17 shuffling: the smoke path end to end (class-sorted batches reach the training loop), the per-seed drops,
and every outcome of the verdict on synthetic runs whose truth is known."""

from __future__ import annotations

import json

import numpy as np
import pytest

from normlab.lab.experiments import get_experiment, run_experiment
from normlab.lab.experiments.framework import judge_rows
from normlab.lab.experiments.shuffling import ORDERS, ShufflingConfig

PNG = b"\x89PNG\r\n\x1a\n"


def test_smoke_trains_stores_judges_and_draws(tmp_path):
    exp = get_experiment("C17")
    assert exp.name == "shuffling"
    cfg = exp.scales["smoke"]
    res = run_experiment("shuffling", scale="smoke", root=tmp_path, progress=False, device="cpu")
    assert len(res.rows) == len(cfg.norms) * len(ORDERS) * cfg.seeds
    v = json.loads(res.verdict_path.read_text())
    assert v["claim"] == "C17" and {p["name"] for p in v["parts"]} == {p.name for p in exp.parts(cfg)}
    assert "shuffled → class-sorted" in v["finding"]
    assert [p.name for p in res.figures] == ["shuffling.png", "parts.png"]
    assert all(p.read_bytes().startswith(PNG) for p in res.figures)
    for r in res.rows:
        assert r["batch_order"] in ORDERS
        assert ("precise_test_acc" in r) == (r["norm"] == "batchnorm")
        if r["norm"] == "batchnorm":
            assert r["precise_gain"] == pytest.approx(r["precise_test_acc"] - r["final_test_acc"])
        if r["norm"] == "groupnorm":
            assert r["norm_kwargs.num_groups"] == 4
    # the order changes training itself: same seed and initialisation, other batches, other losses
    for norm in cfg.norms:
        a, b = (next(r for r in res.rows if r["norm"] == norm and r["seed"] == 0 and r["batch_order"] == o)
                for o in ORDERS)  # fmt: skip
        assert a["step_loss"][0] != b["step_loss"][0] or a["step_loss"][1:] != b["step_loss"][1:]


# --------------------------------------------------------------------------- the verdict on synthetic runs

CFG = ShufflingConfig(seeds=6, max_seeds=6)


def _raw(drop: dict, repair: float, seeds: int = 6) -> list[dict]:
    """Runs as stored: class-sorted batches cost ``drop[norm]``; precise statistics give BN back ``repair``."""
    rng = np.random.default_rng(11)
    rows = []
    for seed in range(seeds):
        for norm in CFG.norms:
            base = 0.9 + 0.01 * rng.standard_normal()
            for order in ORDERS:
                acc = base - (drop[norm] if order == "class-sorted" else 0.0) + 0.004 * rng.standard_normal()
                r = {"seed": seed, "norm": norm, "batch_order": order, "final_test_acc": acc}
                if norm == "batchnorm":
                    gain = (repair if order == "class-sorted" else 0.0) + 0.004 * rng.standard_normal()
                    r.update(precise_test_acc=acc + gain, precise_gain=gain, train_mode_test_acc=0.5)
                rows.append(r)
    return rows


DROPS = {"batchnorm": 0.4, "layernorm": 0.05, "groupnorm": 0.06, "none": 0.04}


def _verdict(rows):
    return judge_rows(get_experiment("shuffling"), CFG, rows, "quick")


def _status(v, name):
    return next(r.status for r in v.judgement.parts if r.part.name == name)


def test_measure_gives_each_norms_drop_per_seed():
    rows = _raw(DROPS, 0.2)
    per = get_experiment("shuffling").measure(rows, CFG)
    by = {(r["seed"], r["norm"], r["batch_order"]): r for r in rows}
    d = next(r for r in per if r["kind"] == "drop" and r["seed"] == 4 and r["norm"] == "batchnorm")
    shuffled, ordered = by[4, "batchnorm", "shuffled"], by[4, "batchnorm", "class-sorted"]
    assert d["drop"] == pytest.approx(shuffled["final_test_acc"] - ordered["final_test_acc"])
    assert d["drop_after_precise"] == pytest.approx(shuffled["final_test_acc"] - ordered["precise_test_acc"])
    assert "drop_after_precise" not in next(r for r in per if r["kind"] == "drop" and r["norm"] == "none")


def test_holds_when_bn_loses_most_and_precise_statistics_repair_part():
    v = _verdict(_raw(DROPS, 0.2))
    assert v.status == "holds", v.summary
    assert _status(v, "precise-repair-is-partial") == "holds"
    assert "repairing" in v.finding


def test_does_not_hold_when_every_norm_loses_alike():
    v = _verdict(_raw({**DROPS, "layernorm": 0.4, "groupnorm": 0.41}, 0.2))
    assert v.status == "does not hold" and _status(v, "bn-loses-more-than-ln") == "does not hold", v.summary


def test_does_not_hold_when_precise_statistics_do_not_help():
    v = _verdict(_raw(DROPS, 0.0))
    assert v.status == "does not hold" and _status(v, "precise-repairs") == "does not hold", v.summary
    assert "BN's loss is not in its statistics" in v.finding  # precise = running = train-mode accuracy (0.5)


def test_the_finding_says_when_bn_loses_less_than_the_batch_independent_norms():
    v = _verdict(_raw({**DROPS, "batchnorm": 0.02}, 0.0))
    assert v.status == "does not hold" and "cost BN *less* than LayerNorm and GroupNorm" in v.finding


def test_inconclusive_when_the_drops_are_noisy_and_close():
    rows = _raw({**DROPS, "layernorm": 0.38}, 0.2)
    rng = np.random.default_rng(2)
    for r in rows:
        if r["norm"] == "layernorm" and r["batch_order"] == "class-sorted":
            r["final_test_acc"] += 0.05 * rng.standard_normal()
    v = _verdict(rows)
    assert v.status == "inconclusive" and _status(v, "bn-loses-more-than-ln") == "inconclusive", v.summary


def test_config_needs_bn_first_and_the_batch_independent_norms():
    with pytest.raises(ValueError, match="start with batchnorm"):
        ShufflingConfig(norms=("layernorm", "batchnorm", "groupnorm", "none"))
