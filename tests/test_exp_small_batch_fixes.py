"""C13 ``small-batch-fixes``: smoke path end to end, Ghost BN is BN at tiny batch, the verdict on synthetic rows."""

from __future__ import annotations

import json

import pytest
from _batch_rows import rows_for

from normlab.lab.config import TrainConfig
from normlab.lab.experiments import get_experiment, run_experiment
from normlab.lab.experiments.framework import judge_rows
from normlab.lab.train import train

PNG = b"\x89PNG\r\n\x1a\n"


def test_smoke_end_to_end(tmp_path):
    exp = get_experiment("C13")
    res = run_experiment("small-batch-fixes", scale="smoke", root=tmp_path, progress=False, device="cpu")
    cfg = res.config
    assert len(res.rows) == len(res.ran) == len(list(exp.grid(cfg))) * cfg.max_seeds
    stored = json.loads(res.verdict_path.read_text())
    assert stored["claim"] == "C13" and stored["meaningful"] is False
    names = {p["name"] for p in stored["parts"]}
    assert names == {"renorm-narrows", "groupnorm-narrows", "precise-narrows", "bn-gap", "ghost-at-large"}
    assert {p["name"] for p in stored["parts"] if p["decides"]} == {"renorm-narrows", "groupnorm-narrows",
                                                                     "precise-narrows"}  # fmt: skip
    assert {p.name for p in res.figures} == {"small-batch-fixes.png", "parts.png"}
    assert all(p.read_bytes()[:8] == PNG for p in res.figures)
    brn = [r for r in res.rows if r["norm"] == "batchrenorm"]
    assert brn and all(r["norm_kwargs.r_max_warmup"][1] <= r["steps"] for r in brn), "warm-up fits in the run"


def test_ghost_bn_at_a_batch_no_larger_than_its_virtual_batch_is_bn_step_by_step():
    base = dict(dataset="digits", n_train=64, model="mlp", model_kwargs={"width": 16, "depth": 2}, optimizer="sgd",
                lr=0.01, batch_size=2, epochs=1, max_steps=20, seed=3, device="cpu")  # fmt: skip
    bn = train(TrainConfig(norm="batchnorm", **base))
    ghost = train(TrainConfig(norm="ghostbatchnorm", norm_kwargs={"virtual_batch_size": 32}, **base))
    assert ghost.step_loss == pytest.approx(bn.step_loss, rel=1e-6, abs=1e-7)
    assert ghost.final["test_acc"] == bn.final["test_acc"]


# --------------------------------------------------------------------------- the verdict on synthetic rows


def c13_rows(brn: float, gn: float, precise: float, seeds: int = 12, noise: float = 0.004):
    """MLP at batch 2: BN 0.40 (0.97 at batch 32); each fix at the given accuracy; BN's precise statistics."""
    acc = {
        ("mlp", "batchnorm", 2, 3): 0.40,
        ("mlp", "batchrenorm", 2, 3): brn,
        ("mlp", "groupnorm", 2, 3): gn,
        ("mlp", "batchnorm", 32, 3): 0.97,
        ("cnn", "batchnorm", 256, 20): 0.98,
        ("cnn", "ghostbatchnorm", 256, 20): 0.985,
    }
    rows = rows_for(acc, seeds, noise)
    for r in rows:
        if r["norm"] == "batchnorm":
            r["precise_test_acc"] = r["final_test_acc"] + (precise - 0.40 if r["batch_size"] == 2 else 0.0)
    return rows


def _verdict(rows):
    exp = get_experiment("small-batch-fixes")
    return judge_rows(exp, exp.config_for("quick"), rows, "quick")


def test_measure_pairs_each_fix_with_bn_and_computes_the_gap():
    rows = c13_rows(0.8, 0.9, 0.5, seeds=3)
    per_seed = get_experiment("small-batch-fixes").measure(rows, get_experiment("C13").config_for("quick"))
    acc = {(r["model"], r["norm"], r["batch_size"], r["seed"]): r for r in rows}
    for r in per_seed:
        s = r["seed"]
        if r["setting"] == "gap":
            assert r["gap"] == pytest.approx(
                acc[("mlp", "batchnorm", 32, s)]["final_test_acc"] - acc[("mlp", "batchnorm", 2, s)]["final_test_acc"]
            )
        elif r["variant"] == "precise":
            assert r["acc"] == acc[("mlp", "batchnorm", 2, s)]["precise_test_acc"]
    assert sorted({(r["setting"], r["variant"]) for r in per_seed}) == [
        ("gap", "batchnorm"), ("large", "batchnorm"), ("large", "ghostbatchnorm"), ("tiny", "batchnorm"),
        ("tiny", "batchrenorm"), ("tiny", "groupnorm"), ("tiny", "precise")]  # fmt: skip


def test_verdict_holds_when_every_fix_beats_bn_at_tiny_batch():
    v = _verdict(c13_rows(brn=0.80, gn=0.95, precise=0.50))
    assert v.status == "holds", v.summary
    assert v.numbers["closed"]["groupnorm"] == pytest.approx((0.95 - 0.40) / (0.97 - 0.40), abs=0.02)
    assert "Ghost BN computes plain BN" in v.finding


def test_verdict_does_not_hold_when_a_fix_does_nothing():
    v = _verdict(c13_rows(brn=0.80, gn=0.95, precise=0.40, noise=0.003))
    assert v.status == "does not hold", v.summary
    assert {r.part.name: r.status for r in v.judgement.deciding}["precise-narrows"] == "does not hold"


def test_verdict_inconclusive_when_seeds_are_too_noisy():
    v = _verdict(c13_rows(brn=0.43, gn=0.95, precise=0.50, noise=0.06))
    assert v.status == "inconclusive", v.summary
