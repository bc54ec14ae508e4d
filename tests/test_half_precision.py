"""bfloat16 and float16 in the parity grid, and under ``torch.autocast("cpu", dtype=torch.bfloat16)``.

Oracle: the same layer computed in float64 on the very half-precision input
(and upstream gradient) the layer sees. normlab accumulates half inputs in
float32 and rounds the result once, so each output element may err by the
rounding to the format: half an ulp, at most ``eps / 2`` relative (``eps`` =
2^-7 for bfloat16, 2^-10 for float16). The bound used is one ulp,
``eps * |exact|``, plus ``eps * 2^-6`` absolute for outputs near 0 (where a
float32 difference far below the format's resolution can flip a rounding).
Gradients are sums over many terms of rounded products, so they are held to
``2 eps`` relative to the gradient's largest entry. Running statistics
(stored in the layer's half dtype) are held to one ulp of the torch.nn
layer's, which makes the same roundings.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import normlab

HALF = [torch.bfloat16, torch.float16]


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


CASES = [
    ("BatchNorm1d", (4,), (16, 4)),
    ("BatchNorm1d", (4,), (8, 4, 6)),
    ("BatchNorm2d", (4,), (8, 4, 5, 5)),
    ("BatchNorm2d-channels-last", (4,), (8, 4, 5, 5)),
    ("LayerNorm", ((5, 6),), (8, 3, 5, 6)),
    ("RMSNorm", (6,), (8, 5, 6)),
    ("GroupNorm", (2, 4), (8, 4, 5, 5)),
    ("InstanceNorm2d", (4,), (8, 4, 5, 5)),
]


def _build(lib, name: str, args, dtype):
    cls = getattr(lib, name.replace("-channels-last", ""))
    kw = {"affine": True} if "Instance" in name else {}
    torch.manual_seed(0)
    layer = cls(*args, **kw)
    with torch.no_grad():
        for p in layer.parameters():
            p.uniform_(0.5, 1.5)
    return layer.to(dtype)


def _input(shape, name: str, dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    x = (torch.randn(shape, generator=g) * 3 + 1).to(dtype)
    if name.endswith("channels-last"):
        x = x.contiguous(memory_format=torch.channels_last)
    return x


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("dtype", HALF, ids=["bfloat16", "float16"])
@pytest.mark.parametrize("name, args, shape", CASES, ids=[c[0] + str(c[2]) for c in CASES])
def test_half_precision_outputs_gradients_and_buffers(name, args, shape, dtype, mode):
    eps = _eps(dtype)
    ours = _build(normlab, name, args, dtype).train(mode == "train")
    theirs = _build(nn, name, args, dtype).train(mode == "train")
    exact = _build(nn, name, args, torch.float64).train(mode == "train")
    exact.load_state_dict(ours.state_dict())  # the half-rounded parameters, exactly, in float64
    if mode == "eval" and hasattr(ours, "running_mean") and ours.running_mean is not None:
        for m in (ours, theirs, exact):  # non-trivial running statistics, representable in the half format
            with torch.no_grad():
                m.running_mean.copy_(torch.linspace(-1, 1, 4).to(dtype))
                m.running_var.copy_(torch.linspace(0.5, 2, 4).to(dtype))
        exact.load_state_dict(ours.state_dict())
    x = _input(shape, name, dtype).requires_grad_()
    x64 = x.detach().double().requires_grad_()
    y, y64 = ours(x), exact(x64)
    assert y.dtype == dtype and y.shape == x.shape
    if name.endswith("channels-last"):
        assert y.is_contiguous(memory_format=torch.channels_last)
    bound = eps * y64.abs() + eps * 2**-6
    assert ((y.double() - y64).abs() <= bound).all(), float(((y.double() - y64).abs() / bound).max())
    g = torch.randn(shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    dx, *dparams = torch.autograd.grad(y, (x, *ours.parameters()), g)
    dx64, *dparams64 = torch.autograd.grad(y64, (x64, *exact.parameters()), g.double())
    for got, want in zip((dx, *dparams), (dx64, *dparams64)):
        assert got.dtype == dtype
        assert (got.double() - want).abs().max() <= 2 * eps * want.abs().max() + eps * 2**-6
    theirs(x.detach())
    for (k, b), b_theirs in zip(ours.named_buffers(), theirs.buffers()):
        if b.is_floating_point():
            torch.testing.assert_close(b, b_theirs, rtol=eps, atol=eps, msg=k)
        else:
            assert torch.equal(b, b_theirs), k


@pytest.mark.parametrize(
    "norm",
    [
        lambda lib: lib.BatchNorm2d(8),
        lambda lib: lib.GroupNorm(2, 8),
        lambda lib: lib.InstanceNorm2d(8, affine=True),
    ],
)
def test_under_cpu_autocast_bfloat16_as_torch_nn(norm):
    """Conv (bfloat16 under autocast) -> norm: normlab's output dtype is torch.nn's, its values within one ulp."""
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 8, 3)
    ours, theirs = norm(normlab), norm(nn)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(4, 3, 8, 8)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = conv(x)
        y_ours, y_theirs = ours(h), theirs(h)
    assert h.dtype == torch.bfloat16 and y_ours.dtype == y_theirs.dtype
    exact = norm(nn).double()
    exact.load_state_dict(ours.state_dict())
    y64 = exact(h.double())
    eps = _eps(torch.bfloat16)
    assert ((y_ours.double() - y64).abs() <= eps * y64.abs() + eps * 2**-6).all()
    for (k, b), b_theirs in zip(ours.named_buffers(), theirs.buffers()):
        torch.testing.assert_close(b, b_theirs, msg=k)  # float32 buffers: the same update


def test_layernorm_under_cpu_autocast_in_a_transformer_block():
    torch.manual_seed(0)
    lin = nn.Linear(6, 16)
    ours, theirs = normlab.LayerNorm(16), nn.LayerNorm(16)
    x = torch.randn(4, 5, 6)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = lin(x)
        y_ours, y_theirs = ours(h), theirs(h)
    assert y_ours.dtype == y_theirs.dtype
    y64 = nn.LayerNorm(16).double()(h.double())
    eps = _eps(y_ours.dtype) if y_ours.dtype != torch.float32 else _eps(torch.bfloat16)
    assert ((y_ours.double() - y64).abs() <= eps * y64.abs() + eps * 2**-6).all()
