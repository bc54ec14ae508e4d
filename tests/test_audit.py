"""normlab.audit: every pitfall is named with its module and severity, clean models give nothing, nothing changes.

Each pitfall test builds a small model that contains that pitfall on purpose
and checks the audit reports it at the right module with the right severity
(and nothing it should not). The clean-model tests are the false-alarm guard:
a ResNet-style model (conv without bias -> BN -> ReLU, residual adds),
recalibrated on the data it is then audited with, gives zero findings with
torch.nn and with normlab layers. The no-trace test compares every parameter,
buffer (values and version counters), grad, requires_grad flag, module mode,
hook and the RNG state before and after, also when the audit raises.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normlab
from normlab.audit import CHECKS, AuditReport, Finding, Thresholds, audit, audit_main

# --------------------------------------------------------------------------- helpers and models


def found(report: AuditReport, check: str) -> list[tuple[str, str]]:
    """(module, severity) of every finding of one check."""
    assert check in CHECKS
    return [(f.module, f.severity) for f in report.select(check)]


def checks(report: AuditReport) -> set[str]:
    return {f.check for f in report.findings}


def images(n_batches=4, n=16, c=3, hw=8, scale=2.0, shift=1.0, seed=1):
    g = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(n, c, hw, hw, generator=g) * scale + shift, torch.randint(0, 10, (n,), generator=g))
        for _ in range(n_batches)
    ]


class Block(nn.Module):
    """Post-activation basic block: conv(no bias) -> BN -> ReLU -> conv -> BN, plus a (projected) shortcut."""

    def __init__(self, cin, cout, stride, norm):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm(cout)
        self.relu = nn.ReLU()
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm(cout)
        self.shortcut = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm(cout))
            if stride != 1 or cin != cout
            else nn.Identity()
        )

    def forward(self, x):
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResNet(nn.Module):
    def __init__(self, norm=nn.BatchNorm2d):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1, bias=False), norm(16), nn.ReLU())
        self.layers = nn.Sequential(Block(16, 16, 1, norm), Block(16, 32, 2, norm), Block(32, 32, 1, norm))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(32, 10)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.layers(self.stem(x))), 1))


def trained_resnet(norm, data):
    torch.manual_seed(0)
    model = ResNet(norm)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for x, y in data:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model


def small_cnn(*, bias=False, momentum=0.1, norm=nn.BatchNorm2d):
    """conv -> BN -> ReLU -> conv -> BN -> ReLU -> pool -> linear, names 0..8."""
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=bias),
        norm(8, momentum=momentum),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1, bias=False),
        norm(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 3),
    )


def fit_stats(model, data):
    """Running statistics that describe ``data`` (recalibrated), model left in eval mode."""
    normlab.recalibrate(model, data)
    return model.eval()


# --------------------------------------------------------------------------- no false alarms


@pytest.mark.parametrize("norm", [nn.BatchNorm2d, normlab.BatchNorm2d], ids=["torch.nn", "normlab"])
def test_recalibrated_resnet_in_eval_has_zero_findings(norm):
    data = images()
    model = trained_resnet(norm, data)
    normlab.recalibrate(model, data)
    report = audit(model.eval(), data)
    assert report.findings == (), str(report)
    assert report.graph == "torch.fx" and report.batches == 4 and report.samples == 64
    assert report.expect == "eval" and report.notes == ()
    assert "no findings" in str(report)


@pytest.mark.parametrize("norm", [nn.BatchNorm2d, normlab.BatchNorm2d], ids=["torch.nn", "normlab"])
def test_recalibrated_resnet_audited_for_training_has_zero_findings(norm):
    data = images()
    model = trained_resnet(norm, data)
    normlab.recalibrate(model, data)
    report = audit(model.train(), data)
    assert report.findings == (), str(report)
    assert report.expect == "train"


def test_normlab_preact_resnet_needs_the_hook_graph_and_is_clean():
    from normlab.lab.models import build_model

    data = images(n_batches=2)
    model = build_model("resnet", in_shape=(3, 8, 8), num_classes=10)
    normlab.recalibrate(model, data)
    report = audit(model.eval(), data)
    assert report.findings == (), str(report)
    assert report.graph == "forward hooks"  # its forward cannot be traced symbolically
    assert any("torch.fx could not trace" in n for n in report.notes)


# --------------------------------------------------------------------------- static: graph


def test_bias_before_bn_names_the_conv_and_linear_but_not_the_head():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 16),
        nn.BatchNorm1d(16),
        nn.ReLU(),
        nn.Linear(16, 2),
    ).train()
    report = audit(model)
    assert found(report, "bias-before-norm") == [("0", "info"), ("4", "info")]
    assert report.select("bias-before-norm", "0")[0].related == ("1",)
    assert report.select("bias-before-norm", "4")[0].related == ("5",)
    assert "bias=False" in report.select("bias-before-norm", "0")[0].fix


class SharedOutput(nn.Module):
    """The conv's output goes to the BN *and* to the sum: its bias is not redundant."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y) + y


