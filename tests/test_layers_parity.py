"""Every normlab layer against its torch.nn counterpart: outputs, gradients, running buffers, memory format."""

import itertools

import pytest
import torch
from conftest import tol
from torch import nn

import normlab


@pytest.fixture(autouse=True)
def _both_backends(backend):
    """Every test here runs on each CPU path (see the `backend` fixture in conftest.py)."""


DTYPES = [torch.float32, torch.float64]


def _run_steps(mod, x_list, train: bool):
    """Forward + backward on each input; returns outputs and the grads of input and params."""
    mod.train(train)
    outs, grads = [], []
    for x in x_list:
        x = x.detach().clone().requires_grad_(True)
        y = mod(x)
        g = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y).contiguous()
        # a fixed, non-symmetric upstream gradient (sum would make the BN input gradient ~0)
        (y * g.roll(3)).sum().backward()
        outs.append(y.detach())
        grads.append(x.grad)
    return outs, grads


def _assert_pair(ours, ref, shapes, dtype, train, memory_format=torch.contiguous_format, steps=3):
    ref.to(dtype)
    ours.to(dtype)
    ours.load_state_dict(ref.state_dict())
    if getattr(ref, "weight", None) is not None:  # non-trivial affine
        with torch.no_grad():
            ref.weight.uniform_(0.5, 1.5)
            ours.weight.copy_(ref.weight)
            if getattr(ref, "bias", None) is not None:
                ref.bias.uniform_(-0.5, 0.5)
                ours.bias.copy_(ref.bias)
    xs = [(torch.randn(shapes, dtype=dtype) * 2 + 0.5).contiguous(memory_format=memory_format) for _ in range(steps)]
    o1, g1 = _run_steps(ours, xs, train)
    o2, g2 = _run_steps(ref, xs, train)
    t = tol(dtype)
    for a, b in zip(o1, o2):
        torch.testing.assert_close(a, b, **t)
        if memory_format != torch.contiguous_format:
            assert a.is_contiguous(memory_format=memory_format), "output must keep the input's memory format"
    for a, b in zip(g1, g2):
        torch.testing.assert_close(a, b, **t)
    for (n1, p1), (n2, p2) in zip(ours.named_parameters(), ref.named_parameters()):
        assert n1 == n2
        torch.testing.assert_close(p1.grad, p2.grad, **t)
    s1, s2 = ours.state_dict(), ref.state_dict()
    assert list(s1) == list(s2)
    for k in s1:
        assert s1[k].dtype == s2[k].dtype, k
        torch.testing.assert_close(s1[k], s2[k], **t)


BN_CASES = [
    ("1d", normlab.BatchNorm1d, nn.BatchNorm1d, (16, 5), torch.contiguous_format),
    ("1d-seq", normlab.BatchNorm1d, nn.BatchNorm1d, (8, 5, 7), torch.contiguous_format),
    ("2d", normlab.BatchNorm2d, nn.BatchNorm2d, (6, 5, 7, 3), torch.contiguous_format),
    ("2d-cl", normlab.BatchNorm2d, nn.BatchNorm2d, (6, 5, 7, 3), torch.channels_last),
    ("3d", normlab.BatchNorm3d, nn.BatchNorm3d, (4, 3, 2, 5, 3), torch.contiguous_format),
    ("3d-cl", normlab.BatchNorm3d, nn.BatchNorm3d, (4, 3, 2, 5, 3), torch.channels_last_3d),
]


@pytest.mark.parametrize("case", BN_CASES, ids=[c[0] for c in BN_CASES])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    "kw",
    [{}, {"affine": False}, {"track_running_stats": False}, {"momentum": None}, {"momentum": 0.3, "bias": False}],
    ids=["default", "no-affine", "no-tracking", "cumulative", "no-bias"],
)
def test_batchnorm_matches_torch(case, dtype, train, kw):
    _, ours_cls, ref_cls, shape, fmt = case
    c = shape[1]
    _assert_pair(ours_cls(c, **kw), ref_cls(c, **kw), shape, dtype, train, fmt)


