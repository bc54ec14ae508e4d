"""C8 ``bn-vs-ln``: smoke path end to end, the probes on untrained models, the verdict on synthetic rows."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from normlab.lab.experiments import get_experiment, run_experiment
from normlab.lab.experiments.bn_vs_ln import VARIANTS, BnVsLnConfig, measure, probe_model, relative_change
from normlab.lab.experiments.framework import judge_rows
from normlab.lab.models import build_model

PNG = b"\x89PNG\r\n\x1a\n"


def test_bn_vs_ln_smoke_end_to_end(tmp_path):
    exp = get_experiment("bn-vs-ln")
    assert exp.claim == "C8" and get_experiment("C8") is exp
    cfg = exp.scales["smoke"]
    result = run_experiment("bn-vs-ln", scale="smoke", root=tmp_path, progress=False, device="cpu")
    assert len(result.rows) == len(VARIANTS) * cfg.max_seeds
    assert {r["variant"] for r in result.rows} == set(VARIANTS)
    for r in result.rows:
        for key in ("padding_change_train", "padding_change_eval", "composition_change", "train_eval_change"):
            assert r[key] >= 0.0
        assert 0.0 <= r["padding_flips_train"] <= 1.0
        if r["variant"] in ("layernorm", "rmsnorm"):  # per-token norms: no dependence on mode at all
            assert r["train_eval_change"] == 0.0 and r["final_test_acc"] == r["train_mode_test_acc"]
        # the plain BN sees the padding, the masked one does not
        assert r["model_kwargs.mask_norm_stats"] == (r["variant"] != "batchnorm")
    stored = json.loads(result.verdict_path.read_text())
    assert stored["claim"] == "C8" and stored["meaningful"] is False
    assert [p["name"] for p in stored["parts"] if p["decides"]] == [
        "bn-padding",
        "bn-companions",
        "bn-train-eval",
        "ln-beats-bn",
    ]
    assert {p.name for p in result.figures} == {"bn-vs-ln.png", "parts.png"}
    assert all(p.read_bytes()[:8] == PNG for p in result.figures)


def _sequences(n=96, s=10, d=8):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, s, d, generator=g)
    lengths = torch.randint(3, s + 1, (n,), generator=g)
    mask = torch.arange(s)[None, :] < lengths[:, None]
    return x * mask[..., None], mask


def _probe(norm, masked):
    torch.manual_seed(0)
    model = build_model(
        "transformer",
        in_shape=(10, 8),
        num_classes=3,
        norm_layer=norm,
        d_model=16,
        depth=1,
        heads=2,
        max_len=16,
        mask_norm_stats=masked,
    )
    x, mask = _sequences()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = probe_model(model, x, mask, batch_size=8, extra_padding=6, probe_examples=32, groups=2)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the probes must not touch the model"
    return out


@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
def test_per_token_norms_ignore_padding_companions_and_mode(norm):
    out = _probe(norm, True)
    for key in ("padding_change_train", "padding_change_eval", "composition_change", "train_eval_change"):
        assert out[key] < 1e-5, (key, out[key])
    assert out["padding_flips_train"] == 0.0


def test_masked_bn_ignores_padding_but_not_companions_or_mode():
    out = _probe("batchnorm", True)
    assert out["padding_change_train"] < 1e-5 and out["padding_change_eval"] < 1e-5
    assert out["composition_change"] > 1e-3 and out["train_eval_change"] > 1e-3


def test_unmasked_bn_is_sensitive_to_padding_in_train_mode_only():
    out = _probe("batchnorm", False)
    assert out["padding_change_train"] > 1e-3
    assert out["padding_change_eval"] < 1e-5  # eval mode: fixed running statistics, a per-token map


def test_relative_change():
    a = torch.tensor([[3.0, 4.0]])
    assert relative_change(a, a) == 0.0
    assert relative_change(a, torch.zeros(1, 2)) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    x, y = rng.standard_normal((5, 3)), rng.standard_normal((5, 3))
    want = np.linalg.norm(x - y) / np.linalg.norm(x)
    assert relative_change(torch.from_numpy(x), torch.from_numpy(y)) == pytest.approx(want, rel=1e-12)


# --------------------------------------------------------------------------- the verdict on synthetic rows

CFG = BnVsLnConfig()
TASK = {"layernorm": (0.95, 0.952, 0.951), "rmsnorm": (0.95, 0.95, 0.951), "batchnorm": (0.85, 0.86, 0.855),
        "batchnorm-masked": (0.90, 0.91, 0.905)}  # fmt: skip


def _rows(bn_padding=(0.11, 0.12, 0.11), ln_padding=(0.0, 0.0, 0.0), task=None):
    """Stored-row shape: variant, seed, the probes, final test accuracy and loss."""
    task = task or TASK
    rows = []
    probes = {
        "layernorm": (ln_padding, (0.0,) * 3, (0.0,) * 3),
        "rmsnorm": ((0.0,) * 3, (0.0,) * 3, (0.0,) * 3),
        "batchnorm": (bn_padding, (0.2, 0.25, 0.22), (0.5, 0.6, 0.55)),
        "batchnorm-masked": ((1e-8,) * 3, (0.2, 0.21, 0.2), (0.23, 0.24, 0.22)),
    }
    for variant, (pad, comp, te) in probes.items():
        for seed in range(3):
            acc = task[variant][seed]
            rows.append(
                {
                    "variant": variant,
                    "seed": seed,
                    "diverged": False,
                    "padding_change_train": pad[seed],
                    "padding_change_eval": 0.0,
                    "padding_flips_train": 0.05,
                    "composition_change": comp[seed],
                    "composition_flips": 0.0,
                    "train_eval_change": te[seed],
                    "final_test_acc": acc,
                    "final_test_loss": 1.0 - acc,
                    "train_mode_test_acc": acc,
                }
            )
    return rows


def _judge(rows):
    return judge_rows(get_experiment("bn-vs-ln"), CFG, rows, "quick")


def _status(v, name):
    return next(r.status for r in v.judgement.parts if r.part.name == name)


def test_measure_takes_the_largest_probe_and_maps_divergence_to_none():
    rows = _rows()
    rows[0].update(diverged=True)
    per = measure(rows, CFG)
    assert per[0]["test_acc"] is None and per[0]["test_loss"] is None
    bn = next(r for r in per if r["variant"] == "batchnorm" and r["seed"] == 1)
    assert bn["max_change"] == pytest.approx(max(0.12, 0.25, 0.6))


def test_verdict_holds_when_plain_bn_is_sensitive_and_ln_trains_better():
    v = _judge(_rows())
    assert v.status == "holds", v.summary
    assert _status(v, "ln-invariant") == "holds" and _status(v, "masked-bn-padding") == "holds"
    assert _status(v, "masked-bn-companions") == "holds"
    assert "masking the padding removes the first" in v.finding


def test_verdict_does_not_hold_for_a_padding_invariant_bn():
    v = _judge(_rows(bn_padding=(1e-7, 2e-7, 1e-7)))
    assert v.status == "does not hold"
    assert _status(v, "bn-padding") == "does not hold" and _status(v, "bn-companions") == "holds"


def test_verdict_does_not_hold_when_bn_trains_as_well_as_ln():
    task = dict(TASK, batchnorm=(0.951, 0.95, 0.952))
    v = _judge(_rows(task=task))
    assert v.status == "does not hold" and _status(v, "ln-beats-bn") == "does not hold"


def test_verdict_inconclusive_when_the_task_gap_straddles_the_margin():
    task = dict(TASK, batchnorm=(0.94, 0.90, 0.95))  # LN − BN per seed: 0.01, 0.052, 0.001
    v = _judge(_rows(task=task))
    assert v.status == "inconclusive", v.summary
    assert _status(v, "ln-beats-bn") == "inconclusive"
