"""C2 ``batch-size``: smoke path end to end, the budget rule, per-seed values, the verdict on synthetic rows."""

from __future__ import annotations

import json
import math

import pytest
from _batch_rows import rows_for

from normlab.lab.experiments import get_experiment, run_experiment
from normlab.lab.experiments.batch_size import (
    CHANCE,
    BatchSizeConfig,
    by_seed,
    norm_kwargs,
    point,
    stat_counts,
    train_size,
)
from normlab.lab.experiments.framework import judge_rows
from normlab.lab.store import run_id

PNG = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- smoke path


def test_smoke_end_to_end_stores_judges_draws_and_resumes(tmp_path):
    exp = get_experiment("C2")
    assert exp.name == "batch-size"
    res = run_experiment("batch-size", scale="smoke", root=tmp_path, progress=False, device="cpu")
    cfg = res.config
    assert len(res.rows) == len(res.ran) == len(list(exp.grid(cfg))) * cfg.max_seeds
    stored = json.loads(res.verdict_path.read_text())
    assert stored["claim"] == "C2" and stored["meaningful"] is False and stored["status"] == res.verdict.status
    assert {p["name"] for p in stored["parts"]} == {p.name for p in exp.declared_parts(cfg)}
    assert "Pre-registration" not in stored["preregistration"] and "bn-loses-more-mlp" in stored["preregistration"]
    assert {p.name for p in res.figures} == {"batch-size.png", "parts.png"}
    assert all(p.read_bytes()[:8] == PNG for p in res.figures)
    for r in res.rows:
        steps_per_epoch = train_size(cfg) // r["batch_size"]
        assert r["steps"] == r["epochs"] * steps_per_epoch, "equal epochs: every example seen equally often"
        assert r["lr"] == pytest.approx(cfg.lr * r["batch_size"] / cfg.reference_batch)
        assert ("precise_test_acc" in r) == (r["norm"] == "batchnorm"), "precise statistics only where BN layers are"
        assert 0.0 <= r["train_eval_acc"] <= 1.0
    again = run_experiment("batch-size", scale="smoke", root=tmp_path, progress=False, device="cpu")
    assert again.ran == [] and len(again.skipped) == len(res.rows)
    assert again.verdict.status == res.verdict.status


# --------------------------------------------------------------------------- design


