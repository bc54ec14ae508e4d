"""normlab.audit's behavioural checks: hand-written norm layers are measured, not trusted.

The S2 text's from-scratch BatchNorm (copied below as the text writes it, and a
1-d variant) declares ``momentum=0.1`` but updates ``running = 0.1·running +
0.9·batch``, assigns its buffers from a computation (so they carry autograd
history), stores the biased variance, and in eval mode broadcasts its (C,)
running statistics against the last axis of (N, C, H, W). The audit must name
each with the numbers, which are checked here against an independent numpy
computation on the same batch. A correct hand-written BN (PyTorch's convention,
updates under ``torch.no_grad()``) is checked against ``torch.nn.BatchNorm2d``
and must give exactly the findings ``torch.nn.BatchNorm2d`` gives: none once
trained.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from test_audit import assert_same, found, snapshot
from torch import nn

import normlab
from normlab.audit import audit

NEW_CHECKS = {
    "momentum-mismatch",
    "buffer-autograd",
    "running-var-biased",
    "affine-per-sample",
    "eval-per-position",
    "eval-batch-dependent",
}


# --------------------------------------------------------------------------- the layers


class BatchNorm(torch.nn.Module):
    """The S2 text's BatchNorm, as it writes it (for (N, C, H, W) input)."""

    def __init__(self, num_features, eps=1e-5, momentum=0.1):
        super(BatchNorm, self).__init__()  # noqa: UP008 - as the text writes it
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.gamma = torch.nn.Parameter(torch.ones(num_features))
        self.beta = torch.nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x):
        if self.training:
            mean = x.mean(dim=(0, 2, 3), keepdim=True)
            var = x.var(dim=(0, 2, 3), unbiased=False, keepdim=True)
            self.running_mean = self.momentum * self.running_mean + (1 - self.momentum) * mean.squeeze()
            self.running_var = self.momentum * self.running_var + (1 - self.momentum) * var.squeeze()
        else:
            mean = self.running_mean
            var = self.running_var

        x_normalized = (x - mean) / torch.sqrt(var + self.eps)
        out = self.gamma.view(1, -1, 1, 1) * x_normalized + self.beta.view(1, -1, 1, 1)
        return out


class BatchNorm1d(BatchNorm):
    """The same code for (N, D) input: statistics over axis 0."""

    def forward(self, x):
        if self.training:
            mean = x.mean(dim=0, keepdim=True)
            var = x.var(dim=0, unbiased=False, keepdim=True)
            self.running_mean = self.momentum * self.running_mean + (1 - self.momentum) * mean.squeeze()
            self.running_var = self.momentum * self.running_var + (1 - self.momentum) * var.squeeze()
        else:
            mean = self.running_mean
            var = self.running_var
        x_normalized = (x - mean) / torch.sqrt(var + self.eps)
        return self.gamma * x_normalized + self.beta


class CorrectBatchNorm(BatchNorm):
    """The fix (the README's): PyTorch's convention, unbiased running variance, updates under no_grad, and the
    statistics put on the channel axis in eval too. Works for (N, C) and (N, C, *) input."""

    def forward(self, x):
        dims = [0, *range(2, x.dim())]
        shape = [1, -1] + [1] * (x.dim() - 2)
        if self.training:
            mean = x.mean(dim=dims)
            var = x.var(dim=dims, unbiased=False)
            with torch.no_grad():
                n = x.numel() / x.shape[1]
                self.running_mean.lerp_(mean, self.momentum)  # (1 - momentum)·running + momentum·batch
                self.running_var.lerp_(var * n / (n - 1), self.momentum)  # unbiased, as PyTorch stores it
        else:
            mean, var = self.running_mean, self.running_var
        x_normalized = (x - mean.view(shape)) / torch.sqrt(var.view(shape) + self.eps)
        return self.gamma.view(shape) * x_normalized + self.beta.view(shape)


def conv_net(norm, c=8):
    """Conv -> BN -> ReLU -> Linear on (N, 3, 8, 8): the BN sees (N, 8, 8, 8), so W == C and S2's eval runs."""
    return nn.Sequential(
        nn.Conv2d(3, c, 3, padding=1, bias=False), norm(c), nn.ReLU(), nn.Flatten(), nn.Linear(c * 64, 10)
    )