@pytest.mark.parametrize(
    "model, expected",
    [
        (nn.Sequential(nn.Conv2d(4, 4, 3), nn.ReLU(), nn.BatchNorm2d(4)), []),  # the ReLU is between
        (SharedOutput(), []),
        (nn.Sequential(nn.Conv2d(4, 4, 3), nn.GroupNorm(2, 4)), []),  # GN with 2 channels per group keeps it
        (nn.Sequential(nn.Conv2d(4, 4, 3), nn.GroupNorm(4, 4)), [("0", "info")]),  # one channel per group
        (nn.Sequential(nn.Conv2d(4, 4, 3), nn.InstanceNorm2d(4, affine=True)), [("0", "info")]),
        (nn.Sequential(nn.Conv2d(4, 4, 3), normlab.BatchNorm2d(4)), [("0", "info")]),
        (nn.Sequential(nn.Conv2d(4, 4, 3), nn.LayerNorm([4, 2, 2])), []),
    ],
    ids=["relu-between", "output-shared", "gn-2-per-group", "gn-1-per-group", "instancenorm", "normlab-bn", "ln"],
)
def test_bias_before_norm_only_where_the_norm_removes_it(model, expected):
    assert found(audit(model.train()), "bias-before-norm") == expected


def test_dropout_feeding_bn_is_named_and_dropout_before_the_head_is_not():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Conv2d(8, 8, 3, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Flatten(),
        nn.Linear(8 * 4 * 4, 2),
    ).train()
    report = audit(model)
    assert found(report, "dropout-before-bn") == [("3", "warning")]
    f = report.select("dropout-before-bn")[0]
    assert f.related == ("5",) and f.details["p"] == pytest.approx(0.3)
    assert "recalibrate" in f.fix


def test_dropout_separated_from_bn_by_another_norm_is_not_reported():
    model = nn.Sequential(
        nn.Dropout(0.2),
        nn.Conv2d(3, 8, 3, bias=False),
        nn.GroupNorm(2, 8),
        nn.Conv2d(8, 8, 3, bias=False),
        nn.BatchNorm2d(8),
    ).train()
    assert found(audit(model), "dropout-before-bn") == []
    model[2] = nn.Identity()
    assert found(audit(model), "dropout-before-bn") == [("0", "warning")]


class FunctionalDropout(nn.Module):
    def __init__(self, pass_training: bool):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.pass_training = pass_training

    def forward(self, x):
        x = F.dropout(x, 0.2, training=self.training) if self.pass_training else F.dropout(x, 0.2)
        return self.bn(self.conv(x))


def test_functional_dropout_left_on_in_eval_and_feeding_bn():
    model = nn.Sequential(FunctionalDropout(pass_training=False))
    fit_stats(model, images(n_batches=2))
    report = audit(model)
    assert found(report, "dropout-always-on") == [("0", "error")]
    assert found(report, "dropout-before-bn") == [("0", "warning")]  # named by the module whose forward calls it
    model = fit_stats(nn.Sequential(FunctionalDropout(pass_training=True)), images(n_batches=2))
    assert found(audit(model), "dropout-always-on") == []


# --------------------------------------------------------------------------- static: attributes


@pytest.mark.parametrize(
    "bn, check, severity",
    [
        (lambda: nn.BatchNorm2d(8, momentum=0.99), "momentum-convention", "error"),
        (lambda: nn.BatchNorm2d(8, momentum=0.9), "momentum-convention", "error"),
        (lambda: normlab.BatchNorm2d(8, momentum=0.99), "momentum-convention", "error"),
        (lambda: normlab.BatchNorm2d(8, momentum=0.1, momentum_convention="decay"), "momentum-convention", "error"),
        (lambda: nn.BatchNorm2d(8, momentum=0.6), "momentum-range", "warning"),
        (lambda: nn.BatchNorm2d(8, momentum=1e-4), "momentum-range", "warning"),
        (lambda: nn.BatchNorm2d(8, momentum=0.0), "momentum-range", "error"),
        (lambda: nn.BatchNorm2d(8, momentum=None), "momentum-cumulative", "info"),
        (lambda: nn.BatchNorm2d(8, momentum=0.01), None, None),
        (lambda: normlab.BatchNorm2d(8, momentum=0.99, momentum_convention="decay"), None, None),
    ],
    ids=["torch-0.99", "torch-0.9", "normlab-0.99", "decay-0.1", "0.6", "1e-4", "0", "None", "0.01", "decay-0.99"],
)
def test_momentum_outside_the_usual_range_or_from_another_convention(bn, check, severity):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), bn(), nn.ReLU()).train()
    report = audit(model)
    expected = [("1", severity)] if check else []
    assert [(f.module, f.severity) for f in report.findings] == expected, str(report)
    if check:
        assert report.findings[0].check == check