def test_lr_scales_with_the_batch_and_renorm_warmup_with_the_run():
    cfg = BatchSizeConfig(lr=0.1, reference_batch=32, renorm_r_warmup=(0.1, 0.5), renorm_d_warmup=(0.1, 0.25))
    n = train_size(cfg)
    p2, p256 = point(cfg, "mlp", "batchrenorm", 2, 3), point(cfg, "cnn", "batchnorm", 256, 20)
    assert p2["lr"] == pytest.approx(0.1 * 2 / 32) and p256["lr"] == pytest.approx(0.1 * 256 / 32)
    steps = 3 * (n // 2)
    assert p2["norm_kwargs"] == {"r_max_warmup": [round(0.1 * steps), round(0.5 * steps)],
                                 "d_max_warmup": [round(0.1 * steps), round(0.25 * steps)]}  # fmt: skip
    assert norm_kwargs("groupnorm", cfg, 10) == {"num_groups": 4} and norm_kwargs("batchnorm", cfg, 10) == {}
    assert "threads" not in p2 and "data_dir" not in p2, "threads and data_dir are not part of a run id"


def test_bn_statistics_at_batch_2_average_the_values_stated_in_the_preregistration():
    cfg = get_experiment("batch-size").config_for("quick")
    # conv: batch x H x W per channel (8x8 digits, halved by each block's pooling); linear: batch
    assert stat_counts("cnn", cfg) == [2 * 8 * 8, 2 * 4 * 4, 2 * 2 * 2]
    assert stat_counts("mlp", cfg) == [2, 2, 2]
    assert stat_counts("cnn", cfg, batch=32)[0] == 32 * 64


def test_c2_and_c13_share_run_ids_where_their_points_coincide():
    c2, c13 = get_experiment("batch-size"), get_experiment("small-batch-fixes")
    ids2 = {run_id(c): (c["model"], c["norm"], c["batch_size"]) for c in c2.runs(c2.config_for("quick"))}
    ids13 = {run_id(c): (c["model"], c["norm"], c["batch_size"]) for c in c13.runs(c13.config_for("quick"))}
    shared = {ids2[i] for i in set(ids2) & set(ids13)}
    assert shared == {("mlp", "batchnorm", 2), ("mlp", "groupnorm", 2), ("mlp", "batchnorm", 32),
                      ("cnn", "batchnorm", 256)}  # fmt: skip


def test_config_refuses_unknown_architectures_and_misordered_batches():
    with pytest.raises(ValueError, match="model_kwargs"):
        BatchSizeConfig(tiny_archs=("resnet",))
    with pytest.raises(ValueError, match="tiny_batch < reference_batch < large_batch"):
        BatchSizeConfig(large_batch=16)


# --------------------------------------------------------------------------- per-seed values and the verdict

QUICK = BatchSizeConfig()


def c2_rows(bn_drop: dict[str, float], gn_drop: dict[str, float], gain: float, seeds: int = 12, noise: float = 0.004):
    acc = {}
    for arch in ("cnn", "mlp"):
        acc[(arch, "batchnorm", 32, 3)] = 0.97
        acc[(arch, "batchnorm", 2, 3)] = 0.97 - bn_drop[arch]
        acc[(arch, "groupnorm", 32, 3)] = 0.96
        acc[(arch, "groupnorm", 2, 3)] = 0.96 - gn_drop[arch]
    acc[("cnn", "batchnorm", 32, 20)] = 0.99
    acc[("cnn", "batchnorm", 256, 20)] = 0.99 - gain
    return rows_for(acc, seeds, noise)


def _verdict(rows):
    exp = get_experiment("batch-size")
    return judge_rows(exp, exp.config_for("quick"), rows, "quick")


def test_measure_gives_each_seeds_drop_and_gain_and_counts_a_diverged_run_at_chance():
    rows = c2_rows({"cnn": 0.3, "mlp": 0.5}, {"cnn": 0.0, "mlp": 0.0}, gain=0.05, seeds=4)
    (i,) = [
        i
        for i, r in enumerate(rows)
        if (r["model"], r["norm"], r["batch_size"], r["seed"]) == ("cnn", "batchnorm", 2, 1)
    ]
    rows[i] = {**rows[i], "diverged": True}
    per_seed = get_experiment("batch-size").measure(rows, QUICK)
    acc = {(r["model"], r["norm"], r["batch_size"], r["epochs"], r["seed"]): r["final_test_acc"] for r in rows}
    for r in per_seed:
        s = r["seed"]
        if r["setting"] == "tiny":
            ref = acc[(r["arch"], r["norm"], 32, 3, s)]
            tiny = (
                CHANCE if (r["arch"], r["norm"], s) == ("cnn", "batchnorm", 1) else acc[(r["arch"], r["norm"], 2, 3, s)]
            )
            assert r["drop"] == pytest.approx(ref - tiny, abs=1e-15)
        else:
            assert r["gain"] == pytest.approx(
                acc[("cnn", "batchnorm", 32, 20, s)] - acc[("cnn", "batchnorm", 256, 20, s)]
            )
    assert len(per_seed) == 4 * (2 * 2 + 1)
    assert by_seed([{"seed": 0, "final_test_acc": math.nan}]) == {0: CHANCE}


def test_verdict_holds_when_bn_loses_more_than_gn_in_both_nets_and_batch_32_beats_256():
    v = _verdict(c2_rows({"cnn": 0.2, "mlp": 0.5}, {"cnn": 0.0, "mlp": 0.0}, gain=0.05))
    assert v.status == "holds", v.summary
    parts = {r.part.name: r for r in v.judgement.parts}
    assert parts["bn-loses-more-mlp"].effect == pytest.approx(0.5, abs=0.01)
    assert parts["gn-drop-cnn"].status == "holds" and not parts["gn-drop-cnn"].part.decides
    assert "2/2/2 values" in v.finding and "128/32/8 values" in v.finding


def test_verdict_does_not_hold_when_bn_loses_no_more_than_gn():
    v = _verdict(c2_rows({"cnn": 0.0, "mlp": 0.5}, {"cnn": 0.0, "mlp": 0.0}, gain=0.05))
    assert v.status == "does not hold", v.summary
    parts = {r.part.name: r.status for r in v.judgement.parts}
    assert parts["bn-loses-more-cnn"] == "does not hold" and parts["bn-loses-more-mlp"] == "holds"


def test_verdict_does_not_hold_when_large_batches_generalise_as_well():
    v = _verdict(c2_rows({"cnn": 0.2, "mlp": 0.5}, {"cnn": 0.0, "mlp": 0.0}, gain=0.0, noise=0.002))
    assert v.status == "does not hold", v.summary
    assert {r.part.name: r.status for r in v.judgement.deciding}["moderate-beats-large"] == "does not hold"


def test_verdict_inconclusive_when_seeds_are_too_noisy():
    v = _verdict(c2_rows({"cnn": 0.02, "mlp": 0.5}, {"cnn": 0.0, "mlp": 0.0}, gain=0.05, noise=0.05))
    assert v.status == "inconclusive", v.summary
    assert v.judgement.seeds == 12 and not v.judgement.stopped_early


def test_finding_says_when_bns_larger_drop_is_groupnorms_gain():
    v = _verdict(c2_rows({"cnn": 0.0, "mlp": 0.5}, {"cnn": -0.03, "mlp": 0.0}, gain=0.05))
    assert {r.part.name: r.status for r in v.judgement.parts}["bn-loses-more-cnn"] == "holds"
    assert "does not drop here" in v.finding and "GroupNorm gains 0.03" in v.finding
    assert v.finding.count("does not drop here") == 1, "the MLP, where BN does drop, gets no such clause"