def test_batchnorm_eval_after_training_uses_running_stats():
    ours, ref = normlab.BatchNorm2d(4), nn.BatchNorm2d(4)
    for _ in range(5):
        x = torch.randn(8, 4, 3, 3) * 3 + 1
        ours(x), ref(x)
    ours.eval(), ref.eval()
    x = torch.randn(2, 4, 3, 3)
    torch.testing.assert_close(ours(x), ref(x))
    torch.testing.assert_close(ours.running_var, ref.running_var)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 5


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("layout", ["NHWC", "NSD"])
def test_batchnorm_feature_axis_last_matches_torch_on_moved_axes(dtype, layout):
    shape = (4, 5, 6, 3) if layout == "NHWC" else (4, 9, 3)
    ours, ref = (
        normlab.BatchNorm(3, feature_dim=-1).to(dtype),
        (nn.BatchNorm2d(3) if layout == "NHWC" else nn.BatchNorm1d(3)).to(dtype),
    )
    t = tol(dtype)
    for _ in range(3):
        x = (torch.randn(shape, dtype=dtype) * 2 - 1).requires_grad_()
        xr = x.detach().clone().requires_grad_()
        y = ours(x)
        yr = ref(xr.movedim(-1, 1)).movedim(1, -1)
        torch.testing.assert_close(y, yr, **t)
        g = torch.randn_like(y)
        y.backward(g), yr.backward(g)
        torch.testing.assert_close(x.grad, xr.grad, **t)
    torch.testing.assert_close(ours.running_mean, ref.running_mean, **t)
    torch.testing.assert_close(ours.running_var, ref.running_var, **t)


def test_running_updates_are_not_in_the_graph():
    bn = normlab.BatchNorm1d(3)
    x = torch.randn(10, 3, requires_grad=True)
    bn(x).sum().backward()
    for b in (bn.running_mean, bn.running_var):
        assert not b.requires_grad and b.grad_fn is None


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "ns,shape,kw",
    [
        (8, (4, 6, 8), {}),
        ((5, 4), (3, 2, 5, 4), {}),
        (8, (4, 6, 8), {"elementwise_affine": False}),
        (8, (4, 6, 8), {"bias": False}),
        (16, (2, 16), {"eps": 1e-3}),
    ],
    ids=["last", "two-dims", "no-affine", "no-bias", "2d-eps"],
)
def test_layernorm_matches_torch(dtype, ns, shape, kw):
    _assert_pair(normlab.LayerNorm(ns, **kw), nn.LayerNorm(ns, **kw), shape, dtype, True, steps=1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "ns,shape,kw",
    [(8, (4, 6, 8), {}), ((5, 4), (3, 2, 5, 4), {"eps": 1e-6}), (8, (4, 6, 8), {"elementwise_affine": False})],
    ids=["last", "two-dims", "no-affine"],
)
def test_rmsnorm_matches_torch(dtype, ns, shape, kw):
    _assert_pair(normlab.RMSNorm(ns, **kw), nn.RMSNorm(ns, **kw), shape, dtype, True, steps=1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "groups,shape,kw",
    [
        (2, (4, 6, 5, 3), {}),
        (1, (3, 6, 7), {}),
        (6, (3, 6, 4, 4), {}),
        (3, (5, 6), {}),
        (2, (2, 4, 3, 2, 2), {"affine": False}),
    ],
    ids=["2d", "one-group-1d", "per-channel", "no-spatial", "3d-no-affine"],
)
def test_groupnorm_matches_torch(dtype, groups, shape, kw):
    _assert_pair(
        normlab.GroupNorm(groups, shape[1], **kw), nn.GroupNorm(groups, shape[1], **kw), shape, dtype, True, steps=1
    )


IN_CASES = [
    (normlab.InstanceNorm1d, nn.InstanceNorm1d, (4, 3, 9)),
    (normlab.InstanceNorm2d, nn.InstanceNorm2d, (4, 3, 5, 6)),
    (normlab.InstanceNorm3d, nn.InstanceNorm3d, (2, 3, 4, 3, 5)),
]


