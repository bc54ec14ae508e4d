"""Property-based tests: random shapes, values at extreme scales and offsets, constant channels."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

import normlab.functional as NF


@pytest.fixture(autouse=True)
def _both_backends(backend):
    """Every test here runs on each CPU path (see the `backend` fixture in conftest.py)."""


SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def nchw_batches(draw):
    n = draw(st.integers(2, 6))
    c = draw(st.integers(1, 5))
    spatial = draw(st.lists(st.integers(1, 5), min_size=0, max_size=3))
    scale = 10.0 ** draw(st.integers(-6, 6))
    offset = draw(st.sampled_from([0.0, 1.0, -3.0, 1e3])) * scale
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((n, c, *spatial), generator=g, dtype=torch.float64) * scale + offset
    if draw(st.booleans()):  # a constant channel
        x[:, draw(st.integers(0, c - 1))] = offset
    return x


def _grads(fn, x, g):
    x = x.detach().clone().requires_grad_()
    y = fn(x)
    y.backward(g)
    return y.detach(), x.grad


def _numpy_batch_norm(x, w, b, g, eps=1e-5):
    """Closed-form BatchNorm forward and input gradient in float64 numpy (two-pass statistics)."""
    axes = tuple(d for d in range(x.ndim) if d != 1)
    shape = [1] * x.ndim
    shape[1] = -1
    mu = x.mean(axis=axes, keepdims=True)
    inv = 1.0 / np.sqrt(((x - mu) ** 2).mean(axis=axes, keepdims=True) + eps)
    xhat = (x - mu) * inv
    y = xhat * w.reshape(shape) + b.reshape(shape)
    gw = g * w.reshape(shape)
    dx = inv * (gw - gw.mean(axis=axes, keepdims=True) - xhat * (gw * xhat).mean(axis=axes, keepdims=True))
    return y, dx


@SETTINGS
@given(nchw_batches())
def test_batch_norm_train_matches_closed_form_and_torch(x):
    w = torch.linspace(0.5, 1.5, x.shape[1], dtype=x.dtype)
    b = torch.linspace(-1, 1, x.shape[1], dtype=x.dtype)
    g = torch.randn_like(x)
    y1, d1 = _grads(lambda t: NF.batch_norm(t, None, None, w, b, True), x, g)
    y2, d2 = _grads(lambda t: F.batch_norm(t, None, None, w, b, True), x, g)
    yn, dn = (torch.from_numpy(a) for a in _numpy_batch_norm(x.numpy(), w.numpy(), b.numpy(), g.numpy()))
    assert torch.isfinite(y1).all() and torch.isfinite(d1).all()
    torch.testing.assert_close(y1, yn, rtol=1e-9, atol=1e-9)
    # the input gradient is O(grad / sqrt(var + eps)); compare relative to its size
    scale = dn.abs().max().clamp(min=1.0)
    torch.testing.assert_close(d1 / scale, dn / scale, rtol=1e-8, atol=1e-8)
    # PyTorch folds the mean into a shift (x * s - mean * s), which costs it |mean| / std ulps;
    # normlab subtracts first, so it is never less accurate than PyTorch
    assert (y1 - yn).abs().max() <= (y2 - yn).abs().max() + 1e-12


def _numpy_row_norm(x, axes, centered, g, eps=1e-5):
    """Closed-form per-sample normalisation over ``axes`` and its input gradient, float64 numpy."""
    mu = x.mean(axis=axes, keepdims=True) if centered else 0.0
    inv = 1.0 / np.sqrt(((x - mu) ** 2).mean(axis=axes, keepdims=True) + eps)
    xhat = (x - mu) * inv
    inner = g - xhat * (g * xhat).mean(axis=axes, keepdims=True)
    if centered:
        inner = inner - g.mean(axis=axes, keepdims=True)
    return xhat, inv * inner


@SETTINGS
@given(nchw_batches(), st.sampled_from(["layer", "rms", "group", "instance"]))
def test_row_norms_match_closed_form_and_torch(x, kind):
    c = x.shape[1]
    if kind == "instance" and x[0, 0].numel() <= 1:
        return
    trail = tuple(x.shape[1:])
    all_but_batch = tuple(range(1, x.dim()))
    ours, ref, axes, centered = {
        "layer": (lambda t: NF.layer_norm(t, trail), lambda t: F.layer_norm(t, trail), all_but_batch, True),
        "rms": (
            lambda t: NF.rms_norm(t, trail, eps=1e-5),
            lambda t: F.rms_norm(t, trail, eps=1e-5),
            all_but_batch,
            False,
        ),
        # one group per channel: statistics per (sample, channel), as InstanceNorm
        "group": (lambda t: NF.group_norm(t, c), lambda t: F.group_norm(t, c), tuple(range(2, x.dim())), True),
        "instance": (lambda t: NF.instance_norm(t), lambda t: F.instance_norm(t), tuple(range(2, x.dim())), True),
    }[kind]
    g = torch.randn_like(x)
    y1, d1 = _grads(ours, x, g)
    y2, _ = _grads(ref, x, g)
    yn, dn = (torch.from_numpy(np.asarray(a)) for a in _numpy_row_norm(x.numpy(), axes, centered, g.numpy()))
    if not axes:  # (N, C) input to group/instance norms: statistics over nothing are not defined here
        return
    torch.testing.assert_close(y1, yn, rtol=1e-9, atol=1e-9)
    scale = dn.abs().max().clamp(min=1.0)
    torch.testing.assert_close(d1 / scale, dn / scale, rtol=1e-8, atol=1e-8)
    assert (y1 - yn).abs().max() <= (y2 - yn).abs().max() + 1e-12  # never less accurate than PyTorch


def _float32_errors(ours, theirs, x: torch.Tensor) -> tuple[float, float, float]:
    """Errors of two float32 implementations against the exact (float64) result on the same float32 input.

    The oracle sees exactly the values the float32 layers see (``x`` rounded to float32), so the errors
    measure the arithmetic, not the rounding of the input. Returns (ours, theirs, 4 ulps of the output).
    """
    x32 = x.float()
    exact = ours(x32.double())
    err_ours = (ours(x32).double() - exact).abs().max().item()
    err_theirs = (theirs(x32).double() - exact).abs().max().item()
    return err_ours, err_theirs, 4 * torch.finfo(torch.float32).eps * exact.abs().max().item()


# hypothesis' find that showed the float32 mean was rounded before it was subtracted: two samples of
# ~1e5 with a spread of ~100 (normlab erred 3e-4, PyTorch 8e-5)
_LARGE_MEAN_SMALL_SPREAD = torch.tensor([[[100031.5, 99987.25]], [[100012.0, 99934.75]]], dtype=torch.float64)


@settings(SETTINGS, derandomize=True)  # a fixed sequence of examples: CI cannot flake
@example(_LARGE_MEAN_SMALL_SPREAD)
@given(nchw_batches())
def test_float32_batch_statistics_at_least_as_accurate_as_torch(x):
    """normlab's float32 BatchNorm errs no more than PyTorch's, or is within 4 ulps of the exact result."""
    err_ours, err_torch, ulps = _float32_errors(
        lambda t: NF.batch_norm(t, None, None, training=True), lambda t: F.batch_norm(t, None, None, training=True), x
    )
    assert err_ours <= max(err_torch, ulps)


@settings(SETTINGS, derandomize=True)
@example(_LARGE_MEAN_SMALL_SPREAD)
@given(nchw_batches())
def test_float32_row_norms_at_least_as_accurate_as_torch(x):
    """The same for LayerNorm and GroupNorm (their statistics per sample)."""
    trail = tuple(x.shape[1:])
    for ours, theirs in (
        (lambda t: NF.layer_norm(t, trail), lambda t: F.layer_norm(t, trail)),
        (lambda t: NF.group_norm(t, 1), lambda t: F.group_norm(t, 1)),
    ):
        err_ours, err_torch, ulps = _float32_errors(ours, theirs, x)
        assert err_ours <= max(err_torch, ulps)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_constant_channel_gives_bias_and_finite_gradients(fmt):
    x = torch.randn(4, 3, 5, 5).contiguous(memory_format=fmt)
    x[:, 1] = 7.0
    w = torch.ones(3, requires_grad=True)
    b = torch.tensor([0.0, 2.0, 0.0], requires_grad=True)
    y = NF.batch_norm(x.requires_grad_(), None, None, w, b, True)
    assert torch.all(y[:, 1] == 2.0)
    y.square().sum().backward()
    assert torch.isfinite(x.grad).all() and torch.isfinite(w.grad).all()