def test_momentum_fix_is_the_conversion():
    report = audit(nn.Sequential(nn.BatchNorm2d(8, momentum=0.99)).train())
    (f,) = report.select("momentum-convention")
    assert "convert_momentum(0.99, to='torch')" in f.fix
    assert normlab.functional.convert_momentum(0.99, to="torch") == pytest.approx(0.01)
    assert f.details["new_batch_weight"] == pytest.approx(0.99)


def test_no_running_stats_is_reported_only_where_eval_is_expected():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8, track_running_stats=False), nn.ReLU())
    assert found(audit(model.eval()), "no-running-stats") == [("1", "warning")]
    assert found(audit(model.train()), "no-running-stats") == []
    assert found(audit(model.train(), expect="eval"), "no-running-stats") == [("1", "warning")]


def test_frozen_backbone_whose_bn_still_updates():
    data = images(n_batches=2)
    model = fit_stats(small_cnn(norm=normlab.BatchNorm2d), data).train()
    for p in [*model[0].parameters(), *model[1].parameters()]:  # backbone frozen by requires_grad only
        p.requires_grad_(False)
    report = audit(model)
    assert found(report, "frozen-affine-live-stats") == [("1", "warning")]
    assert "normlab.freeze(model, ['1'], affine_trainable=False)" in report.select("frozen-affine-live-stats")[0].fix
    # the fixes: normlab.freeze, or keeping the frozen layer in eval mode -> nothing to report
    frozen = normlab.freeze(model, ["1"], affine_trainable=False)
    assert checks(audit(frozen)) == set()
    frozen[1].frozen = False
    frozen[1].eval()
    assert checks(audit(frozen)) == set()


def test_frozen_conv_before_an_affine_free_bn_counts_as_frozen():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8, affine=False)).train()
    model[0].weight.requires_grad_(False)
    assert found(audit(model), "frozen-affine-live-stats") == [("1", "warning")]


def test_mode_mismatch_in_an_eval_model():
    data = images(n_batches=2)
    model = nn.Sequential(*small_cnn(), nn.Dropout(0.1))
    fit_stats(model, data)
    model[4].train()
    model[9].train()
    report = audit(model)
    assert found(report, "mode-mismatch") == [("4", "error"), ("9", "error")]
    assert found(audit(model, expect="eval"), "mode-mismatch") == [("4", "error"), ("9", "error")]
    # the whole model in train mode when evaluation is expected: one finding, on the model
    assert found(audit(model.train(), expect="eval"), "mode-mismatch") == [("", "error")]


def test_mode_mismatch_in_a_training_model():
    model = small_cnn().train()
    model[4].eval()  # γ/β still train against statistics that never move
    report = audit(model)
    assert found(report, "mode-mismatch") == [("4", "warning")]
    assert "normlab.freeze(model, ['4'])" in report.select("mode-mismatch")[0].fix
    for p in model[4].parameters():  # a frozen backbone layer kept in eval: consistent, nothing to say
        p.requires_grad_(False)
    assert found(audit(model), "mode-mismatch") == []
    assert found(audit(small_cnn().eval(), expect="train"), "mode-mismatch") == [("", "warning")]


class TimmStyleGroupNorm(nn.Module):
    """A third-party GroupNorm that does not validate its groups (recognised by name and attributes)."""

    def __init__(self, num_groups, num_channels):
        super().__init__()
        self.num_groups, self.num_channels = num_groups, num_channels
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def forward(self, x):
        return x


@pytest.mark.parametrize(
    "norm, expected",
    [
        (lambda: TimmStyleGroupNorm(3, 8), [("1", "error")]),
        (lambda: nn.GroupNorm(8, 8), [("1", "warning")]),
        (lambda: normlab.GroupNorm(8, 8), [("1", "warning")]),
        (lambda: nn.GroupNorm(4, 8), []),
        (lambda: nn.GroupNorm(1, 8), []),
    ],
    ids=["3-of-8", "torch-8-of-8", "normlab-8-of-8", "4-of-8", "1-of-8"],
)
def test_groupnorm_groups(norm, expected):
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), norm())
    assert found(audit(model), "groupnorm-groups") == expected


