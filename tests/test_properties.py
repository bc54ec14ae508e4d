"""Property-based tests: random shapes, values at extreme scales and offsets, constant channels."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import normlab.functional as NF

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


@SETTINGS
@given(nchw_batches())
def test_batch_norm_train_matches_torch_float64(x):
    w = torch.linspace(0.5, 1.5, x.shape[1], dtype=x.dtype)
    b = torch.linspace(-1, 1, x.shape[1], dtype=x.dtype)
    g = torch.randn_like(x)
    y1, d1 = _grads(lambda t: NF.batch_norm(t, None, None, w, b, True), x, g)
    y2, d2 = _grads(lambda t: F.batch_norm(t, None, None, w, b, True), x, g)
    assert torch.isfinite(y1).all() and torch.isfinite(d1).all()
    torch.testing.assert_close(y1, y2, rtol=1e-7, atol=1e-7)
    # the input gradient is O(grad / sqrt(var + eps)); compare relative to its size
    scale = d2.abs().max().clamp(min=1.0)
    torch.testing.assert_close(d1 / scale, d2 / scale, rtol=1e-6, atol=1e-6)


@SETTINGS
@given(nchw_batches(), st.sampled_from(["layer", "rms", "group", "instance"]))
def test_row_norms_match_torch_float64(x, kind):
    c = x.shape[1]
    if kind == "instance" and x[0, 0].numel() <= 1:
        return
    trail = tuple(x.shape[1:])
    ours, ref = {
        "layer": (lambda t: NF.layer_norm(t, trail), lambda t: F.layer_norm(t, trail)),
        "rms": (lambda t: NF.rms_norm(t, trail, eps=1e-5), lambda t: F.rms_norm(t, trail, eps=1e-5)),
        "group": (lambda t: NF.group_norm(t, c), lambda t: F.group_norm(t, c)),
        "instance": (lambda t: NF.instance_norm(t), lambda t: F.instance_norm(t)),
    }[kind]
    g = torch.randn_like(x)
    y1, d1 = _grads(ours, x, g)
    y2, d2 = _grads(ref, x, g)
    torch.testing.assert_close(y1, y2, rtol=1e-7, atol=1e-7)
    scale = d2.abs().max().clamp(min=1.0)
    torch.testing.assert_close(d1 / scale, d2 / scale, rtol=1e-6, atol=1e-6)


@SETTINGS
@given(nchw_batches())
def test_float32_batch_statistics_at_least_as_accurate_as_torch(x):
    """Against a float64 oracle, normlab's float32 output errs no more than PyTorch's float32 output (x4)."""
    oracle = F.batch_norm(x, None, None, training=True)
    x32 = x.float()
    err_ours = (NF.batch_norm(x32, None, None, training=True).double() - oracle).abs().max()
    err_torch = (F.batch_norm(x32, None, None, training=True).double() - oracle).abs().max()
    assert err_ours <= 4 * err_torch + 1e-5


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