def pooled_net(norm, c=8):
    """Conv -> pool -> BN on (N, C) -> ReLU -> Linear: a 1-d BN."""
    return nn.Sequential(
        nn.Conv2d(3, c, 3, padding=1, bias=False),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        norm(c),
        nn.ReLU(),
        nn.Linear(c, 10),
    )


def trained(build, norm, steps, seed=0):
    torch.manual_seed(seed)
    model = build(norm)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    for _ in range(steps):
        x, y = torch.randn(16, 3, 8, 8), torch.randint(0, 10, (16,))
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    return model.eval()


def test_batches(n=3, seed=7):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(16, 3, 8, 8, generator=g) for _ in range(n)]


test_batches.__test__ = False  # a helper, not a test


def one_step_numpy(layer: nn.Module, x: torch.Tensor, axes: tuple[int, ...]) -> dict:
    """An independent measurement: one training-mode forward of a fresh copy (state loaded from a state dict) in
    float64; the new batch's weight by least squares over channels and the variance the update stored, in numpy."""
    fresh = type(layer)(layer.num_features, momentum=layer.momentum).double()
    fresh.load_state_dict({k: v.detach() for k, v in layer.state_dict().items()})
    r0, v0 = fresh.running_mean.numpy().copy(), fresh.running_var.numpy().copy()
    with torch.no_grad():
        fresh.train()(x.double())
    r1, v1 = fresh.running_mean.detach().numpy(), fresh.running_var.detach().numpy()
    a = x.double().numpy()
    mean = a.mean(axis=axes)
    w = float(((r1 - r0) * (mean - r0)).sum() / ((mean - r0) ** 2).sum())
    return {
        "weight": w,
        "stored_var": (v1 - (1 - w) * v0) / w,
        "biased": a.var(axis=axes, ddof=0),
        "unbiased": a.var(axis=axes, ddof=1),
        "n": a.size // a.shape[1],
    }


# --------------------------------------------------------------------------- S2's BatchNorm, as written