@pytest.mark.parametrize("case", IN_CASES, ids=["1d", "2d", "3d"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
@pytest.mark.parametrize(
    "kw", [{}, {"affine": True}, {"track_running_stats": True, "affine": True}], ids=["plain", "affine", "tracking"]
)
def test_instancenorm_matches_torch(case, dtype, train, kw):
    ours_cls, ref_cls, shape = case
    _assert_pair(ours_cls(shape[1], **kw), ref_cls(shape[1], **kw), shape, dtype, train)


def test_instancenorm_unbatched_input():
    ours, ref = normlab.InstanceNorm2d(3, affine=True), nn.InstanceNorm2d(3, affine=True)
    x = torch.randn(3, 5, 4)
    torch.testing.assert_close(ours(x), ref(x))


# ---------------------------------------------------------------- equivalences stated in the docs


def test_groupnorm_one_group_is_layernorm_over_channels_and_space():
    x = torch.randn(4, 6, 5, 3, dtype=torch.float64)
    gn = normlab.GroupNorm(1, 6, affine=False).double()
    ln = nn.LayerNorm((6, 5, 3), elementwise_affine=False).double()
    torch.testing.assert_close(gn(x), ln(x))


def test_groupnorm_with_c_groups_is_instancenorm():
    x = torch.randn(4, 6, 5, 3, dtype=torch.float64)
    gn = normlab.GroupNorm(6, 6, affine=False).double()
    torch.testing.assert_close(gn(x), nn.functional.instance_norm(x))


def test_uncentred_groupnorm_is_rmsnorm_over_the_group():
    x = torch.randn(4, 6, 5, dtype=torch.float64) + 2
    gn = normlab.GroupNorm(1, 6, affine=False, centered=False, eps=1e-6).double()
    ref = nn.functional.rms_norm(x, (6, 5), eps=1e-6)
    torch.testing.assert_close(gn(x), ref)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_precision_inputs_accumulate_in_float32(dtype):
    x = torch.randn(16, 4, 5, 5) * 4 + 100  # offset that defeats a float16 one-pass variance
    bn = normlab.BatchNorm2d(4)
    y = bn(x.to(dtype))
    assert y.dtype == dtype
    ref = nn.functional.batch_norm(x, None, None, training=True)
    torch.testing.assert_close(y.float(), ref, rtol=0, atol=0.25 if dtype == torch.bfloat16 else 0.05)
    ln = normlab.LayerNorm(5)(x.to(dtype))
    torch.testing.assert_close(
        ln.float(), nn.functional.layer_norm(x, (5,)), rtol=0, atol=0.25 if dtype == torch.bfloat16 else 0.05
    )


def test_functional_api_matches_torch_functional():
    F, NF = nn.functional, normlab.functional
    x = torch.randn(6, 4, 5, dtype=torch.float64)
    w, b = torch.rand(4, dtype=torch.float64), torch.rand(4, dtype=torch.float64)
    rm, rv = torch.zeros(4, dtype=torch.float64), torch.ones(4, dtype=torch.float64)
    rm2, rv2 = rm.clone(), rv.clone()
    torch.testing.assert_close(NF.batch_norm(x, rm, rv, w, b, True, 0.2), F.batch_norm(x, rm2, rv2, w, b, True, 0.2))
    torch.testing.assert_close((rm, rv), (rm2, rv2))
    torch.testing.assert_close(NF.batch_norm(x, rm, rv, w, b, False), F.batch_norm(x, rm2, rv2, w, b, False))
    torch.testing.assert_close(NF.group_norm(x, 2, w, b), F.group_norm(x, 2, w, b))
    torch.testing.assert_close(NF.instance_norm(x, weight=w, bias=b), F.instance_norm(x, weight=w, bias=b))
    torch.testing.assert_close(NF.layer_norm(x, (5,)), F.layer_norm(x, (5,)))
    torch.testing.assert_close(NF.rms_norm(x, (4, 5)), F.rms_norm(x, (4, 5)))


def test_moments_match_numpy():
    import numpy as np

    x = torch.randn(5, 3, 4, 2, dtype=torch.float64) * 7 + 1e3
    mean, var = normlab.functional.moments(x, (0, 2))
    xn = x.numpy()
    np.testing.assert_allclose(mean.numpy(), xn.mean(axis=(0, 2)), rtol=1e-12)
    np.testing.assert_allclose(var.numpy(), xn.var(axis=(0, 2)), rtol=1e-10)
    _, uvar = normlab.functional.moments(x, (0, 2), unbiased=True)
    np.testing.assert_allclose(uvar.numpy(), xn.var(axis=(0, 2), ddof=1), rtol=1e-10)


def test_chunked_kernels_cover_many_chunks(monkeypatch):
    """Force tiny chunks so every chunk boundary of the kernels is exercised against torch."""
    from normlab import _kernels

    monkeypatch.setattr(_kernels, "_CHUNK_BYTES", 64)
    for shape, fmt in itertools.product([(13, 3, 5, 4), (7, 6, 3, 3)], [torch.contiguous_format, torch.channels_last]):
        x = (torch.randn(shape, dtype=torch.float64) + 3).contiguous(memory_format=fmt).requires_grad_()
        xr = x.detach().clone().requires_grad_()
        g = torch.randn(shape, dtype=torch.float64)
        y = normlab.functional.batch_norm(x, None, None, training=True)
        yr = nn.functional.batch_norm(xr, None, None, training=True)
        torch.testing.assert_close(y, yr)
        y.backward(g), yr.backward(g)
        torch.testing.assert_close(x.grad, xr.grad)
        w = torch.rand(shape[-1], dtype=torch.float64, requires_grad=True)
        wr = w.detach().clone().requires_grad_()
        x.grad = xr.grad = None
        y = normlab.functional.layer_norm(x, (shape[-1],), w)
        yr = nn.functional.layer_norm(xr, (shape[-1],), wr)
        torch.testing.assert_close(y, yr)
        y.backward(g), yr.backward(g)
        torch.testing.assert_close(x.grad, xr.grad)
        torch.testing.assert_close(w.grad, wr.grad)
