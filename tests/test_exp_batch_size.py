"""C2 ``batch-size`` and C13 ``small-batch-fixes``: smoke path, shared run ids, verdict rules on synthetic rows."""

from __future__ import annotations

import dataclasses
import json

import pytest

from normlab.lab.experiments import get_experiment, run_experiment
from normlab.lab.experiments.batch_size import PRECISE, BatchSizeConfig, drops, norm_kwargs
from normlab.lab.experiments.framework import STATUSES
from normlab.lab.store import run_id

PNG = b"\x89PNG\r\n\x1a\n"


def _check_figures(result):
    assert result.figures, "no figure saved"
    for path in result.figures:
        assert path.is_file() and path.read_bytes()[:8] == PNG


# --------------------------------------------------------------------------- smoke path


def test_batch_size_smoke_end_to_end_and_resume(tmp_path):
    result = run_experiment("batch-size", scale="smoke", root=tmp_path, progress=False)
    cfg = result.config
    assert result.verdict.status in STATUSES and "\n" not in result.verdict.summary
    assert len(result.rows) == len(cfg.norms) * len(cfg.batch_sizes) * cfg.seeds == len(result.ran)
    _check_figures(result)
    stored = json.loads(result.verdict_path.read_text())
    assert stored["status"] == result.verdict.status and stored["claim"] == "C2"
    for r in result.rows:
        assert r["steps"] == cfg.steps, "every batch size gets the same number of optimizer steps"
        assert 0.0 <= r["final_test_acc"] <= 1.0 and r["train_eval_loss"] > 0
        assert ("precise_test_acc" in r) == (r["norm"] == "batchnorm"), "precise statistics only where BN layers are"
    # interrupted or repeated: nothing is trained again
    again = run_experiment("batch-size", scale="smoke", root=tmp_path, progress=False)
    assert again.ran == [] and len(again.skipped) == len(result.rows)
    assert again.verdict == result.verdict


def test_small_batch_fixes_smoke_end_to_end_and_ghost_is_bn_at_tiny_batch(tmp_path):
    result = run_experiment("small-batch-fixes", scale="smoke", root=tmp_path, progress=False)
    cfg = result.config
    assert result.verdict.status in STATUSES and result.verdict.numbers
    assert set(result.verdict.numbers) >= {n for n in cfg.norms if n != "batchnorm"} | {PRECISE}
    _check_figures(result)
    # a batch no larger than the virtual batch is normalised exactly as by BN: same losses, step by step
    tiny = cfg.tiny_batch
    assert tiny <= cfg.ghost_virtual_batch
    at_tiny = {(r["norm"], r["seed"]): r for r in result.rows if r["batch_size"] == tiny}
    for seed in range(cfg.seeds):
        bn, ghost = at_tiny["batchnorm", seed], at_tiny["ghostbatchnorm", seed]
        assert ghost["step_loss"] == pytest.approx(bn["step_loss"], rel=1e-5, abs=1e-6)
    # Batch Renorm's warm-up is scaled to the step budget (else it would be BN throughout)
    (brn,) = {json.dumps(r["norm_kwargs.r_max_warmup"]) for r in result.rows if r["norm"] == "batchrenorm"}
    assert json.loads(brn)[1] <= cfg.steps


def test_c2_and_c13_share_run_ids_for_the_same_points():
    c2, c13 = get_experiment("batch-size"), get_experiment("small-batch-fixes")
    ids2 = {run_id(c): c["norm"] for c in c2.runs(c2.config_for("quick"))}
    ids13 = {run_id(c): c["norm"] for c in c13.runs(c13.config_for("quick"))}
    shared = set(ids2) & set(ids13)
    assert {ids2[i] for i in shared} == {"batchnorm", "groupnorm"}
    assert len(shared) == 2 * len(c2.config_for("quick").batch_sizes) * 3


def test_renorm_warmup_and_group_counts_follow_the_config():
    cfg = BatchSizeConfig(steps=400, renorm_r_warmup=(0.1, 0.5), renorm_d_warmup=(0.1, 0.25), group_norm_groups=8)
    assert norm_kwargs("batchrenorm", cfg) == {"r_max_warmup": [40, 200], "d_max_warmup": [40, 100]}
    assert norm_kwargs("groupnorm", cfg) == {"num_groups": 8}
    assert norm_kwargs("batchnorm", cfg) == {}


# --------------------------------------------------------------------------- verdict rules on synthetic rows