def test_s2_batchnorm_as_written_is_caught_with_the_measured_numbers():
    model = trained(conv_net, BatchNorm, steps=5)
    data = test_batches()
    report = audit(model, data)
    bn = model[1]
    assert {(f.module, f.check, f.severity) for f in report.findings} == {
        ("1", "momentum-mismatch", "error"),
        ("1", "buffer-autograd", "error"),
        ("1", "eval-per-position", "error"),
        ("1", "running-var-biased", "info"),
    }, str(report)

    # the EMA weight: the audit's measurement against numpy's on the same batch (the BN input of batch 0)
    ref = one_step_numpy(bn, model[0](data[0]).detach(), axes=(0, 2, 3))
    (f,) = report.select("momentum-mismatch")
    assert f.details["measured_weight"] == pytest.approx(ref["weight"], abs=1e-9)
    assert ref["weight"] == pytest.approx(1 - bn.momentum, abs=1e-9)  # the decay convention
    assert f.details["declared_weight"] == pytest.approx(bn.momentum) and f.details["momentum"] == 0.1
    assert "0.1" in f.message and "0.900" in f.message and "decay convention" in f.message
    assert "lerp_" in f.fix and "torch.no_grad()" in f.fix

    # the variance stored: numpy says the biased one, and so does the audit (info)
    np.testing.assert_allclose(ref["stored_var"], ref["biased"], rtol=1e-9)
    assert not np.allclose(ref["stored_var"], ref["unbiased"], rtol=1e-5, atol=0)
    (f,) = report.select("running-var-biased")
    assert f.details["values_per_channel"] == ref["n"] == 16 * 8 * 8
    assert f.details["factor"] == pytest.approx(ref["n"] / (ref["n"] - 1))

    # autograd history: in the model now, and again after one training forward of a copy
    assert bn.running_mean.grad_fn is not None and bn.running_var.grad_fn is not None
    (f,) = report.select("buffer-autograd")
    assert f.details["buffers"] == ["running_mean", "running_var"]
    assert f.details["in_model"] and f.details["after_training_forward"]
    with pytest.raises(RuntimeError, match="deepcopy"):  # one of the consequences the finding names
        copy.deepcopy(model)
    longer = trained(conv_net, BatchNorm, steps=10)
    (g,) = audit(longer, data).select("buffer-autograd")
    assert g.details["graph_nodes"] > f.details["graph_nodes"] > 0  # the graph grows with every step

    # eval: the (C,) statistics broadcast against W; the per-channel formula (numpy, and F.batch_norm) differs
    x = model[0](data[0]).detach().double().numpy()
    rm, rv = bn.running_mean.detach().double().numpy(), bn.running_var.detach().double().numpy()
    g_, b_ = bn.gamma.detach().double().numpy(), bn.beta.detach().double().numpy()
    per_channel = (x - rm[:, None, None]) / np.sqrt(rv[:, None, None] + bn.eps) * g_[:, None, None] + b_[:, None, None]
    torch_ref = F.batch_norm(torch.from_numpy(x), *(torch.from_numpy(t) for t in (rm, rv, g_, b_)), False, 0.0, bn.eps)
    np.testing.assert_allclose(torch_ref.numpy(), per_channel, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        s2 = bn(torch.from_numpy(x).float()).double().numpy()
    assert np.abs(s2 - per_channel).max() > 0.01 * np.abs(per_channel).max()
    assert report.select("eval-per-position")[0].details["relative_change"] > 0.01


def test_s2_batchnorm_1d_variant_is_caught_and_its_eval_is_right():
    model = trained(pooled_net, BatchNorm1d, steps=5)
    data = test_batches()
    report = audit(model, data)
    assert {(f.module, f.check) for f in report.findings} == {
        ("3", "momentum-mismatch"),
        ("3", "buffer-autograd"),
        ("3", "running-var-biased"),
    }, str(report)
    features = model[:3](data[0]).detach()  # (N, C): the BN's input
    ref = one_step_numpy(model[3], features, axes=(0,))
    assert report.select("momentum-mismatch")[0].details["measured_weight"] == pytest.approx(ref["weight"], abs=1e-9)
    assert ref["weight"] == pytest.approx(0.9, abs=1e-9)
    np.testing.assert_allclose(ref["stored_var"], ref["biased"], rtol=1e-9)
    info = report.select("running-var-biased")[0].details
    assert info["values_per_channel"] == ref["n"] == 16 and info["factor"] == pytest.approx(16 / 15)


def test_s2_batchnorm_whose_eval_cannot_run_is_caught_when_audited_for_training():
    # W = 6 != C = 8: S2's eval broadcast fails, so only a training-mode audit can run the model
    model = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False), BatchNorm(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten()
    ).train()
    data = [torch.randn(16, 3, 6, 6) for _ in range(2)]
    with pytest.raises(RuntimeError, match="size of tensor"):  # the oracle: the layer's own eval forward
        copy.deepcopy(model).eval()(data[0])
    report = audit(model, data)
    assert {(f.module, f.check) for f in report.select(module="1")} == {
        ("1", "momentum-mismatch"),
        ("1", "buffer-autograd"),
        ("1", "eval-per-position"),
        ("1", "running-var-biased"),
    }, str(report)
    f = report.select("eval-per-position")[0]
    assert "raises" in f.message and "size of tensor" in f.details["error"]


def test_s2_model_without_batches_still_shows_the_autograd_history():
    report = audit(trained(conv_net, BatchNorm, steps=2))
    (f,) = report.select("buffer-autograd")
    assert f.details["in_model"] and not f.details["after_training_forward"]
    assert found(report, "momentum-mismatch") == []  # measuring needs a batch
    assert any("behavioural checks" in n for n in report.notes)


def test_the_audit_leaves_the_s2_model_and_its_graph_alone():
    model = trained(conv_net, BatchNorm, steps=3)
    grad_fns = {k: b.grad_fn for k, b in model.named_buffers()}
    before = snapshot(model)
    audit(model, test_batches())
    audit(model.train(), test_batches())
    model.eval()
    assert_same(before, snapshot(model))
    assert {k: b.grad_fn for k, b in model.named_buffers()} == grad_fns  # the same autograd nodes, not copies


