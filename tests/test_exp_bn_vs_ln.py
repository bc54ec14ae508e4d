"""C8 ``bn-vs-ln``: smoke path end to end, the probes on untrained models, verdict rules on synthetic rows."""

from __future__ import annotations

import json

import pytest
import torch

from normlab.lab.experiments import get_experiment, run_experiment
from normlab.lab.experiments.bn_vs_ln import BnVsLnConfig, probe_model, relative_change
from normlab.lab.experiments.framework import STATUSES
from normlab.lab.models import build_model

PNG = b"\x89PNG\r\n\x1a\n"


def test_bn_vs_ln_smoke_end_to_end(tmp_path):
    result = run_experiment("bn-vs-ln", scale="smoke", root=tmp_path, progress=False)
    cfg = result.config
    assert result.verdict.status in STATUSES and "\n" not in result.verdict.summary
    assert len(result.rows) == len(cfg.variants) * cfg.seeds
    for path in result.figures:
        assert path.read_bytes()[:8] == PNG
    assert json.loads(result.verdict_path.read_text())["claim"] == "C8"
    for r in result.rows:
        for key in ("padding_change_train", "padding_change_eval", "composition_change", "train_eval_change"):
            assert r[key] >= 0.0
        if r["variant"] in ("layernorm", "rmsnorm"):  # per-token norms: no dependence on mode at all
            assert r["train_eval_change"] == 0.0 and r["final_test_acc"] == r["train_mode_test_acc"]


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


# --------------------------------------------------------------------------- verdict rules on synthetic rows

CFG = BnVsLnConfig()


def _rows(bn_padding=(1e-7, 2e-7, 1e-7), ln_composition=(0.0, 0.0, 0.0)):
    rows = []
    for variant, pad, comp, te in (
        ("layernorm", (1e-7,) * 3, ln_composition, (0.0,) * 3),
        ("rmsnorm", (1e-7,) * 3, (0.0,) * 3, (0.0,) * 3),
        ("batchnorm", bn_padding, (0.2, 0.25, 0.22), (0.5, 0.6, 0.55)),
        ("batchnorm-unmasked", (0.3, 0.3, 0.3), (0.2, 0.2, 0.2), (0.5, 0.5, 0.5)),
    ):
        for seed in range(3):
            rows.append(
                {
                    "variant": variant,
                    "seed": seed,
                    "padding_change_train": pad[seed],
                    "padding_change_eval": 1e-7,
                    "composition_change": comp[seed],
                    "composition_flips": 0.0,
                    "train_eval_change": te[seed],
                    "final_test_acc": 0.8,
                    "train_mode_test_acc": 0.8,
                }
            )
    return rows


def test_bn_vs_ln_verdict_holds_when_bn_is_padding_sensitive():
    v = get_experiment("bn-vs-ln").call_analyse(_rows(bn_padding=(0.1, 0.12, 0.11)), CFG)
    assert v.status == "holds", v.summary


def test_bn_vs_ln_verdict_does_not_hold_for_padding_invariant_masked_bn():
    v = get_experiment("bn-vs-ln").call_analyse(_rows(), CFG)
    assert v.status == "does not hold"
    assert v.numbers["BN sensitive to padding"]["status"] == "does not hold"
    assert v.numbers["BN sensitive to batch composition"]["status"] == "holds"


def test_bn_vs_ln_verdict_inconclusive_when_a_change_straddles_the_tolerance():
    v = get_experiment("bn-vs-ln").call_analyse(_rows(bn_padding=(0.1, 0.1, 0.1), ln_composition=(0.0, 3e-4, 0.0)), CFG)
    assert v.status == "inconclusive", v.summary
