"""Issue 9's instruments: internal covariate shift, saturation, gradient norms and noisy BatchNorm."""

import math

import pytest
import torch
from torch import nn

import normlab
from normlab.lab import probes

F64 = torch.float64


def two_layer(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 3, bias=False), nn.Linear(3, 2, bias=False)).double()


def mse(out, y):
    return 0.5 * (out - y).pow(2).sum(1).mean()


def hand_grads(w1, w2, x, y):
    """Gradients of 1/2 mean_n |W2 W1 x_n - y_n|^2.

    G1 = W2^T R^T X / n, G2 = R^T (W1 X^T)^T / n, R = X W1^T W2^T - Y.
    """
    n = x.shape[0]
    h = x @ w1.T  # (n, 3)
    r = h @ w2.T - y  # (n, 2)
    return w2.T @ r.T @ x / n, r.T @ h / n


def _ics_check(optimizer_factory, stepped_w1):
    net = two_layer()
    x, y = torch.randn(8, 4, dtype=F64), torch.randn(8, 2, dtype=F64)
    opt = optimizer_factory(net.parameters())
    res = probes.internal_covariate_shift(net, mse, (x, y), optimizer=opt, mode="train")
    w1, w2 = net[0].weight.detach(), net[1].weight.detach()
    g1, g2 = hand_grads(w1, w2, x, y)
    _, g2_shift = hand_grads(stepped_w1(w1, g1), w2, x, y)  # layer 2's gradient after layer 1 stepped
    assert [r.name for r in res] == ["0", "1"]
    first, second = res
    assert first.l2 == 0.0 and first.cosine == pytest.approx(1.0) and first.preceding == 0  # nothing precedes layer 1
    assert first.grad_norm == pytest.approx(float(g1.norm()), rel=1e-12)
    assert second.preceding == 1
    assert second.l2 == pytest.approx(float((g2 - g2_shift).norm()), rel=1e-10)
    assert second.cosine == pytest.approx(float((g2 * g2_shift).sum() / (g2.norm() * g2_shift.norm())), rel=1e-12)
    assert second.shifted_grad_norm == pytest.approx(float(g2_shift.norm()), rel=1e-12)
    assert second.l2 > 1e-3  # a real shift, so the comparison above can fail


def test_ics_two_layer_linear_sgd_matches_hand_computation():
    lr = 0.3
    _ics_check(lambda ps: torch.optim.SGD(ps, lr=lr), lambda w1, g1: w1 - lr * g1)


def test_ics_uses_the_optimizers_own_step_adam():
    lr, eps = 0.05, 1e-8
    # Adam's first step: m_hat = g, v_hat = g^2, so W <- W - lr g / (|g| + eps)
    _ics_check(lambda ps: torch.optim.Adam(ps, lr=lr, eps=eps), lambda w1, g1: w1 - lr * g1 / (g1.abs() + eps))


def test_ics_with_bn_between_layers_counts_bn_parameters_as_preceding():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), normlab.BatchNorm1d(5), nn.ReLU(), nn.Linear(5, 3), nn.Linear(3, 2))
    x, y = torch.randn(16, 4), torch.randint(0, 2, (16,))
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9)
    res = probes.internal_covariate_shift(net, nn.functional.cross_entropy, (x, y), optimizer=opt, mode="train")
    assert [r.name for r in res] == ["0", "3", "4"]
    assert [r.preceding for r in res] == [0, 4, 6]  # Linear(w, b) + BN(w, b), then + Linear 3's (w, b)
    assert all(-1 <= r.cosine <= 1 + 1e-6 for r in res)


def test_saturation_fraction_of_known_preactivations():
    z = torch.linspace(-8, 8, 1601).view(1601, 1)  # (N, 1), step 0.01
    t = 0.05
    tanh_cut = math.atanh(math.sqrt(1 - t))  # 1 - tanh(z)^2 < t  <=>  |z| > atanh(sqrt(1 - t))
    sig_cut = 2 * tanh_cut  # 4 s(z)(1 - s(z)) = 1 - tanh(z/2)^2
    both = nn.ModuleDict({"t": nn.Tanh(), "s": nn.Sigmoid()})

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.acts = both

        def forward(self, x):
            return self.acts["t"](x) + self.acts["s"](x)

    st = probes.saturation(Two(), z, mode="eval", threshold=t)
    assert st["acts.t"].kind == "tanh" and st["acts.s"].kind == "sigmoid"
    assert st["acts.t"].count == int((z.abs() > tanh_cut).sum()) and st["acts.t"].total == 1601
    assert st["acts.s"].count == int((z.abs() > sig_cut).sum())
    assert st["acts.t"].fraction == pytest.approx(int((z.abs() > tanh_cut).sum()) / 1601)
    assert 0 < st["acts.t"].fraction < 1 and st["acts.s"].fraction < st["acts.t"].fraction
    assert st["acts.t"].mean_derivative == pytest.approx(float((1 - torch.tanh(z.double()) ** 2).mean()), rel=1e-9)