def test_thresholds_change_what_is_reported():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.GroupNorm(4, 8))
    report = audit(model, thresholds=Thresholds(min_channels_per_group=4))
    assert found(report, "groupnorm-groups") == [("1", "warning")]
    bn = nn.Sequential(nn.BatchNorm2d(8, momentum=0.3)).train()
    assert found(audit(bn), "momentum-range") == []
    assert found(audit(bn, thresholds=Thresholds(momentum_high=0.2)), "momentum-range") == [("0", "warning")]


@pytest.mark.parametrize("what", ["nan-var", "inf-mean", "nan-weight", "negative-var"])
def test_nonfinite_buffers(what):
    model = small_cnn(norm=normlab.BatchNorm2d)
    fit_stats(model, images(n_batches=2))
    bn = model[4]
    with torch.no_grad():
        {
            "nan-var": lambda: bn.running_var.__setitem__(2, float("nan")),
            "inf-mean": lambda: bn.running_mean.__setitem__(0, float("inf")),
            "nan-weight": lambda: bn.weight.__setitem__(1, float("nan")),
            "negative-var": lambda: bn.running_var.__setitem__(3, -1.0),
        }[what]()
    report = audit(model)
    assert found(report, "nonfinite-buffers") == [("4", "error")]
    assert found(report, "running-stats-mismatch") == []  # no gap computed from a broken buffer


def test_dead_exploding_and_zero_gamma_channels():
    model = small_cnn()
    fit_stats(model, images(n_batches=2))
    with torch.no_grad():
        model[1].weight[[1, 6]] = 0.0
        model[4].running_var[3] = 0.0
        model[4].running_var[5] = 1e9
    report = audit(model)
    assert found(report, "dead-channels") == [("1", "warning"), ("4", "warning")]
    assert report.select("dead-channels", "1")[0].details["channels"] == [1, 6]
    assert report.select("dead-channels", "4")[0].details["channels"] == [3]
    assert found(report, "exploding-channels") == [("4", "warning")]
    assert report.select("exploding-channels")[0].details["channels"] == [5]
    with torch.no_grad():
        model[1].weight.zero_()  # a zero-initialised residual branch
    report = audit(model)
    assert found(report, "zero-gamma") == [("1", "info")]
    assert found(report, "dead-channels") == [("4", "warning")]


def test_untrained_running_stats_in_eval():
    model = small_cnn().eval()
    report = audit(model)
    assert found(report, "untrained-running-stats") == [("1", "error"), ("4", "error")]
    # with data, the gap itself is measured and says the statistics were never updated
    report = audit(model, images(scale=10.0, shift=2.0))
    assert found(report, "untrained-running-stats") == []
    first = report.select("running-stats-mismatch", "1")[0]
    assert first.severity == "error" and "never updated" in first.message
    assert found(audit(small_cnn().train()), "untrained-running-stats") == []


# --------------------------------------------------------------------------- dynamic


def test_gap_numbers_equal_an_independent_numpy_computation():
    bn = nn.BatchNorm1d(4)
    with torch.no_grad():
        bn.running_mean.copy_(torch.tensor([0.0, 1.0, -1.0, 0.5]))
        bn.running_var.copy_(torch.tensor([1.0, 4.0, 0.25, 1.0]))
    model = nn.Sequential(bn).eval()
    g = torch.Generator().manual_seed(3)
    data = [
        torch.randn(32, 4, generator=g) * torch.tensor([1.0, 2.0, 3.0, 1.0]) + torch.tensor([1.0, 1.0, 0.0, 0.5])
        for _ in range(3)
    ]
    report = audit(model, data)
    (f,) = report.select("running-stats-mismatch")
    x = torch.cat(data).double().numpy()
    rm, rv, eps = bn.running_mean.double().numpy(), bn.running_var.double().numpy(), bn.eps
    smd = (x.mean(0) - rm) / np.sqrt(rv + eps)
    ratio = (x.var(0, ddof=1) + eps) / (rv + eps)
    assert f.module == "0" and f.details["samples"] == 96 and f.details["batches"] == 3
    assert f.details["smd_rms"] == pytest.approx(np.sqrt(np.mean(smd**2)), rel=1e-9)
    assert f.details["smd_max"] == pytest.approx(np.abs(smd).max(), rel=1e-9)
    assert f.details["worst_channel"] == int(np.abs(smd).argmax())
    assert f.details["log_var_ratio_rms"] == pytest.approx(np.sqrt(np.mean(np.log(ratio) ** 2)), rel=1e-9)
    assert f.details["var_ratio_median"] == pytest.approx(np.median(ratio), rel=1e-9)
    assert f.severity == "warning"  # rms SMD ~1.0 and rms |ln ratio| ~1.8: past 0.5 / ln 2, short of 2 / ln 10


