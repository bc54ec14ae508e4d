"""normlab.normfree against numpy and closed forms: SkipInit, Fixup rules, Scaled WS, AGC."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from normlab.normfree import (
    ResidualBlock,
    ScalarBias,
    ScalarScale,
    ScaledStdConv1d,
    ScaledStdConv2d,
    SkipInit,
    WSLinear,
    adaptive_grad_clip_,
    fixup_init_,
    nonlinearity_gamma,
    residual_blocks,
    scaled_weight_standardization,
)


def test_skipinit_scales_and_learns():
    s = SkipInit(0.25)
    x = torch.randn(3, 4)
    torch.testing.assert_close(s(x), 0.25 * x)
    g = torch.randn(3, 4)
    s(x).backward(g)
    torch.testing.assert_close(s.alpha.grad, (x * g).sum())  # d(alpha x)/d alpha . g
    assert float(SkipInit().alpha.detach()) == 0.0 and [n for n, _ in s.named_parameters()] == ["alpha"]
    with torch.no_grad():
        s.alpha.fill_(3.0)
    s.reset_parameters()
    assert float(s.alpha.detach()) == 0.25


def test_scalar_bias_and_scale():
    x = torch.randn(5)
    torch.testing.assert_close(ScalarBias(0.5)(x), x + 0.5)
    torch.testing.assert_close(ScalarScale()(x), x)
    torch.testing.assert_close(ScalarScale(-2.0)(x), -2 * x)


def test_residual_block_formula():
    branch, skip = nn.Linear(4, 4), nn.Linear(4, 4, bias=False)
    x = torch.randn(6, 4)
    with torch.no_grad():
        torch.testing.assert_close(ResidualBlock(branch)(x), x + branch(x))
        block = ResidualBlock(branch, skip, SkipInit(0.1), merge=0.5)
        torch.testing.assert_close(block(x), 0.5 * (skip(x) + 0.1 * branch(x)))
        assert torch.equal(ResidualBlock(branch, alpha=SkipInit(0.0))(x), x)


# ------------------------------------------------------------------ Fixup


class _Toy(nn.Module):
    """``num_blocks`` residual blocks whose branches have ``m`` Linear layers, then a classifier."""

    def __init__(self, num_blocks: int, m: int, width: int = 64) -> None:
        super().__init__()
        layers = lambda: [mod for _ in range(m) for mod in (nn.Linear(width, width), nn.ReLU())][:-1]  # noqa: E731
        self.blocks = nn.Sequential(*(ResidualBlock(nn.Sequential(*layers())) for _ in range(num_blocks)))
        self.head = nn.Linear(width, 3)


@pytest.mark.parametrize("num_blocks, m", [(16, 2), (16, 3), (81, 3), (5, 1)])
def test_fixup_zero_inits_last_layers_and_scales_the_others(num_blocks, m):
    torch.manual_seed(0)
    model = _Toy(num_blocks, m)
    fixup_init_(model, head=model.head)
    factor = num_blocks ** (-1 / (2 * m - 2)) if m > 1 else 1.0  # 16 blocks, m=2: 1/4; m=3: 1/2; 81, m=3: 1/3
    he_std = math.sqrt(2 / 64)
    others = []
    for block in residual_blocks(model):
        linears = [mod for mod in block.branch if isinstance(mod, nn.Linear)]
        assert len(linears) == m
        assert torch.count_nonzero(linears[-1].weight) == 0 and torch.count_nonzero(linears[-1].bias) == 0
        others += [lin.weight.detach().numpy().ravel() for lin in linears[:-1]]
        assert all(torch.count_nonzero(lin.bias) == 0 for lin in linears[:-1])
    if others:
        w = np.concatenate(others)  # >= 16 x 4096 He-normal draws
        assert w.std() == pytest.approx(he_std * factor, rel=0.02)
        assert abs(w.mean()) < 0.05 * he_std * factor
    assert torch.count_nonzero(model.head.weight) == 0 and torch.count_nonzero(model.head.bias) == 0
    x = torch.randn(7, 64)
    with torch.no_grad():
        assert torch.equal(model.blocks(x), x)  # every block the identity at init


def test_fixup_needs_residual_blocks():
    with pytest.raises(ValueError, match="no residual blocks"):
        fixup_init_(nn.Sequential(nn.Linear(2, 2)))


# ------------------------------------------------------------------ Scaled Weight Standardization


def _ws_numpy(w: np.ndarray, gain: np.ndarray, gamma: float, eps: float) -> np.ndarray:
    flat = w.reshape(w.shape[0], -1).astype(np.float64)
    fan_in = flat.shape[1]
    mean = flat.mean(1, keepdims=True)
    var = flat.var(1, keepdims=True)  # biased
    out = gain[:, None] * gamma * (flat - mean) / np.sqrt(np.maximum(var * fan_in, eps))
    return out.reshape(w.shape)


@pytest.mark.parametrize(
    "make, x_shape, op",
    [
        (
            lambda: ScaledStdConv2d(3, 5, 3, padding=1, gamma=1.7),
            (2, 3, 6, 6),
            lambda x, w, b: F.conv2d(x, w, b, padding=1),
        ),
        (
            lambda: ScaledStdConv1d(3, 5, 5, stride=2, gamma=1.0),
            (2, 3, 20),
            lambda x, w, b: F.conv1d(x, w, b, stride=2),
        ),
        (lambda: WSLinear(7, 5, gamma=1.3), (4, 7), F.linear),
    ],
)
def test_scaled_ws_matches_numpy(make, x_shape, op):
    torch.manual_seed(0)
    layer = make().double()
    with torch.no_grad():
        layer.weight.mul_(3).add_(0.7)  # far from standardised to begin with
        layer.gain.uniform_(0.5, 2.0)
    w, gain = layer.weight.detach().numpy(), layer.gain.detach().numpy()
    expected = _ws_numpy(w, gain, layer.gamma, layer.eps)
    got = layer.standardized_weight().detach().numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
    # per output unit: zero mean, and variance (gain * gamma)^2 / fan_in, i.e. unit variance once the gain,
    # gamma and 1/sqrt(fan_in) are divided out
    flat = got.reshape(got.shape[0], -1)
    fan_in = flat.shape[1]
    np.testing.assert_allclose(flat.mean(1), 0, atol=1e-12)
    np.testing.assert_allclose(flat.var(1) * fan_in / (gain * layer.gamma) ** 2, 1, rtol=1e-9)
    x = torch.randn(*x_shape, dtype=torch.float64)
    torch.testing.assert_close(layer(x), op(x, torch.from_numpy(expected), layer.bias))


def test_scaled_ws_is_differentiable_and_eps_floors_constant_weights():
    layer = WSLinear(4, 3, gamma=1.0).double()
    x = torch.randn(5, 4, dtype=torch.float64)
    fn = lambda w, g: F.linear(x, scaled_weight_standardization(w, g, 1.3, 1e-4))  # noqa: E731
    assert torch.autograd.gradcheck(
        fn, (layer.weight.detach().clone().requires_grad_(), torch.rand(3, dtype=torch.float64, requires_grad=True))
    )
    with torch.no_grad():
        layer.weight.fill_(0.5)  # zero variance: W - mean = 0, the floor avoids 0/0
    assert torch.equal(layer.standardized_weight(), torch.zeros(3, 4, dtype=torch.float64))
    assert WSLinear(4, 3, gain=False).gain is None


def test_nonlinearity_gamma_against_closed_form_and_quadrature():
    from scipy.integrate import quad

    assert nonlinearity_gamma("relu") == pytest.approx(math.sqrt(2 / (1 - 1 / math.pi)), rel=1e-8)
    assert nonlinearity_gamma("identity") == pytest.approx(1.0, rel=1e-9)
    phi = lambda z: math.exp(-z * z / 2) / math.sqrt(2 * math.pi)  # noqa: E731
    for name, f in (("tanh", math.tanh), ("sigmoid", lambda z: 0.5 * (1 + math.tanh(z / 2)))):
        m1 = quad(lambda z, f=f: f(z) * phi(z), -40, 40, points=[0.0], limit=200)[0]
        m2 = quad(lambda z, f=f: f(z) ** 2 * phi(z), -40, 40, points=[0.0], limit=200)[0]
        assert nonlinearity_gamma(name) == pytest.approx(1 / math.sqrt(m2 - m1 * m1), rel=1e-7)
    assert nonlinearity_gamma(nn.Tanh()) == nonlinearity_gamma("tanh")
    with pytest.raises(ValueError, match="unknown activation 'swish'"):
        nonlinearity_gamma("swish")


def test_scaled_ws_with_gamma_restores_unit_variance_after_relu():
    """Brock et al.'s point: zero-mean rows remove relu's mean shift, gamma its variance loss."""
    torch.manual_seed(0)
    x = torch.randn(4096, 512)  # unit-variance, independent inputs
    with torch.no_grad():
        y = WSLinear(512, 256, gamma=nonlinearity_gamma("relu"), bias=False)(F.relu(x))
        plain = WSLinear(512, 256, gamma=1.0, bias=False)(F.relu(x))
    assert float(y.var(0).mean()) == pytest.approx(1.0, rel=0.05)
    assert float(y.mean(0).abs().mean()) < 0.05
    assert float(plain.var(0).mean()) == pytest.approx((1 - 1 / math.pi) / 2, rel=0.05)


# ------------------------------------------------------------------ AGC


def _agc_numpy(w: np.ndarray, g: np.ndarray, clipping: float, eps: float) -> np.ndarray:
    if w.ndim <= 1:
        wn, gn = np.linalg.norm(w), np.linalg.norm(g)
    else:
        axes = tuple(range(1, w.ndim))
        wn = np.sqrt((w**2).sum(axes, keepdims=True))
        gn = np.sqrt((g**2).sum(axes, keepdims=True))
    max_norm = np.maximum(wn, eps) * clipping
    return np.where(gn > max_norm, g * max_norm / np.maximum(gn, 1e-6), g)


def test_agc_matches_the_unitwise_formula():
    rng = np.random.default_rng(0)
    shapes = [(6, 5), (4, 3, 3, 3), (3, 2, 5), (6,), ()]
    params, expected, clipped_units, kept_units = [], [], 0, 0
    for shape in shapes:
        w = rng.standard_normal(shape)
        # per unit, a gradient either well below or well above 1% of the weight's norm
        unit_scale = rng.choice([1e-4, 1.0], size=shape[:1]).reshape(shape[:1] + (1,) * (len(shape) - 1))
        g = rng.standard_normal(shape) * (unit_scale if shape else 1.0)
        p = nn.Parameter(torch.from_numpy(w))
        p.grad = torch.from_numpy(g.copy() if shape else np.array(g))
        params.append(p)
        expected.append(_agc_numpy(w, g, 0.01, 1e-3))
        if len(shape) >= 2:
            changed = ~np.isclose(expected[-1], g).reshape(shape[0], -1).all(1)
            clipped_units += changed.sum()
            kept_units += (~changed).sum()
    zero = nn.Parameter(torch.zeros(3, 4, dtype=torch.float64))  # zero weights: the eps floor decides
    zero.grad = torch.full((3, 4), 1e-3, dtype=torch.float64)
    params.append(zero)
    expected.append(_agc_numpy(np.zeros((3, 4)), np.full((3, 4), 1e-3), 0.01, 1e-3))
    params.append(nn.Parameter(torch.ones(2, dtype=torch.float64)))  # no gradient: left alone
    adaptive_grad_clip_(params, clipping=0.01, eps=1e-3)
    for p, e in zip(params, expected):
        np.testing.assert_allclose(p.grad.numpy(), e, rtol=1e-12)
    assert clipped_units > 2 and kept_units > 2  # both branches of the formula were exercised
    np.testing.assert_allclose(np.linalg.norm(params[-2].grad.numpy(), axis=1), 1e-5, rtol=1e-12)
    assert params[-1].grad is None


def test_agc_single_tensor_and_bad_clipping():
    p = nn.Parameter(torch.ones(2, 2))
    p.grad = torch.full((2, 2), 10.0)
    adaptive_grad_clip_(p, clipping=0.1)
    torch.testing.assert_close(p.grad.norm(dim=1), torch.full((2,), 0.1 * math.sqrt(2)))
    with pytest.raises(ValueError, match="clipping must be > 0"):
        adaptive_grad_clip_([p], clipping=0.0)