# --------------------------------------------------------------------------- the correct hand-written BN


@pytest.mark.parametrize(
    "build, torch_bn, k, steps",
    [(conv_net, nn.BatchNorm2d, 1, 30), (pooled_net, nn.BatchNorm1d, 3, 80)],
    ids=["2d", "1d"],
)
def test_correct_hand_written_bn_matches_torch_and_gives_no_finding(build, torch_bn, k, steps):
    mine, ref = trained(build, CorrectBatchNorm, steps=steps), trained(build, torch_bn, steps=steps)
    # the oracle: the same training with torch.nn's BN gives the same running statistics and outputs
    torch.testing.assert_close(mine[k].running_mean, ref[k].running_mean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(mine[k].running_var, ref[k].running_var, rtol=1e-4, atol=1e-5)
    x = test_batches(1)[0]
    torch.testing.assert_close(mine(x), ref(x), rtol=1e-4, atol=1e-4)
    report = audit(mine, test_batches())
    assert report.findings == (), str(report)
    assert report.notes == ()


def test_correct_hand_written_bn_gets_exactly_torch_s_findings_early_in_training():
    data = test_batches()
    mine = audit(trained(conv_net, CorrectBatchNorm, steps=5), data)
    ref = audit(trained(conv_net, nn.BatchNorm2d, steps=5), data)
    key = lambda r: [(f.module, f.check, f.severity) for f in r.findings]  # noqa: E731
    assert key(mine) == key(ref)
    assert not NEW_CHECKS & {f.check for f in mine.findings}


# --------------------------------------------------------------------------- other hand-written updates


class HandBN(nn.Module):
    """A 1-d BN whose running-statistics update is chosen by ``rule`` (updated under no_grad)."""

    def __init__(self, c, rule, momentum=0.1):
        super().__init__()
        self.rule, self.momentum = rule, momentum
        self.weight = nn.Parameter(torch.ones(c))
        self.bias = nn.Parameter(torch.zeros(c))
        self.register_buffer("running_mean", torch.zeros(c))
        self.register_buffer("running_var", torch.ones(c))

    def forward(self, x):
        if not self.training:
            return (x - self.running_mean) / (self.running_var + 1e-5).sqrt() * self.weight + self.bias
        mean, var = x.mean(0), x.var(0)
        with torch.no_grad():
            m = self.momentum
            if self.rule == "decay":  # Keras-style, written correctly: momentum is the decay
                self.running_mean.mul_(m).add_((1 - m) * mean)
                self.running_var.mul_(m).add_((1 - m) * var)
            elif self.rule == "overwrite":
                self.running_mean.copy_(mean)
                self.running_var.copy_(var)
            elif self.rule == "twice":
                for _ in range(2):
                    self.running_mean.lerp_(mean, m)
                    self.running_var.lerp_(var, m)
            elif self.rule == "never":
                pass
        return (x - mean) / (x.var(0, unbiased=False) + 1e-5).sqrt() * self.weight + self.bias


@pytest.mark.parametrize(
    "rule, momentum, measured, cause",
    [
        ("decay", 0.9, 0.1, "decay convention"),
        ("overwrite", 0.1, 1.0, "overwrites"),
        ("twice", 0.1, 0.19, "2 updates"),
        ("never", 0.1, 0.0, "did not move"),
    ],
)
def test_measured_weight_names_the_likely_cause(rule, momentum, measured, cause):
    model = nn.Sequential(nn.Linear(6, 4, bias=False), HandBN(4, rule, momentum)).eval()
    report = audit(model, [torch.randn(32, 6) for _ in range(2)])
    (f,) = report.select("momentum-mismatch")
    assert f.module == "1" and f.details["measured_weight"] == pytest.approx(measured, abs=1e-9)
    assert f.details["declared_weight"] == pytest.approx(momentum)
    assert cause in f.message
    # momentum=0.9 alone would be a momentum-convention error; the measurement shows the layer is a decay
    # layer written correctly, so the attribute's finding is replaced by the measured one
    assert found(report, "momentum-convention") == [] and found(report, "momentum-range") == []
    assert found(report, "running-var-biased") == []  # x.var() is unbiased


@pytest.mark.parametrize(
    "layer",
    [
        lambda: nn.BatchNorm1d(4, momentum=0.3),
        lambda: nn.BatchNorm1d(4, momentum=None),
        lambda: normlab.BatchNorm1d(4, momentum=0.99, momentum_convention="decay"),
        lambda: normlab.BatchNorm1d(4, momentum=0.99, momentum_convention="decay", debias=True),
        lambda: normlab.BatchNorm1d(4, unbiased_running_var=False),
        lambda: normlab.BatchNorm1d(4, frozen=True),
        lambda: normlab.GhostBatchNorm(4, virtual_batch_size=8),
        lambda: normlab.BatchRenorm(4),
        lambda: normlab.NoisyBatchNorm(4),
        lambda: nn.LayerNorm(4),
        lambda: normlab.RMSNorm(4),
    ],
    ids=[
        "torch-0.3",
        "torch-None",
        "decay",
        "decay-debias",
        "biased-var",
        "frozen",
        "ghost",
        "renorm",
        "noisy",
        "ln",
        "rms",
    ],
)
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_library_layers_do_what_they_declare(layer, mode):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 4, bias=False), layer())
    model.train()(torch.randn(32, 6))  # a step so that num_batches_tracked > 0
    report = audit(getattr(model, mode)(), [torch.randn(32, 6) for _ in range(2)])
    assert not NEW_CHECKS & {f.check for f in report.findings}, str(report)
    assert not any("behavioural" in n for n in report.notes)


