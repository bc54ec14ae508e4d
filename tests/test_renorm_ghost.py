"""Batch Renorm and Ghost BatchNorm against numpy and torch.nn.functional; gradcheck/gradgradcheck in float64."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.autograd import gradcheck, gradgradcheck

import normlab

C = 3


def _affine(m, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        m.weight.copy_(torch.rand(C, generator=g, dtype=torch.float64) + 0.5)
        m.bias.copy_(torch.rand(C, generator=g, dtype=torch.float64) - 0.5)
    return m


def _renorm(**kw):
    return _affine(normlab.BatchRenorm(C, **kw).double().train())


# --------------------------------------------------------------------------- Batch Renorm


@pytest.mark.parametrize("feature_dim,shape", [(1, (6, C, 4)), (1, (6, C, 2, 3)), (-1, (5, 4, C))])
def test_renorm_with_rmax_1_dmax_0_is_batchnorm(feature_dim, shape):
    rn = _renorm(r_max=1.0, d_max=0.0, r_max_warmup=(0, 0), d_max_warmup=(0, 0), feature_dim=feature_dim)
    with torch.no_grad():  # running statistics far from the batch's: they must not matter
        rn.running_mean.fill_(3.0)
        rn.running_var.fill_(9.0)
    bn = _affine(nn.BatchNorm1d(C).double())
    bn.running_mean.fill_(3.0)
    bn.running_var.fill_(9.0)
    x = (torch.randn(shape, dtype=torch.float64) * 2 + 1).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    move = (lambda t: t.movedim(-1, 1)) if feature_dim == -1 else (lambda t: t)
    y = rn(x)
    yr = F.batch_norm(move(xr), bn.running_mean, bn.running_var, bn.weight, bn.bias, True, 0.1, 1e-5)
    torch.testing.assert_close(move(y), yr, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    y.backward(g)
    yr.backward(move(g))
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(rn.weight.grad, bn.weight.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(rn.bias.grad, bn.bias.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(rn.running_mean, bn.running_mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(rn.running_var, bn.running_var, rtol=1e-12, atol=1e-12)
    assert set(rn.state_dict()) == set(bn.state_dict())


def test_renorm_r_d_clipping_against_numpy():
    rn = _renorm(r_max=1.5, d_max=0.5, r_max_warmup=(0, 0), d_max_warmup=(0, 0), momentum=0.2)
    running_mean = np.array([-3.0, 1.4, 3.0])
    running_var = np.array([4.0, 1.0, 0.04])  # r clipped from below, inside, from above
    with torch.no_grad():
        rn.running_mean.copy_(torch.from_numpy(running_mean))
        rn.running_var.copy_(torch.from_numpy(running_var))
    rng = np.random.default_rng(0)
    x = rng.normal(loc=[1.0, 1.5, -0.5], scale=[0.6, 1.1, 1.0], size=(16, 2, C)).transpose(0, 2, 1).copy()  # (N, C, L)
    eps = rn.eps
    mu_b, var_b = x.mean((0, 2)), x.var((0, 2))
    sigma_b, sigma = np.sqrt(var_b + eps), np.sqrt(running_var + eps)
    r = np.clip(sigma_b / sigma, 1 / 1.5, 1.5)
    d = np.clip((mu_b - running_mean) / sigma, -0.5, 0.5)
    # channel 0: both clipped from above/below, channel 1: neither, channel 2: r from above, d from below
    assert r[0] == 1 / 1.5 and 1 / 1.5 < r[1] < 1.5 and r[2] == 1.5
    assert d[0] == 0.5 and abs(d[1]) < 0.5 and d[2] == -0.5
    w, b = rn.weight.detach().numpy(), rn.bias.detach().numpy()
    expected = ((x - mu_b[:, None]) / sigma_b[:, None] * r[:, None] + d[:, None]) * w[:, None] + b[:, None]
    xt = torch.from_numpy(x).requires_grad_()
    y = rn(xt)
    np.testing.assert_allclose(y.detach().numpy(), expected, rtol=1e-10, atol=1e-12)
    # the running statistics are updated as BatchNorm's, after the output
    n = x.shape[0] * x.shape[2]
    np.testing.assert_allclose(rn.running_mean.numpy(), 0.8 * running_mean + 0.2 * mu_b, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(rn.running_var.numpy(), 0.8 * running_var + 0.2 * var_b * n / (n - 1), rtol=1e-12)
    # r and d are constants in backprop: the gradient is that of F.batch_norm(x) * r + d (affine after)
    g = torch.randn_like(y)
    y.backward(g)
    xr = torch.from_numpy(x).requires_grad_()
    wr, br = rn.weight.detach().clone().requires_grad_(), rn.bias.detach().clone().requires_grad_()
    rt, dt = torch.from_numpy(r)[:, None], torch.from_numpy(d)[:, None]
    yr = (F.batch_norm(xr, None, None, training=True, eps=eps) * rt + dt) * wr[:, None] + br[:, None]
    yr.backward(g)
    torch.testing.assert_close(xt.grad, xr.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(rn.weight.grad, wr.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(rn.bias.grad, br.grad, rtol=1e-10, atol=1e-12)


def test_renorm_unclipped_training_output_equals_eval_output():
    rn = _renorm(r_max_warmup=(0, 0), d_max_warmup=(0, 0))
    x = torch.randn(10, C, 3, dtype=torch.float64) * 1.3 + 0.4
    with torch.no_grad():
        rn.running_mean.copy_(x.mean((0, 2)) + 0.1)
        rn.running_var.copy_(x.var((0, 2)) * 1.2)
    expected = F.batch_norm(x, rn.running_mean.clone(), rn.running_var.clone(), rn.weight, rn.bias, False)
    torch.testing.assert_close(rn(x), expected, rtol=1e-10, atol=1e-12)
    rn.eval()
    torch.testing.assert_close(rn(x), F.batch_norm(x, rn.running_mean, rn.running_var, rn.weight, rn.bias, False))


def test_renorm_warmup_schedule():
    rn = normlab.BatchRenorm(C, r_max=3.0, d_max=5.0, r_max_warmup=(100, 500), d_max_warmup=(100, 300))
    expected = [(0, 1.0, 0.0), (100, 1.0, 0.0), (200, 1.5, 2.5), (300, 2.0, 5.0), (500, 3.0, 5.0), (10**6, 3.0, 5.0)]
    for t, r, d in expected:
        rt, dt = rn.limits(t)
        assert float(rt) == pytest.approx(r, abs=1e-12) and float(dt) == pytest.approx(d, abs=1e-12), t
    rn = _renorm(r_max=2.0, d_max=1.0, r_max_warmup=(1, 1), d_max_warmup=(1, 3))
    x = torch.randn(8, C, 2, dtype=torch.float64) * 3 + 5  # far from the initial running statistics
    bn_out = F.batch_norm(x, None, None, rn.weight, rn.bias, True)
    torch.testing.assert_close(rn(x), bn_out)  # step 0: r_max = 1, d_max = 0, i.e. BatchNorm
    r_max, d_max = rn.limits()
    assert float(r_max) == 2.0 and float(d_max) == 0.0  # step 1: r relaxed, d still pinned at 0
    assert int(rn.num_batches_tracked) == 1
    with pytest.raises(ValueError, match="r_max must be >= 1"):
        normlab.BatchRenorm(C, r_max=0.5)
    with pytest.raises(ValueError, match=r"\(start, end\) steps"):
        normlab.BatchRenorm(C, d_max_warmup=(10, 5))
    with pytest.raises(ValueError, match="track_running_stats must be True"):
        normlab.BatchRenorm(C, track_running_stats=False)


def test_renorm_gradcheck_and_gradgradcheck():
    rn = _renorm(r_max=1.2, d_max=0.3, r_max_warmup=(0, 0), d_max_warmup=(0, 0))
    with torch.no_grad():
        rn.running_mean.copy_(torch.tensor([0.0, 2.0, -1.0]))
        rn.running_var.copy_(torch.tensor([1.0, 0.2, 6.0]))
    state = {k: v.clone() for k, v in rn.state_dict().items()}

    def f(x, w, b):
        rn.load_state_dict(state)  # the same r and d at every evaluation
        return torch.func.functional_call(rn, {"weight": w, "bias": b}, (x,))

    x = (torch.randn(6, C, 3, dtype=torch.float64) + 0.5).requires_grad_()
    w, b = rn.weight.detach().clone().requires_grad_(), rn.bias.detach().clone().requires_grad_()
    assert gradcheck(f, (x, w, b))
    assert gradgradcheck(f, (x, w, b))


def test_renorm_state_dict_loads_both_ways_and_registry():
    rn = normlab.make_norm("batchrenorm", C)
    assert isinstance(rn, normlab.BatchRenorm)
    bn = nn.BatchNorm2d(C)
    bn.running_mean.fill_(0.5)
    rn.load_state_dict(bn.state_dict())
    assert torch.equal(rn.running_mean, bn.running_mean)
    nn.BatchNorm2d(C).load_state_dict(rn.state_dict())
    assert isinstance(normlab.make_norm("batchrenorm", C, feature_dim=-1, r_max=2.0), normlab.BatchRenorm)


# --------------------------------------------------------------------------- Ghost BatchNorm


@pytest.mark.parametrize("n,vbs", [(12, 4), (10, 4), (5, 8)], ids=["even", "uneven", "one-chunk"])
def test_ghost_equals_per_chunk_functional_batch_norm(n, vbs):
    gbn = _affine(normlab.GhostBatchNorm(C, virtual_batch_size=vbs, momentum=0.2).double().train())
    x = (torch.randn(n, C, 2, 3, dtype=torch.float64) * 2 - 1).requires_grad_()
    xr = x.detach().clone().requires_grad_()
    rm, rv = torch.zeros(C, dtype=torch.float64), torch.ones(C, dtype=torch.float64)
    w, b = gbn.weight.detach().clone().requires_grad_(), gbn.bias.detach().clone().requires_grad_()
    y = gbn(x)
    yr = torch.cat([F.batch_norm(c, rm, rv, w, b, True, 0.2, 1e-5) for c in xr.split(vbs)])  # updates rm, rv in order
    torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gbn.running_mean, rm, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gbn.running_var, rv, rtol=1e-12, atol=1e-12)
    assert int(gbn.num_batches_tracked) == len(xr.split(vbs))
    g = torch.randn_like(y)
    y.backward(g)
    yr.backward(g)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gbn.weight.grad, w.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gbn.bias.grad, b.grad, rtol=1e-10, atol=1e-12)
    gbn.eval()
    torch.testing.assert_close(gbn(x), F.batch_norm(x, rm, rv, w, b, False), rtol=1e-12, atol=1e-12)


def test_ghost_features_last_channels_last_and_mask():
    gbn = normlab.GhostBatchNorm(C, virtual_batch_size=2, feature_dim=-1).double()
    x = torch.randn(6, 5, C, dtype=torch.float64)
    ref = torch.cat([F.batch_norm(c.transpose(1, 2), None, None, training=True).transpose(1, 2) for c in x.split(2)])
    torch.testing.assert_close(gbn(x), ref, rtol=1e-12, atol=1e-12)
    mask = torch.rand(6, 5) < 0.7
    mask[:, :2] = True
    y = gbn(x, mask=mask)
    for c, mc, yc in zip(x.split(2), mask.split(2), y.split(2)):
        valid = c[mc].numpy()
        expected = (valid - valid.mean(0)) / np.sqrt(valid.var(0) + 1e-5)
        np.testing.assert_allclose(yc[mc].detach().numpy(), expected, rtol=1e-10, atol=1e-12)
    cl = torch.randn(8, C, 3, 3, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    y = normlab.GhostBatchNorm(C, virtual_batch_size=4).double()(cl)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y, torch.cat([F.batch_norm(c, None, None, training=True) for c in cl.split(4)]))


def test_ghost_gradcheck_gradgradcheck_registry_and_errors():
    gbn = _affine(normlab.make_norm("ghostbatchnorm", C, virtual_batch_size=3).double())
    assert isinstance(gbn, normlab.GhostBatchNorm)
    x = (torch.randn(7, C, 2, dtype=torch.float64) + 0.3).requires_grad_()  # chunks of 3, 3, 1 (x 2 positions)
    params = (gbn.weight.detach().clone().requires_grad_(), gbn.bias.detach().clone().requires_grad_())
    f = lambda x, w, b: torch.func.functional_call(gbn, {"weight": w, "bias": b}, (x,))  # noqa: E731
    assert gradcheck(f, (x, *params))
    assert gradgradcheck(f, (x, *params))
    with pytest.raises(ValueError, match="last virtual batch of 1 sample"):
        normlab.GhostBatchNorm(C, virtual_batch_size=4)(torch.randn(5, C))
    with pytest.raises(ValueError, match="virtual_batch_size must be a positive int"):
        normlab.GhostBatchNorm(C, virtual_batch_size=0)
    nn.BatchNorm1d(C).load_state_dict(gbn.state_dict())