def test_gap_severity_follows_the_thresholds():
    model = nn.Sequential(nn.BatchNorm1d(2)).eval()
    g = torch.Generator().manual_seed(0)
    base = torch.randn(512, 2, generator=g)
    base = (base - base.mean(0)) / base.std(0)  # exactly mean 0, unbiased variance 1
    for shift, expected in [(0.3, []), (1.0, [("0", "warning")]), (3.0, [("0", "error")])]:
        assert found(audit(model, [base + shift]), "running-stats-mismatch") == expected, shift


def test_statistics_from_another_domain_are_a_train_test_gap():
    model = small_cnn()
    fit_stats(model, images())
    assert checks(audit(model, images(seed=5))) == set()  # same distribution, other samples: no alarm
    report = audit(model, images(scale=4.0, shift=-3.0, seed=5))
    assert found(report, "running-stats-mismatch")[0] == ("1", "warning")  # variance ratio ~7
    f = report.select("running-stats-mismatch", "1")[0]
    assert "Train/test inconsistency" in f.message and "recalibrate" in f.fix and not f.details["frozen"]
    assert [m for m, _ in found(report, "running-stats-mismatch")] == ["1", "4"]
    assert "Layer 1, called earlier" in report.select("running-stats-mismatch", "4")[0].message  # maybe inherited


def test_frozen_statistics_that_no_longer_describe_the_data_after_fine_tuning():
    data = images()
    model = fit_stats(small_cnn(norm=normlab.BatchNorm2d), data)
    model = normlab.freeze(model, ["4"]).train()
    assert checks(audit(model, data)) == set()
    with torch.no_grad():  # "fine-tuning" moves the conv before the frozen layer
        model[3].weight.mul_(3.0).add_(0.05)
    report = audit(model, data)
    assert found(report, "running-stats-mismatch") == [("4", "error")]
    f = report.select("running-stats-mismatch")[0]
    assert f.details["frozen"] and "fine-tuning" in f.message and "modules=['4']" in f.fix


@pytest.mark.parametrize("n, expected", [(16, []), (4, [("", "warning")]), (2, [("", "error")]), (1, [("", "error")])])
def test_batches_too_small_for_bn_statistics(n, expected):
    model = small_cnn().train()
    report = audit(model, images(n=n))
    assert found(report, "small-batch") == expected
    if expected:
        f = report.select("small-batch")[0]
        assert f.related == ("1", "4") and f.details["batch_size"] == n
    assert found(audit(small_cnn().eval(), images(n=n)), "small-batch") == []  # eval uses running statistics


def test_ghost_batchnorm_small_virtual_batches_are_intended():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), normlab.GhostBatchNorm(8, virtual_batch_size=4)).train()
    assert found(audit(model, images(n=16)), "small-batch") == []


def test_nonfinite_activations_name_the_first_norm_layer_they_reach():
    model = small_cnn()
    fit_stats(model, images(n_batches=2))
    bad = images(n_batches=2)
    bad[1][0][3, 0, 2, 2] = float("nan")
    report = audit(model, bad)
    assert found(report, "nonfinite-activations") == [("1", "error")]
    assert report.select("nonfinite-activations")[0].details["layers_affected"] == 2


def test_groups_of_a_single_value():
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(3 * 8 * 8, 8, bias=False), nn.Unflatten(1, (8, 1, 1)), nn.GroupNorm(8, 8)
    )
    report = audit(model, images(n_batches=1))
    assert found(report, "single-value-groups") == [("3", "error")]
    assert report.select("single-value-groups")[0].details["values_per_group"] == 1


# --------------------------------------------------------------------------- any torch.nn model


class TimmBatchNormAct2d(nn.BatchNorm2d):
    """timm's BatchNormAct2d pattern: a BatchNorm2d subclass with the activation inside."""

    def __init__(self, c, **kw):
        super().__init__(c, **kw)
        self.act = nn.ReLU()

    def forward(self, x):
        return self.act(super().forward(x))


class MyBatchNorm2d(nn.Module):
    """A BatchNorm not derived from torch's, recognised by its name and its attributes."""

    def __init__(self, c, momentum=0.1):
        super().__init__()
        self.num_features, self.momentum, self.eps = c, momentum, 1e-5
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))

    def forward(self, x):
        return F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, self.training, self.momentum, self.eps
        )