# --------------------------------------------------------------------------- per-sample parameters, eval


class S2LayerNormPerSample(nn.Module):
    """S2's LayerNorm with γ and β shaped as its table says for (N, D) input: (N,), one per sample."""

    def __init__(self, batch_size, eps=1e-5):
        super().__init__()
        self.eps = eps
        self.gamma = nn.Parameter(torch.ones(batch_size))
        self.beta = nn.Parameter(torch.zeros(batch_size))

    def forward(self, x):  # (N, D)
        mean = x.mean(dim=-1, keepdim=True)
        std = x.std(dim=-1, unbiased=False, keepdim=True)
        x_normalized = (x - mean) / torch.sqrt(std**2 + self.eps)
        return self.gamma.view(-1, 1) * x_normalized + self.beta.view(-1, 1)


class S2LayerNorm(nn.Module):
    """S2's LayerNorm code as written: γ, β of shape (features,), broadcast over the last axis."""

    def __init__(self, features, eps=1e-5, momentum=0.1):
        super().__init__()
        self.features, self.eps, self.momentum = features, eps, momentum
        self.gamma = nn.Parameter(torch.ones(features))
        self.beta = nn.Parameter(torch.zeros(features))

    def forward(self, x):
        mean = x.mean(dim=-1, keepdim=True)
        std = x.std(dim=-1, unbiased=False, keepdim=True)
        x_normalized = (x - mean) / torch.sqrt(std**2 + self.eps)
        return self.gamma * x_normalized + self.beta


@pytest.mark.parametrize(
    "norm, expected",
    [
        (lambda: S2LayerNormPerSample(16), [("1", "gamma"), ("1", "beta")]),
        (lambda: S2LayerNorm(12), []),
        (lambda: S2LayerNorm(16), []),  # γ has the batch's size too, but it is applied per feature
        (lambda: nn.LayerNorm(16), []),
        (lambda: nn.BatchNorm1d(16), []),
    ],
    ids=["per-sample", "s2-code-D12", "s2-code-D16", "torch-ln", "torch-bn"],
)
def test_parameters_indexed_by_the_sample_are_found_by_behaviour(norm, expected):
    layer = norm()
    d = layer.gamma.numel() if isinstance(layer, S2LayerNorm) else 16
    model = nn.Sequential(nn.Linear(5, d), layer, nn.ReLU()).eval()
    report = audit(model, [torch.randn(16, 5) for _ in range(2)])
    got = [(f.module, f.details["parameter"]) for f in report.select("affine-per-sample")]
    assert got == expected
    assert NEW_CHECKS & {f.check for f in report.findings} <= {"affine-per-sample"}, str(report)
    if expected:
        f = report.select("affine-per-sample")[0]
        assert f.severity == "error" and f.details["shape"] == [16] and f.details["batch_size"] == 16
        # the oracle: moving gamma[0] moves sample 0's output only
        with torch.no_grad():
            x = torch.randn(16, 16)
            before = layer(x)
            layer.gamma[0] += 1.0
            change = (layer(x) - before).abs().amax(1)
        assert change[0] > 0 and torch.all(change[1:] == 0)


