"""C5 centering: the smoke path end to end, the mean-only norm, the verdict rule on synthetic rows."""

from __future__ import annotations

import json

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

from normlab.lab.experiments import get_experiment, run_experiment
from normlab.lab.experiments.centering import MEAN_ONLY, CenteringConfig, MeanOnlyBatchNorm, register_mean_only

PNG = b"\x89PNG\r\n\x1a\n"


def test_smoke_path_end_to_end(tmp_path):
    exp = get_experiment("C5")
    assert exp.name == "centering"
    res = run_experiment("centering", scale="smoke", root=tmp_path, progress=False)
    cfg = exp.scales["smoke"]
    assert len(res.rows) == len(cfg.norms) * cfg.seeds
    assert res.verdict.status in ("holds", "does not hold", "inconclusive")
    for r in res.rows:
        assert len(r["ratio_layers"]) == cfg.depth  # every hidden Linear, not the classifier
        assert len(r["update_ratio"]) == cfg.steps - 1 and all(x > 0 for x in r["update_ratio"][0])
        if r["norm"] in cfg.norms[:2]:
            L = r["layers"]
            assert len(L["name"]) == cfg.depth + 1  # every Linear's input, the classifier's included
            # the Frobenius norm of the second moment is never lowered by a shift away from the mean (a theorem)
            assert all(c <= m * (1 + 1e-9) for c, m in zip(L["covariance_fro"], L["second_moment_fro"]))
            assert all(g >= -1e-9 for g in L["shift_relative_gap"])  # the search starts from points near E[x]
        else:
            assert "layers" not in r  # the mean-only net is used for the update ratios only
    assert json.loads((tmp_path / "centering" / "verdict.json").read_text())["status"] == res.verdict.status
    assert res.figures and all(p.read_bytes()[:8] == PNG for p in res.figures)


# --------------------------------------------------------------------------- the mean-only norm


def test_mean_only_batchnorm_centres_without_scaling_and_tracks_the_mean():
    torch.manual_seed(0)
    m = MeanOnlyBatchNorm(3, momentum=0.5)
    scale, shift = torch.tensor([1.0, 4.0, 0.1]).view(1, 3, 1), torch.tensor([2.0, -1.0, 5.0]).view(1, 3, 1)
    x = torch.randn(64, 3, 5) * scale + shift
    y = m(x)  # (N, C, L), channels on axis 1
    assert torch.allclose(y.mean(dim=(0, 2)), torch.zeros(3), atol=1e-5)
    assert torch.allclose(y.var(dim=(0, 2)), x.var(dim=(0, 2)), rtol=1e-5)  # no division by the std
    assert torch.allclose(m.running_mean, 0.5 * x.mean(dim=(0, 2)), atol=1e-5)
    assert int(m.num_batches_tracked) == 1
    m.eval()
    assert torch.allclose(m(x), x - m.running_mean.view(1, 3, 1))
    last = MeanOnlyBatchNorm(4, feature_dim=-1)
    z = torch.randn(2, 7, 4) + 3.0  # (N, S, D), features last
    assert torch.allclose(last(z).mean(dim=(0, 1)), torch.zeros(4), atol=1e-5)
    with pytest.raises(ValueError, match="expected 3 features"):
        m(torch.randn(2, 5))


def test_mean_only_batchnorm_is_twice_differentiable_and_registers_on_demand():
    m = MeanOnlyBatchNorm(3).double()
    with torch.no_grad():
        m.weight.uniform_(0.5, 1.5)
        m.bias.uniform_(-1, 1)
    x = torch.randn(6, 3, dtype=torch.float64, requires_grad=True)
    assert gradcheck(lambda x: m(x), (x,)) and gradgradcheck(lambda x: m(x), (x,))
    import normlab

    assert register_mean_only() == MEAN_ONLY and register_mean_only() == MEAN_ONLY  # idempotent
    assert isinstance(normlab.make_norm(MEAN_ONLY, 5), MeanOnlyBatchNorm)


# --------------------------------------------------------------------------- the verdict rule

CFG = CenteringConfig()
ANALYSE = get_experiment("centering").analyse


def _rows(
    centering=(-0.5, -0.45, -0.55),
    gap=(0.001, 0.002, 0.0015),
    spread_bn=(0.05, 0.06, 0.055),
    spread_mean_only=(0.15, 0.16, 0.14),
):
    rows = []
    for s in range(3):
        for norm in CFG.norms[:2]:
            rows.append(
                {
                    "norm": norm,
                    "seed": s,
                    "mean_log10_centering_ratio": centering[s],
                    "max_shift_relative_gap": gap[s],
                    "ratio_layer_spread": spread_bn[s] if norm == "batchnorm" else 0.1,
                    "fro_centering_never_worse": True,
                }
            )
        rows.append({"norm": MEAN_ONLY, "seed": s, "ratio_layer_spread": spread_mean_only[s]})
    return rows


def test_verdict_holds_when_every_part_holds():
    v = ANALYSE(_rows(), CFG)
    assert v.status == "holds", v.summary
    assert "Frobenius: centring never worse: True" in v.summary


def test_verdict_does_not_hold_when_a_shift_beats_centring_by_more_than_the_tolerance():
    v = ANALYSE(_rows(gap=(0.04, 0.05, 0.045)), CFG)
    assert v.status == "does not hold"
    assert v.numbers["the mean minimises |E[(x-s)(x-s)^T]|_1"]["status"] == "does not hold"
    assert v.numbers["division evens out update ratios"]["status"] == "holds"


def test_verdict_does_not_hold_when_bn_spreads_the_update_ratios_more():
    assert ANALYSE(_rows(spread_bn=(0.2, 0.21, 0.22)), CFG).status == "does not hold"


def test_verdict_is_inconclusive_when_the_spreads_overlap():
    v = ANALYSE(_rows(spread_bn=(0.05, 0.2, 0.1), spread_mean_only=(0.1, 0.15, 0.12)), CFG)
    assert v.status == "inconclusive"
