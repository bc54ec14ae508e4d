"""gradcheck and gradgradcheck in float64 for every registered norm, and the reference path."""

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import normlab
from normlab import autograd as NA
from normlab import reference as R


@pytest.fixture(autouse=True)
def _both_backends(backend):
    """Every test here runs on each CPU path (see the `backend` fixture in conftest.py)."""


def _registered():
    """Every registered norm but "none" and the ones random by design (noisy BN: no fixed function to check)."""
    return [
        n for n in normlab.norm_names() if n != "none" and not getattr(normlab.make_norm(n, 3), "stochastic", False)
    ]


def _fresh(name, c, feature_dim=1):
    torch.manual_seed(1)
    m = normlab.make_norm(name, c, feature_dim=feature_dim).double()
    with torch.no_grad():
        for p in m.parameters():  # non-trivial affine so weight/bias gradients are tested
            p.uniform_(0.5, 1.5)
    return m


@pytest.mark.parametrize("name", _registered())
@pytest.mark.parametrize("train", [True, False], ids=["train", "eval"])
def test_gradcheck_and_gradgradcheck_every_registered_norm(name, train):
    m = _fresh(name, 3)
    m.train(train)
    x = (torch.randn(5, 3, 4, dtype=torch.float64) * 2 + 1).requires_grad_()
    params = tuple(m.parameters())

    def f(x, *ps):
        return torch.func.functional_call(m, dict(zip([n for n, _ in m.named_parameters()], ps)), (x,))

    assert gradcheck(f, (x, *params))
    assert gradgradcheck(f, (x, *params))


@pytest.mark.parametrize("name", ["batchnorm", "layernorm", "rmsnorm"])
def test_gradcheck_features_last(name):
    m = _fresh(name, 3, feature_dim=-1).train()
    x = (torch.randn(2, 4, 3, dtype=torch.float64) + 0.5).requires_grad_()
    assert gradcheck(lambda x: m(x), (x,))
    assert gradgradcheck(lambda x: m(x), (x,))


def test_gradgradcheck_channels_last_batchnorm():
    x = torch.randn(3, 2, 3, 3, dtype=torch.float64).contiguous(memory_format=torch.channels_last).requires_grad_()
    w = torch.rand(2, dtype=torch.float64, requires_grad=True)
    f = lambda x, w: normlab.functional.batch_norm(x, None, None, w, None, True)  # noqa: E731
    assert gradcheck(f, (x, w)) and gradgradcheck(f, (x, w))


def test_masked_batchnorm_gradients():
    x = torch.randn(3, 5, 2, dtype=torch.float64, requires_grad=True)
    mask = torch.rand(3, 5) > 0.3
    mask[0, 0] = mask[1, 0] = True
    f = lambda x: normlab.functional.batch_norm(x, None, None, None, None, True, feature_dim=-1, mask=mask)  # noqa: E731
    assert gradcheck(f, (x,)) and gradgradcheck(f, (x,))


@pytest.mark.parametrize("centered", [True, False])
def test_analytic_backward_equals_plain_autograd_reference(centered):
    """The fast backward, the differentiable backward formula and autograd through plain ops agree."""
    torch.manual_seed(0)
    x = torch.randn(6, 4, 5, dtype=torch.float64, requires_grad=True)
    w = torch.rand(1, 4, 5, dtype=torch.float64, requires_grad=True)
    g = torch.randn(6, 4, 5, dtype=torch.float64)
    y = torch.ops.normlab.row_norm_fwd(x, w, None, 1e-5, 2, centered)[0]  # the operator and its autograd
    dx, dw = torch.autograd.grad(y, (x, w), g)
    # plain-autograd reference path
    xr = x.detach().clone().requires_grad_()
    wr = w.detach().clone().requires_grad_()
    mu = xr.mean((1, 2), keepdim=True) if centered else 0.0
    var = ((xr - mu) ** 2).mean((1, 2), keepdim=True)
    yr = (xr - mu) / torch.sqrt(var + 1e-5) * wr
    dxr, dwr = torch.autograd.grad(yr, (xr, wr), g)
    torch.testing.assert_close(dx, dxr)
    torch.testing.assert_close(dw, dwr)
    # the differentiable formula used under create_graph
    dx2, dw2, _ = NA.norm_backward(g, x.detach(), w.detach(), 1e-5, (1, 2), centered, (True, True, False), w.shape)
    torch.testing.assert_close(dx2, dxr)
    torch.testing.assert_close(dw2, dwr)


def test_hessian_vector_product_through_batchnorm_matches_torch():
    """The Hessian probes need HVPs through normlab's layers: compare with torch.nn on the same model."""
    torch.manual_seed(0)

    def model(norm):
        return torch.nn.Sequential(torch.nn.Linear(4, 6), norm, torch.nn.Tanh(), torch.nn.Linear(6, 1)).double()

    ref = model(torch.nn.BatchNorm1d(6))
    ours = normlab.convert(model(torch.nn.BatchNorm1d(6)))
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(8, 4, dtype=torch.float64)
    v = [torch.randn_like(p) for p in ref.parameters()]

    def hvp(m):
        loss = (m(x) ** 2).mean()
        gr = torch.autograd.grad(loss, list(m.parameters()), create_graph=True)
        return torch.autograd.grad(sum((a * b).sum() for a, b in zip(gr, v)), list(m.parameters()))

    for a, b in zip(hvp(ours), hvp(ref)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize(
    "ours,ref",
    [
        (
            lambda x, w, b: normlab.functional.batch_norm(x, None, None, w, b, True, feature_dim=-1),
            lambda x, w, b: R.batch_norm(x, w, b, feature_dim=-1),
        ),
        (
            lambda x, w, b: normlab.functional.group_norm(x, 1, w[:4], b[:4]),
            lambda x, w, b: R.group_norm(x, 1, w[:4], b[:4]),
        ),
        (
            lambda x, w, b: normlab.functional.instance_norm(x, weight=w[:4], bias=b[:4]),
            lambda x, w, b: R.instance_norm(x, w[:4], b[:4]),
        ),
        (lambda x, w, b: normlab.functional.layer_norm(x, (5,), w, b), lambda x, w, b: R.layer_norm(x, (5,), w, b)),
        (lambda x, w, b: normlab.functional.rms_norm(x, (5,), w, 1e-5), lambda x, w, b: R.rms_norm(x, (5,), w)),
    ],
    ids=["bn-features-last", "gn", "in", "ln", "rms"],
)
def test_fast_path_equals_plain_autograd_reference_values_and_second_derivatives(ours, ref):
    torch.manual_seed(0)
    x = (torch.randn(3, 4, 5, dtype=torch.float64) * 3 + 1).requires_grad_()
    w = torch.rand(5, dtype=torch.float64, requires_grad=True)
    b = torch.rand(5, dtype=torch.float64, requires_grad=True)
    v = torch.randn(3, 4, 5, dtype=torch.float64)
    out = []
    for f in (ours, ref):
        y = f(x, w, b)
        g = torch.autograd.grad((y * v).sum(), (x, w), create_graph=True)
        hv = torch.autograd.grad(sum((t * t).sum() for t in g), (x, w))  # a second-order quantity
        out.append((y, *g, *hv))
    for a, b_ in zip(*out):
        torch.testing.assert_close(a, b_)