class EvalUsesBatchStats(CorrectBatchNorm):
    """Updates its running statistics correctly but never uses them: eval normalises with the batch's statistics."""

    def forward(self, x):  # (N, C)
        if self.training:
            return super().forward(x)
        mean, var = x.mean(0), x.var(0, unbiased=False)
        return (x - mean) / torch.sqrt(var + self.eps) * self.gamma + self.beta


def test_eval_output_that_depends_on_the_batch():
    model = trained(pooled_net, EvalUsesBatchStats, steps=3)
    report = audit(model, test_batches())
    (f,) = report.select("eval-batch-dependent")
    assert f.module == "3" and f.severity == "error" and f.details["relative_change"] > 1e-3
    with torch.no_grad():  # the oracle: the first half of a batch, alone and with the rest
        x = model[:3](test_batches(1)[0])
        alone, together = model[3](x[:8]), model[3](x)[:8]
    assert (alone - together).abs().max() > 1e-3
    assert found(audit(trained(pooled_net, CorrectBatchNorm, steps=3), test_batches()), "eval-batch-dependent") == []


class Raises(CorrectBatchNorm):
    """Runs in the model's float32 but refuses anything else (and so its copy in float64 and train mode)."""

    def forward(self, x):
        if self.training:
            raise RuntimeError("this layer cannot train")
        return super().forward(x)


def test_a_copy_that_raises_skips_the_behavioural_checks_with_a_note():
    model = nn.Sequential(nn.Linear(5, 4, bias=False), Raises(4)).eval()
    with torch.no_grad():
        model[1].running_var.fill_(2.0)
    report = audit(model, [torch.randn(16, 5)])
    assert not NEW_CHECKS & {f.check for f in report.findings}
    (note,) = [n for n in report.notes if "behavioural checks" in n]
    assert "1" in note and "this layer cannot train" in note


# --------------------------------------------------------------------------- the README's example


def _readme_blocks(section: str) -> tuple[str, str, str]:
    """The S2 example, its printed output and the fixed forward, found by the README's test directives."""
    outputs = re.finditer(r"<!-- readme-test: output of the block above -->\s*```text\n(.*?)```", section, re.S)
    output = next(m for m in outputs if "momentum-mismatch" in m.group(1))
    example = list(re.finditer(r"```python\n(.*?)```", section[: output.start()], re.S))[-1]
    fix = re.search(r"<!-- readme-test: skip: the fixed forward[^>]*-->\s*```python\n(.*?)```", section, re.S)
    return example.group(1), output.group(1), fix.group(1)


def _printed_by(code: str) -> str:
    printed = []
    namespace = {"print": lambda *a, **k: printed.append(" ".join(map(str, a)))}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - the repository's own README
    return "\n".join(printed).rstrip()


def test_readme_s2_example_prints_what_the_readme_shows_and_the_fix_prints_nothing():
    readme = (Path(__file__).parents[1] / "README.md").read_text()
    section = readme[readme.index("## Auditing a model") :]
    code, output, fix = _readme_blocks(section)
    assert _printed_by(code) == output.rstrip()
    start, end = code.index("    def forward(self, x):"), code.index("\n\ntorch.manual_seed(0)")
    fixed = code[:start] + fix + code[end:]
    assert _printed_by(fixed).splitlines()[1] == "no findings"
    with_torch = code.replace("BatchNorm(8)", "nn.BatchNorm2d(8)")
    assert _printed_by(with_torch).splitlines()[1] == "no findings"