class FrozenBatchNorm2d(nn.Module):
    """torchvision/timm's FrozenBatchNorm2d pattern: buffers only, always the running statistics."""

    def __init__(self, c):
        super().__init__()
        for name, v in (("weight", 1.0), ("bias", 0.0), ("running_mean", 0.0), ("running_var", 1.0)):
            self.register_buffer(name, torch.full((c,), v))

    def forward(self, x):
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, 1e-5)


def test_timm_style_layers_are_recognised():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        TimmBatchNormAct2d(8, momentum=0.9),
        nn.Conv2d(8, 8, 3),
        MyBatchNorm2d(8, momentum=0.99),
        nn.Conv2d(8, 8, 3, bias=False),
        FrozenBatchNorm2d(8),
    ).train()
    report = audit(model, images(n_batches=1, n=4))
    assert found(report, "momentum-convention") == [("1", "error"), ("3", "error")]
    assert found(report, "bias-before-norm") == [("0", "info"), ("2", "info")]
    # the frozen layer always uses its running statistics: small batches do not matter to it
    assert report.select("small-batch")[0].related == ("1", "3")
    assert [f.check for f in report.findings if f.module == "5"] == []
    assert found(audit(model.eval()), "mode-mismatch") == []


class DataDependent(nn.Module):
    """Control flow on the data: torch.fx cannot trace it, forward hooks can."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3)
        self.bn = nn.BatchNorm2d(8)
        self.drop = nn.Dropout(0.2)
        self.conv2 = nn.Conv2d(8, 8, 3, bias=False)
        self.bn2 = nn.BatchNorm2d(8)

    def forward(self, x):
        if x.mean() > -1e9:
            x = self.bn(self.conv(x))
        return self.bn2(self.conv2(self.drop(x)))


def test_graph_from_forward_hooks_when_fx_cannot_trace():
    model = DataDependent().train()
    report = audit(model, images(n_batches=2))
    assert report.graph == "forward hooks"
    assert found(report, "bias-before-norm") == [("conv", "info")]
    assert found(report, "dropout-before-bn") == [("drop", "warning")]
    # no batches: no graph unless an input shape is given for one random batch
    report = audit(model)
    assert report.graph == "none" and found(report, "bias-before-norm") == []
    assert any("were not checked" in n for n in report.notes)
    report = audit(model, input_shape=(3, 8, 8))
    assert report.graph == "forward hooks" and found(report, "bias-before-norm") == [("conv", "info")]
    assert report.batches == 0 and found(report, "small-batch") == []  # the random batch feeds no statistic


def test_lazy_modules_are_audited_statically_and_never_initialised_by_the_audit():
    model = nn.Sequential(nn.LazyConv2d(8, 3), nn.LazyBatchNorm2d(momentum=0.99)).train()
    assert found(audit(model), "momentum-convention") == [("1", "error")]
    with pytest.raises(ValueError, match="lazy module that is not initialised"):
        audit(model, images(n_batches=1))
    assert model[0].has_uninitialized_params()


def test_ignore_and_argument_errors():
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).train()
    assert found(audit(model, ignore=["bias-before-norm"]), "bias-before-norm") == []
    with pytest.raises(ValueError, match="unknown check"):
        audit(model, ignore=["bias"])
    with pytest.raises(TypeError, match="torch.nn.Module"):
        audit("model")
    with pytest.raises(ValueError, match="expect must be"):
        audit(model, expect="inference")
    with pytest.raises(ValueError, match="yielded no batch"):
        audit(model, [])
    with pytest.raises(TypeError, match="forward=lambda"):
        audit(model, ["not a tensor"])
    with pytest.raises(ValueError, match="num_batches"):
        audit(model, images(), num_batches=0)
    assert audit(model, images(), num_batches=2).batches == 2


# --------------------------------------------------------------------------- the model is never changed


class Everything(nn.Module):
    """torch.nn and normlab BN in train mode, dropout, a frozen parameter, set/unset grads, user hooks."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8, momentum=0.99)
        self.drop = nn.Dropout(0.3)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = normlab.BatchNorm2d(8)
        self.ghost = normlab.GhostBatchNorm(8, virtual_batch_size=4)
        self.inorm = nn.InstanceNorm2d(8, track_running_stats=True)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        x = x * torch.tensor(1.0)  # a tensor constant: torch.fx stows it on the traced root as an attribute
        x = self.drop(torch.relu(self.bn(self.conv(x))))
        x = self.inorm(self.ghost(self.bn2(self.conv2(x))))
        return self.head(x.mean((2, 3)))


