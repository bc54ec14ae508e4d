"""C5 centering: the smoke path end to end, the half-BN layers against closed forms, the per-seed measures against
numpy, the parts reaching each outcome on synthetic rows."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import normlab
from normlab.lab.experiments import framework, get_experiment, run_experiment
from normlab.lab.experiments.centering import (
    ARMS,
    BatchRMSNorm,
    CenteringConfig,
    MeanOnlyBatchNorm,
    layer_ratios,
    update_spread,
)

PNG = b"\x89PNG\r\n\x1a\n"


def test_smoke_path_end_to_end(tmp_path):
    exp = get_experiment("C5")
    assert exp.name == "centering"
    norms_before = normlab.norm_names()
    res = run_experiment("centering", scale="smoke", root=tmp_path, progress=False, device="cpu")
    assert normlab.norm_names() == norms_before  # the half-BN layers are never registered
    cfg = exp.scales["smoke"]
    assert len(res.rows) == len(ARMS) * cfg.seeds == len(res.ran)
    for r in res.rows:
        assert len(r["ratio_layers"]) == cfg.depth  # every hidden Linear, not the classifier
        assert len(r["update_ratio"]) == cfg.steps - 1 and all(x > 0 for x in r["update_ratio"][0])
        if r["norm"] not in ("none", "batchnorm"):
            assert "layers" not in r  # the half-BN nets are used for the update ratios only
            continue
        L = r["layers"]
        assert len(L["name"]) == cfg.depth + 1  # every Linear's input, the classifier's included
        # theorems: a shift away from the mean never lowers the trace or the Frobenius norm of E[(x-s)(x-s)^T]
        assert all(c <= m * (1 + 1e-9) for c, m in zip(L["covariance_trace"], L["second_moment_trace"]))
        assert all(c <= m * (1 + 1e-9) for c, m in zip(L["covariance_fro"], L["second_moment_fro"]))
        if r["norm"] == "none":  # the entrywise-L1 search, and tr M(s*) = tr C + |E x - s*|^2
            assert all(g >= -1e-9 for g in L["l1_gap"])
            for t, c, dist in zip(L["trace_at_l1_optimum"], L["covariance_trace"], L["shift_distance"]):
                assert t == pytest.approx(c + dist**2, rel=1e-9)
        else:
            assert all(np.isnan(L["l1_gap"]))
    assert not [k for r in res.rows for k in r if k.startswith(("data_kwargs", "data_dir", "threads"))]  # not in ids
    saved = json.loads((tmp_path / "centering" / "verdict.json").read_text())
    assert saved["status"] == res.verdict.status
    assert [p["name"] for p in saved["parts"] if p["decides"]] == ["centring-lowers-trace", "division-evens-updates"]
    assert res.figures and all(p.read_bytes()[:8] == PNG for p in res.figures)


def test_the_half_bn_arms_train_the_classes_they_name(monkeypatch):
    import normlab.lab.train as T
    from normlab.lab.experiments.framework import Run

    exp = get_experiment("centering")
    cfg = exp.scales["smoke"]
    seen = {}
    real = T.train

    def spy(config, **kw):
        r = real(config, **kw)
        seen[config.norm] = {type(m) for m in r.model.modules()}
        return r

    monkeypatch.setattr(T, "train", spy)
    for params in exp.grid(cfg):
        if params["norm"] in ("mean-only", "scale-only"):
            exp.run_one(Run(exp.name, "smoke", {**params, "max_steps": 3}, 0, "cpu", cfg))
    assert MeanOnlyBatchNorm in seen["mean-only"] and BatchRMSNorm in seen["scale-only"]
    assert not any(issubclass(t, normlab.BatchNorm) for t in seen["mean-only"] | seen["scale-only"])


# --------------------------------------------------------------------------- the half-BN layers


def test_mean_only_batchnorm_centres_without_scaling_and_tracks_the_mean():
    m = MeanOnlyBatchNorm(3, momentum=0.5)
    scale, shift = torch.tensor([1.0, 4.0, 0.1]).view(1, 3, 1), torch.tensor([2.0, -1.0, 5.0]).view(1, 3, 1)
    x = torch.randn(64, 3, 5) * scale + shift  # (N, C, L), channels on axis 1
    y = m(x)
    xn = x.numpy().astype(np.float64)
    ref = xn - xn.mean(axis=(0, 2), keepdims=True)
    assert np.allclose(y.detach().numpy(), ref, atol=1e-5)  # no division by the std
    assert torch.allclose(m.running_mean, 0.5 * x.mean(dim=(0, 2)), atol=1e-6)
    assert int(m.num_batches_tracked) == 1
    m.eval()
    assert torch.allclose(m(x), x - m.running_mean.view(1, 3, 1))
    last = MeanOnlyBatchNorm(4, feature_dim=-1)
    z = torch.randn(2, 7, 4) + 3.0  # (N, S, D), features last
    assert torch.allclose(last(z).mean(dim=(0, 1)), torch.zeros(4), atol=1e-5)
    with pytest.raises(ValueError, match="expected 3 features"):
        m(torch.randn(2, 5))


def test_batch_rms_norm_divides_by_the_batch_rms_without_centring():
    m = BatchRMSNorm(3, momentum=0.25, eps=1e-5)
    x = torch.randn(32, 3, 4, 4, dtype=torch.float64) * 3 + 1  # (N, C, H, W)
    with torch.no_grad():
        m.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        m.bias.copy_(torch.tensor([0.0, 1.0, -1.0]))
    m = m.double()
    y = m(x).detach().numpy()
    xn = x.numpy()
    ms = (xn**2).mean(axis=(0, 2, 3), keepdims=True)
    ref = xn / np.sqrt(ms + 1e-5) * np.array([1.0, 2.0, 0.5]).reshape(1, 3, 1, 1)
    ref += np.array([0.0, 1.0, -1.0]).reshape(1, 3, 1, 1)
    assert np.allclose(y, ref, rtol=1e-12, atol=1e-12)
    assert np.allclose(m.running_sq.numpy(), 0.75 + 0.25 * ms.reshape(3), rtol=1e-12)
    m.eval()
    ev = m(x).detach().numpy()
    ref_ev = xn / np.sqrt(m.running_sq.numpy().reshape(1, 3, 1, 1) + 1e-5) * np.array([1.0, 2.0, 0.5]).reshape(
        1, 3, 1, 1
    ) + np.array([0.0, 1.0, -1.0]).reshape(1, 3, 1, 1)
    assert np.allclose(ev, ref_ev, rtol=1e-12)


@pytest.mark.parametrize("cls", [MeanOnlyBatchNorm, BatchRMSNorm])
def test_half_bn_layers_are_twice_differentiable(cls):
    m = cls(3).double()
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-1, 1)
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda x: m(x), (x,)) and gradgradcheck(lambda x: m(x), (x,))
    assert normlab.make_norm(cls, 5).num_features == 5  # built as models build a norm class


# --------------------------------------------------------------------------- the per-seed measures


def test_update_spread_is_the_std_over_layers_of_the_mean_log_rate():
    rng = np.random.default_rng(0)
    r = 10 ** rng.normal([-2.0, -1.5, -2.5], 0.2, size=(50, 3))  # (steps, layers)
    r[3, 1] = np.nan  # a non-finite step is left out of its layer's mean
    spread, rates = update_spread(r.tolist())
    logr = np.log10(r)
    want = [np.nanmean(logr[:, j]) for j in range(3)]
    assert rates == pytest.approx(want, rel=1e-12) and spread == pytest.approx(np.std(want), rel=1e-12)
    assert update_spread([]) == (None, [])


def test_layer_ratios_against_closed_forms():
    rng = np.random.default_rng(1)
    layers = {k: [] for k in ("covariance_trace", "second_moment_trace", "covariance_l1", "second_moment_l1",
                              "covariance_fro", "second_moment_fro", "l1_gap")}  # fmt: skip
    tr = []
    for _ in range(3):
        x = rng.normal(size=(500, 4)) + rng.uniform(0, 2, size=4)  # (rows, D) with a mean
        c = np.cov(x.T, bias=True)
        m = x.T @ x / x.shape[0]
        layers["covariance_trace"].append(np.trace(c))
        layers["second_moment_trace"].append(np.trace(m))
        layers["covariance_l1"].append(np.abs(c).sum())
        layers["second_moment_l1"].append(np.abs(m).sum())
        layers["covariance_fro"].append(np.linalg.norm(c))
        layers["second_moment_fro"].append(np.linalg.norm(m))
        layers["l1_gap"].append(0.01 * np.abs(c).sum())
        tr.append(x.var(axis=0).sum() / (x**2).mean(axis=0).sum())  # Σ Var / Σ E[x²]
    got = layer_ratios(layers)
    assert got["trace_ratio"] == pytest.approx(np.exp(np.mean(np.log(tr))), rel=1e-10)
    assert got["l1_gap"] == pytest.approx(0.01)


# --------------------------------------------------------------------------- the parts on synthetic rows

EXP = get_experiment("centering")
CFG = CenteringConfig()


def _layers(ratio):
    n = 7
    return {"covariance_trace": [ratio] * n, "second_moment_trace": [1.0] * n, "covariance_l1": [ratio] * n,
            "second_moment_l1": [1.0] * n, "covariance_fro": [ratio] * n, "second_moment_fro": [1.0] * n,
            "l1_gap": [0.05 * ratio] * n, "trace_at_l1_optimum": [ratio * 1.1] * n,
            "fro_at_l1_optimum": [ratio * 1.1] * n, "name": [f"l{i}" for i in range(n)]}  # fmt: skip


def _rows(trace_ratio, spreads, seeds=12, noise=0.01):
    """trace_ratio: of the no-norm net; spreads: {arm: update spread in decades}; per-layer rates exact."""
    rng = np.random.default_rng(2)
    z = np.array([-1.5, -0.5, 0.5, 1.5, 0.0, 0.0])
    z = z / z.std()  # std exactly 1 over the 6 layers
    rows = []
    for s in range(seeds):
        for arm in ARMS:
            sp = spreads[arm] + noise * rng.standard_normal()
            ratios = np.tile(10 ** (-2 + sp * z), (20, 1))  # (steps, layers): spread exactly sp
            row = {"norm": arm, "seed": s, "update_ratio": ratios.tolist(), "ratio_layers": [f"l{i}" for i in range(6)],
                   "final_test_acc": 0.9}  # fmt: skip
            if arm in ("none", "batchnorm"):
                row["layers"] = _layers(trace_ratio * 10 ** (noise * rng.standard_normal()))
            rows.append(row)
    return rows


SPREAD = {"none": 0.2, "batchnorm": 0.05, "mean-only": 0.3, "scale-only": 0.1}


def test_parts_hold_when_centring_lowers_the_trace_and_division_evens_the_updates():
    v = framework.judge_rows(EXP, CFG, _rows(0.5, SPREAD), "quick")
    assert v.status == "holds", v.summary
    assert "exact for the trace" in v.finding and v.numbers["update_spread_decades"]["batchnorm"] == pytest.approx(
        0.05, abs=0.01
    )


def test_parts_do_not_hold_when_centring_changes_the_trace_by_less_than_the_margin():
    v = framework.judge_rows(EXP, CFG, _rows(0.95, SPREAD), "quick")
    assert v.status == "does not hold"
    assert {r.part.name: r.status for r in v.judgement.parts}["centring-lowers-trace"] == "does not hold"
    worse = framework.judge_rows(EXP, CFG, _rows(0.5, {**SPREAD, "batchnorm": 0.4}), "quick")
    assert worse.status == "does not hold"


def test_parts_are_inconclusive_when_the_spreads_overlap():
    v = framework.judge_rows(EXP, CFG, _rows(0.5, {**SPREAD, "batchnorm": 0.22}, seeds=3, noise=0.1), "quick")
    assert v.status == "inconclusive"
