"""PyTorch's own sample inputs for its norm modules, replayed through normlab against torch.nn.

``torch.testing._internal.common_modules.module_db`` lists, for every torch.nn
module, the constructor arguments and forward inputs PyTorch tests it with
(batched, unbatched, empty batches, odd shapes, float32 and float64, train and
eval). Each sample builds the torch.nn module and normlab's layer of the same
name with the same arguments and state, runs both on the same input, and
compares the output, the gradients of the input and parameters, and the
buffers afterwards. LocalResponseNorm is not a normlab layer and is left out.
"""

from __future__ import annotations

import copy

import pytest
import torch

import normlab

common_modules = pytest.importorskip(
    "torch.testing._internal.common_modules", reason="needs PyTorch's test helpers (pip install expecttest)"
)

NORMS = [m for m in common_modules.module_db if m.module_cls.__name__ in normlab.__all__ and "Norm" in m.name]


def _samples():
    out = []
    for info in NORMS:
        for dtype in (torch.float32, torch.float64):
            for training in (True, False):
                inputs = info.module_inputs_func(info, device="cpu", dtype=dtype, requires_grad=True, training=training)
                for i, sample in enumerate(inputs):
                    out.append(pytest.param(info, sample, training, id=f"{info.name}-{dtype}-{training}-{i}"))
    return out


SAMPLES = _samples()


def test_every_norm_sample_is_replayed():
    """The 252 samples PyTorch 2.13 gives for BatchNorm/GroupNorm/InstanceNorm/LayerNorm/RMSNorm."""
    assert {m.module_cls.__name__ for m in NORMS} == {
        "BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "GroupNorm", "InstanceNorm1d", "InstanceNorm2d",
        "InstanceNorm3d", "LayerNorm", "RMSNorm",
    }  # fmt: skip
    assert len(SAMPLES) == 252


def _clone(obj):
    if isinstance(obj, torch.Tensor):
        return obj.detach().clone().requires_grad_(obj.requires_grad)
    return copy.deepcopy(obj)


@pytest.mark.parametrize("info, sample, training", SAMPLES)
def test_normlab_matches_torch_on_pytorch_samples(info, sample, training):
    args, kwargs = sample.constructor_input.args, sample.constructor_input.kwargs
    torch.manual_seed(0)
    dtype = next(a.dtype for a in sample.forward_input.args if isinstance(a, torch.Tensor))
    ref = info.module_cls(*args, **kwargs).to(dtype)  # as PyTorch's own test_modules builds them
    ours = getattr(normlab, info.module_cls.__name__)(*args, **kwargs).to(dtype)
    assert isinstance(ours, info.module_cls)
    ours.load_state_dict(ref.state_dict())
    with torch.no_grad():  # non-trivial affine parameters, the same for both
        for p_ref, p_ours in zip(ref.parameters(), ours.parameters()):
            p_ref.uniform_(0.5, 1.5)
            p_ours.copy_(p_ref)
    ref.train(training)
    ours.train(training)
    fargs, fkwargs = sample.forward_input.args, sample.forward_input.kwargs
    in_ref = [_clone(a) for a in fargs]
    in_ours = [_clone(a) for a in fargs]
    y_ref = ref(*in_ref, **fkwargs)
    y_ours = ours(*in_ours, **fkwargs)
    tol = {"rtol": 1e-9, "atol": 1e-9} if dtype == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
    assert y_ours.shape == y_ref.shape and y_ours.dtype == y_ref.dtype
    torch.testing.assert_close(y_ours, y_ref, **tol)
    for name, b_ref in ref.named_buffers():
        torch.testing.assert_close(dict(ours.named_buffers())[name], b_ref, **tol)
    if y_ref.requires_grad:
        g = torch.randn_like(y_ref)
        leaves_ref = [t for t in in_ref if isinstance(t, torch.Tensor) and t.requires_grad] + list(ref.parameters())
        leaves_ours = [t for t in in_ours if isinstance(t, torch.Tensor) and t.requires_grad] + list(ours.parameters())
        grads_ref = torch.autograd.grad(y_ref, leaves_ref, g, allow_unused=True)
        grads_ours = torch.autograd.grad(y_ours, leaves_ours, g, allow_unused=True)
        for a, b in zip(grads_ours, grads_ref):
            if b is None or a is None:
                assert (a is None or not a.abs().sum()) and (b is None or not b.abs().sum())
            elif torch.isfinite(b).all():  # torch.nn's GroupNorm gives NaN weight gradients on empty inputs
                torch.testing.assert_close(a, b, **tol)