def built_everything():
    torch.manual_seed(0)
    model = Everything()
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for x, y in images(n_batches=2, n=8):
        opt.zero_grad()
        F.cross_entropy(model(x), y % 3).backward()
        opt.step()
    model.conv.bias.requires_grad_(False)
    model.conv.bias.grad = None
    model.bn2.eval()  # a mixed-mode model
    model.bn.register_forward_hook(lambda m, a, o: None)
    model.head.register_forward_pre_hook(lambda m, a: None)
    model.head.weight.register_hook(lambda g: g)
    return model


def snapshot(model):
    return {
        "params": {
            n: (p.detach().clone(), p._version, p.requires_grad, p.data_ptr()) for n, p in model.named_parameters()
        },
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "buffers": {n: (b.clone(), b._version, b.data_ptr()) for n, b in model.named_buffers()},
        "modes": {n: m.training for n, m in model.named_modules()},
        "attributes": {n: sorted(m.__dict__) for n, m in model.named_modules()},
        "flags": {
            n: (getattr(m, "track_running_stats", None), getattr(m, "momentum", None), getattr(m, "frozen", None))
            for n, m in model.named_modules()
        },
        "hooks": {
            n: tuple(
                tuple(getattr(m, h).items())
                for h in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_forward_hooks_with_kwargs")
            )
            for n, m in model.named_modules()
        },
        "tensor_hooks": {n: dict(p._backward_hooks or {}) for n, p in model.named_parameters()},
        "rng": torch.get_rng_state(),
        "grad_mode": torch.is_grad_enabled(),
    }


def assert_same(a, b):
    assert a.keys() == b.keys()
    for key in a:
        if key in ("params", "grads", "buffers"):
            assert a[key].keys() == b[key].keys(), key
            for name in a[key]:
                x, y = a[key][name], b[key][name]
                if x is None or y is None:
                    assert x is y, (key, name)
                    continue
                x, y = (x,) if isinstance(x, torch.Tensor) else x, (y,) if isinstance(y, torch.Tensor) else y
                for u, v in zip(x, y):
                    if isinstance(u, torch.Tensor):
                        assert torch.equal(u, v), (key, name)
                    else:
                        assert u == v, (key, name)
        elif key == "rng":
            assert torch.equal(a[key], b[key])
        else:
            assert a[key] == b[key], key


class Untraceable(nn.Module):
    def __init__(self, inner):
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x) if x.mean() > -1e9 else x  # control flow on the data


@pytest.mark.parametrize("mode", ["train", "eval", "expect-other"])
def test_audit_never_changes_the_model(mode):
    model = built_everything()
    if mode == "eval":
        model.eval()
        model.bn.train()  # a mode mismatch to report, and a layer that would update its statistics
    untraceable = Untraceable(model)  # forces the forward-hook graph
    before = snapshot(untraceable)
    report = audit(model, images(n_batches=3, n=8), expect="eval" if mode == "expect-other" else None)
    assert_same(before, snapshot(untraceable))
    assert len(report) > 0  # it did look: this model has pitfalls
    report = audit(untraceable, input_shape=(3, 8, 8))  # no batches: one random batch records the graph
    assert report.graph == "forward hooks"
    assert_same(before, snapshot(untraceable))
    audit(untraceable, images(n_batches=2, n=8))
    assert_same(before, snapshot(untraceable))


def test_audit_never_changes_the_model_even_when_the_model_raises():
    model = built_everything()
    bad = images(n_batches=1, n=8) + [torch.randn(8, 5, 8, 8)]
    before = snapshot(model)  # the second batch has the wrong channel count
    with pytest.raises(RuntimeError) as info:
        audit(model, bad)
    assert any("normlab.audit" in n for n in getattr(info.value, "__notes__", ["normlab.audit"]))
    assert_same(before, snapshot(model))


def test_train_mode_audit_leaves_running_statistics_and_counters_alone():
    model = small_cnn().train()
    tracked = model[1].num_batches_tracked.clone()
    mean = model[1].running_mean.clone()
    audit(model, images())
    assert torch.equal(model[1].num_batches_tracked, tracked) and torch.equal(model[1].running_mean, mean)
    model(images()[0][0])  # the model itself still updates them
    assert int(model[1].num_batches_tracked) == int(tracked) + 1


# --------------------------------------------------------------------------- output


def pitfall_report():
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3),
        nn.BatchNorm2d(8, momentum=0.99),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.Conv2d(8, 8, 3, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
    )
    model.eval()
    return audit(model, images(n_batches=2))