def _rows(acc: dict[tuple[str, int], list[float]], precise: list[float] | None = None):
    """Rows with test accuracy ``acc[(norm, batch)][seed]``; BN rows carry ``precise[seed]`` at batch 2 (else EMA)."""
    rows = []
    for (norm, b), accs in acc.items():
        for seed, a in enumerate(accs):
            r = {"norm": norm, "batch_size": b, "seed": seed, "final_test_acc": a, "train_eval_loss": 1.0 - a}
            r["max_steps"] = 10
            if norm == "batchnorm":
                r["precise_test_acc"] = precise[seed] if precise is not None and b == 2 else a
                r["precise_train_eval_loss"] = 1.0 - r["precise_test_acc"]
            rows.append(r)
    return rows


C2_CFG = BatchSizeConfig(norms=("batchnorm", "groupnorm", "layernorm", "none"), batch_sizes=(2, 32))


def _c2(bn2, gn2, ln2):
    return _rows(
        {
            ("batchnorm", 32): [0.98, 0.97, 0.98],
            ("batchnorm", 2): bn2,
            ("groupnorm", 32): [0.97, 0.97, 0.96],
            ("groupnorm", 2): gn2,
            ("layernorm", 32): [0.97, 0.96, 0.97],
            ("layernorm", 2): ln2,
            ("none", 32): [0.9, 0.9, 0.9],
            ("none", 2): [0.5, 0.6, 0.4],
        }
    )


def test_c2_verdict_holds_when_bn_loses_more():
    rows = _c2(bn2=[0.60, 0.62, 0.61], gn2=[0.90, 0.91, 0.90], ln2=[0.88, 0.89, 0.90])
    v = get_experiment("batch-size").call_analyse(rows, C2_CFG)
    assert v.status == "holds", v.summary
    assert drops(rows, "batchnorm", 32, 2) == pytest.approx([0.38, 0.35, 0.37])
    assert "batch 2" in v.summary and "\n" not in v.summary


def test_c2_verdict_does_not_hold_when_bn_loses_less():
    rows = _c2(bn2=[0.95, 0.95, 0.96], gn2=[0.70, 0.72, 0.71], ln2=[0.70, 0.69, 0.71])
    assert get_experiment("batch-size").call_analyse(rows, C2_CFG).status == "does not hold"


def test_c2_verdict_inconclusive_when_seeds_disagree():
    rows = _c2(bn2=[0.60, 0.95, 0.75], gn2=[0.70, 0.90, 0.80], ln2=[0.65, 0.92, 0.78])
    assert get_experiment("batch-size").call_analyse(rows, C2_CFG).status == "inconclusive"


C13_CFG = BatchSizeConfig(norms=("batchnorm", "batchrenorm", "groupnorm"), batch_sizes=(2, 32))


def _c13(brn2, gn2, precise2):
    return _rows(
        {
            ("batchnorm", 32): [0.98, 0.97, 0.98],
            ("batchnorm", 2): [0.70, 0.71, 0.69],
            ("batchrenorm", 32): [0.98, 0.98, 0.97],
            ("batchrenorm", 2): brn2,
            ("groupnorm", 32): [0.97, 0.97, 0.96],
            ("groupnorm", 2): gn2,
        },
        precise=precise2,
    )


def test_c13_verdict_holds_when_every_fix_beats_bn_at_tiny_batch():
    rows = _c13(brn2=[0.80, 0.81, 0.82], gn2=[0.90, 0.91, 0.90], precise2=[0.75, 0.76, 0.77])
    v = get_experiment("small-batch-fixes").call_analyse(rows, C13_CFG)
    assert v.status == "holds", v.summary
    assert v.numbers["bn_gap"] == pytest.approx(0.9767 - 0.70, abs=1e-3)


def test_c13_verdict_does_not_hold_when_a_fix_is_worse():
    rows = _c13(brn2=[0.50, 0.51, 0.52], gn2=[0.90, 0.91, 0.90], precise2=[0.75, 0.76, 0.77])
    v = get_experiment("small-batch-fixes").call_analyse(rows, C13_CFG)
    assert v.status == "does not hold"
    assert v.numbers["batchrenorm"]["status"] == "does not hold" and v.numbers["groupnorm"]["status"] == "holds"


def test_c13_verdict_inconclusive_when_a_fix_equals_bn():
    rows = _c13(brn2=[0.80, 0.81, 0.82], gn2=[0.90, 0.91, 0.90], precise2=[0.70, 0.71, 0.69])
    v = get_experiment("small-batch-fixes").call_analyse(rows, C13_CFG)
    assert v.status == "inconclusive" and v.numbers[PRECISE]["status"] == "inconclusive"


def test_verdict_needs_the_tiny_and_reference_batches():
    rows = _c2(bn2=[0.6, 0.6, 0.6], gn2=[0.9, 0.9, 0.9], ln2=[0.9, 0.9, 0.9])
    with pytest.raises(ValueError, match="batch size 64"):
        get_experiment("batch-size").call_analyse(rows, dataclasses.replace(C2_CFG, reference_batch=64))