def test_gradient_norms_per_layer():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(4, 5), nn.Sigmoid(), nn.Linear(5, 2))
    x, y = torch.randn(10, 4), torch.randint(0, 2, (10,))
    gn = probes.gradient_norms(net, nn.functional.cross_entropy, (x, y), mode="train")
    nn.functional.cross_entropy(net(x), y).backward()
    for name in ("0", "2"):
        want = math.sqrt(sum(float(p.grad.pow(2).sum()) for p in net[int(name)].parameters()))
        assert gn[name] == pytest.approx(want, rel=1e-5)


# --------------------------------------------------------------------------- noisy BN


def test_noisy_batchnorm_moments_match_the_configured_noise():
    from normlab.layers.noisy import NoisyBatchNorm

    torch.manual_seed(0)
    k, m, s = 1.5, 0.4, 0.3
    bn = NoisyBatchNorm(3, noise_mean=m, noise_std=s, strength=k).double().train()
    x = torch.randn(4096, 3, dtype=F64) * 3 + 2
    calls = 300
    means, variances = [], []
    with torch.no_grad():
        for _ in range(calls):
            y = bn(x)  # (N, C); a fresh noise draw per call
            means.append(y.mean(0))
            variances.append(y.var(0, unbiased=False))
    means, variances = torch.stack(means), torch.stack(variances)  # (calls, C)
    # E[channel mean] = k m; Var over steps of the channel mean = (k m)^2 / 3 (mu_c ~ U(0, 2 k m))
    assert float(means.mean()) == pytest.approx(k * m, abs=4 * k * m / math.sqrt(3 * calls * 3))
    assert float(means.var()) == pytest.approx((k * m) ** 2 / 3, rel=0.15)
    # E[within-step variance] = 1 + 2 E[sigma^2] = 1 + (8/3) k^2 s^2
    assert float(variances.mean()) == pytest.approx(1 + 8 / 3 * (k * s) ** 2, rel=0.04)
    # overall: Var[z] = 1 + (8/3) k^2 s^2 + (1/3) k^2 m^2
    total = float(variances.mean() + means.var(unbiased=False))
    assert total == pytest.approx(1 + 8 / 3 * (k * s) ** 2 + (k * m) ** 2 / 3, rel=0.05)


def test_noisy_batchnorm_is_bn_in_eval_without_noise_and_keeps_clean_running_stats():
    from normlab.layers.noisy import NoisyBatchNorm

    x = torch.randn(32, 4, 5, dtype=F64) + 1
    ref = normlab.BatchNorm1d(4).double()
    noisy = NoisyBatchNorm(4).double()
    noisy.load_state_dict(ref.state_dict())
    y_ref, y_noisy = ref(x), noisy(x)
    assert not torch.allclose(y_ref, y_noisy)
    torch.testing.assert_close(noisy.running_mean, ref.running_mean)  # statistics of the clean batch
    torch.testing.assert_close(noisy.running_var, ref.running_var)
    ref.eval(), noisy.eval()
    torch.testing.assert_close(noisy(x), ref(x))
    quiet = NoisyBatchNorm(4, strength=0.0).double().train()
    torch.testing.assert_close(quiet(x), normlab.BatchNorm1d(4).double()(x))
    assert set(noisy.state_dict()) == set(nn.BatchNorm1d(4).state_dict())


def test_noisy_batchnorm_is_registered_and_redraws_every_step():

    assert "noisybatchnorm" in normlab.norm_names()
    bn = normlab.make_norm("noisybatchnorm", 6, feature_dim=-1, strength=0.5)
    assert isinstance(bn, probes.NoisyBatchNorm) and bn.strength == 0.5 and bn.stochastic
    x = torch.randn(4, 7, 6)
    assert not torch.equal(bn(x), bn(x))
    torch.manual_seed(3)
    a = bn(x)
    torch.manual_seed(3)
    assert torch.equal(a, bn(x))  # seeded by the global torch seed, like dropout
    with pytest.raises(ValueError, match="noise_std"):
        probes.NoisyBatchNorm(3, noise_std=-1)


def test_noisy_batchnorm_is_twice_differentiable_for_a_fixed_noise_draw():
    from normlab.layers.noisy import NoisyBatchNorm

    bn = NoisyBatchNorm(3, after_affine=True).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
    x = torch.randn(6, 3, dtype=F64, requires_grad=True)

    def f(x, w):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            return torch.func.functional_call(bn, {"weight": w}, (x,))

    assert torch.autograd.gradcheck(f, (x, bn.weight.detach().clone().requires_grad_()))
    assert torch.autograd.gradgradcheck(f, (x, bn.weight.detach().clone().requires_grad_()))