def test_json_round_trips_and_is_strict_json():
    report = pitfall_report()
    assert {"momentum-convention", "dropout-before-bn", "bias-before-norm"} <= checks(report)
    text = report.to_json()
    d = json.loads(text)
    assert d["normlab_audit"] == 1 and d["model"] == "Sequential" and d["expect"] == "eval"
    assert d["summary"] == {s: report.count(s) for s in ("error", "warning", "info")}
    assert {"check", "severity", "module", "message", "fix", "related", "details"} == set(d["findings"][0])
    again = AuditReport.from_json(text)
    assert again == report and again.to_json() == text
    assert AuditReport.from_dict(report.to_dict()) == report
    f = Finding("small-batch", "warning", "", "m", "f", details={"x": float("inf"), "t": torch.tensor([1.0, 2.0])})
    assert json.loads(json.dumps(f.to_dict(), allow_nan=False))["details"] == {"x": "inf", "t": [1.0, 2.0]}
    with pytest.raises(ValueError, match="severity"):
        Finding("small-batch", "fatal", "", "m", "f")
    with pytest.raises(ValueError, match="not a normlab audit report"):
        AuditReport.from_dict({"model": "x"})


def test_table_lists_every_finding_within_the_width():
    report = pitfall_report()
    table = report.to_table(width=100)
    assert table.splitlines()[0].startswith("normlab audit: Sequential audited for eval")
    assert report.summary() in table
    for f in report.findings:
        assert f.check in table
    assert all(len(line) <= 100 for line in table.splitlines()), table
    assert table.index("error") < table.index("warning") < table.index("info")  # sorted by severity


# --------------------------------------------------------------------------- command line


FACTORY_FILE = """
import torch
from torch import nn

def build():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8, momentum=0.99), nn.ReLU())
    batches = [torch.randn(16, 3, 8, 8) for _ in range(3)]
    return model.eval(), batches

def model_only():
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)).train()

def not_a_model():
    return 42
"""


@pytest.fixture
def factory_file(tmp_path):
    path = tmp_path / "nets.py"
    path.write_text(textwrap.dedent(FACTORY_FILE))
    return path


def test_audit_main_on_a_python_file(factory_file, capsys):
    assert audit_main([f"{factory_file}:build"]) == 1  # an error was found
    out = capsys.readouterr().out
    assert "momentum-convention" in out and "bias-before-norm" in out and "3 batches, 48 samples" in out
    assert audit_main([f"{factory_file}:build", "--json", "--batches", "2"]) == 1
    d = json.loads(capsys.readouterr().out)
    assert d["batches"] == 2 and {f["check"] for f in d["findings"]} >= {"momentum-convention", "bias-before-norm"}
    assert audit_main([f"{factory_file}:build", "--fail-on", "never"]) == 0
    capsys.readouterr()
    assert audit_main([f"{factory_file}:model_only"]) == 0  # only an info finding
    assert "bias-before-norm" in capsys.readouterr().out
    assert audit_main([f"{factory_file}:model_only", "--fail-on", "info", "--input-shape", "3,8,8"]) == 1


def test_audit_main_on_a_dotted_module(factory_file, monkeypatch, capsys):
    monkeypatch.syspath_prepend(str(factory_file.parent))
    assert audit_main(["nets:build", "--expect", "train", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["expect"] == "train"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["nets.py"], "PATH_OR_MODULE:FACTORY"),
        (["{dir}/missing.py:build"], "no such Python file"),
        (["/etc/passwd:build"], "is not a Python file"),
        (["{file}:nope"], "no callable 'nope'"),
        (["{file}:not_a_model"], "must return a torch.nn.Module"),
        (["no_such_module_xyz:build"], "cannot import module"),
        (["{file}:build", "--batches", "0"], "--batches must be a positive integer"),
        (["{file}:build", "--input-shape", "3", "a"], "--input-shape"),
    ],
)
def test_audit_main_usage_errors_are_one_line_and_status_2(factory_file, capsys, argv, message):
    argv = [a.format(dir=factory_file.parent, file=factory_file) for a in argv]
    assert audit_main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_the_audit_is_library_code_and_imports_no_lab_module():
    code = (
        "import sys, normlab, normlab.audit.cli;"
        "LAB_EXTRA = ('matplotlib', 'sklearn', 'mnist1d', 'pandas');"  # the lab extra's (tqdm: torch imports it)
        "print(sorted(m for m in sys.modules if m.startswith('normlab.lab') or m in LAB_EXTRA))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
    assert callable(normlab.audit) and normlab.AuditReport is AuditReport  # the README's names
