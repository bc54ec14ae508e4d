"""C12 lr-vs-batch: the smoke path end to end, and the best-lr / slope / verdict rules on synthetic run tables."""

from __future__ import annotations

import json
import math

import pytest

from normlab.lab.config import ConfigError
from normlab.lab.experiments import get_experiment, run_experiment
from normlab.lab.experiments.framework import STATUSES
from normlab.lab.experiments.lr_vs_batch import LRvsBatchConfig, best_lr_table, slopes

PNG = b"\x89PNG\r\n\x1a\n"
LRS = [2.0**k for k in (-7, -5, -3, -1, 1)]
SIZES = [32, 128, 512]


def test_smoke_trains_stores_analyses_and_draws(tmp_path):
    exp = get_experiment("lr-vs-batch")
    assert exp.claim == "C12"
    cfg = exp.scales["smoke"]
    res = run_experiment("C12", scale="smoke", root=tmp_path, progress=False)
    assert len(res.rows) == len(list(exp.grid(cfg))) * cfg.seeds
    assert res.verdict.status in STATUSES and "slope" in res.verdict.summary
    assert json.loads(res.verdict_path.read_text())["status"] == res.verdict.status
    (fig,) = res.figures
    assert fig.name == "lr-vs-batch.png" and fig.read_bytes().startswith(PNG)
    # SkipInit is the ResNet without norm whose branches start at alpha = 0; BN keeps alpha = 1
    skip = [r for r in res.rows if r["variant"] == "skipinit"]
    assert skip and all(r["norm"] == "none" and r["model_kwargs.residual_scale"] == 0.0 for r in skip)
    assert all("model_kwargs.residual_scale" not in r for r in res.rows if r["variant"] == "batchnorm")


def _rows(peaks: dict[tuple[str, int], dict[int, float]]) -> list[dict]:
    """Accuracy peaked (0.95) at ``peaks[(variant, seed)][batch_size]``, 0.1 lower per factor 4 away from it."""
    rows = []
    for (variant, seed), by_bs in peaks.items():
        for bs, peak in by_bs.items():
            for lr in LRS:
                acc = 0.95 - 0.1 * abs(math.log2(lr) - math.log2(peak)) / 2
                rows.append({"variant": variant, "seed": seed, "batch_size": bs, "lr": lr, "final_test_acc": acc})
    return rows


def _verdict(rows, **kw):
    return get_experiment("lr-vs-batch").analyse(rows, LRvsBatchConfig(**kw))


def _growing(seeds=3):  # best lr x4 per x4 batch: slope 1
    return {s: dict(zip(SIZES, (2**-5, 2**-3, 2**-1))) for s in range(seeds)}


def _flat(seeds=3):  # best lr the same at every batch size: slope 0
    return {s: dict(zip(SIZES, (2**-3, 2**-3, 2**-3))) for s in range(seeds)}


def _table(bn, skip):
    return _rows({**{("batchnorm", s): p for s, p in bn.items()}, **{("skipinit", s): p for s, p in skip.items()}})


def test_best_lr_is_the_argmax_and_the_slope_follows():
    table = best_lr_table(_table(_growing(1), _flat(1)), plateau=0.0)
    assert table[("batchnorm", 0, 32)]["lr"] == pytest.approx(2**-5)
    assert table[("batchnorm", 0, 512)]["acc"] == pytest.approx(0.95)
    sl = slopes(table)
    assert sl[("batchnorm", 0)] == pytest.approx(1.0) and sl[("skipinit", 0)] == pytest.approx(0.0)


def test_the_plateau_averages_near_best_learning_rates():
    rows = [
        {"variant": "batchnorm", "seed": 0, "batch_size": 32, "lr": 2**-5, "final_test_acc": 0.900},
        {"variant": "batchnorm", "seed": 0, "batch_size": 32, "lr": 2**-3, "final_test_acc": 0.905},
        {"variant": "batchnorm", "seed": 0, "batch_size": 32, "lr": 2**-1, "final_test_acc": 0.5},
    ]
    assert best_lr_table(rows, 0.0)[("batchnorm", 0, 32)]["lr"] == pytest.approx(2**-3)
    assert best_lr_table(rows, 0.01)[("batchnorm", 0, 32)]["lr"] == pytest.approx(2**-4)  # geometric mean of 2^-5, 2^-3
    # a non-finite accuracy (a run that blew up) counts as 0, never as the best
    rows.append({"variant": "batchnorm", "seed": 0, "batch_size": 32, "lr": 2.0, "final_test_acc": math.nan})
    assert best_lr_table(rows, 0.0)[("batchnorm", 0, 32)]["lr"] == pytest.approx(2**-3)


def test_holds_when_bns_best_lr_grows_faster():
    v = _verdict(_table(_growing(), _flat()))
    assert v.status == "holds"
    assert v.numbers["batchnorm"]["mean"] == pytest.approx(1.0) and v.numbers["skipinit"]["mean"] == pytest.approx(0.0)
    assert "advantage" in v.summary


def test_does_not_hold_when_the_baselines_best_lr_grows_faster():
    assert _verdict(_table(_flat(), _growing())).status == "does not hold"


def test_inconclusive_when_seeds_disagree():
    bn = _growing()
    bn[1] = dict(zip(SIZES, (2**-1, 2**-3, 2**-5)))  # one seed shrinking: the spread covers the baseline
    assert _verdict(_table(bn, _flat())).status == "inconclusive"


def test_config_checks_variants_and_batch_sizes():
    with pytest.raises(ValueError, match="unknown variant"):
        LRvsBatchConfig(variants=("batchnorm", "fixup"))
    with pytest.raises(ValueError, match="two batch sizes"):
        LRvsBatchConfig(batch_sizes=(64,))
    with pytest.raises(ConfigError):
        get_experiment("lr-vs-batch").config_for("smoke", ["baseline=none"])  # not among the smoke variants
