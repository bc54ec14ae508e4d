"""Running-statistics conventions against closed forms in numpy (and torch.nn where it has the feature).

Every test feeds a sequence of batches to a layer in training mode and checks
the running buffers against the closed form of the convention:

* PyTorch EMA (weight ``m`` on the new batch):  r_T = (1-m)^T r_0 + sum_t m (1-m)^(T-t) s_t
* Keras / Flax decay ``b`` (0.99):              the same with m = 1 - b
* cumulative average (``momentum=None``):        r_T = mean_t s_t
* zero-debiased EMA:                             r_T = sum_t m (1-m)^(T-t) s_t / (1 - (1-m)^T)

with ``s_t`` the batch mean and the unbiased (or biased) batch variance.
"""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import normlab
from normlab import _ops

C = 3


@pytest.fixture(autouse=True)
def _every_backend(backend):
    """Every convention on each CPU path: the C++ operators (the training step in one call), the same kernels
    through Python (the running-statistics operator), and the tensor-op kernels."""


def _batches(k=5, shapes=None, seed=0):
    rng = np.random.default_rng(seed)
    shapes = shapes or [(6, C, 4)] * k
    return [rng.normal(loc=rng.uniform(-2, 2), scale=rng.uniform(0.5, 3), size=s) for s in shapes]


def _np_stats(x, unbiased):
    """Per-channel mean and variance of (N, C, L) data over N and L."""
    axes = (0, 2) if x.ndim == 3 else (0,)
    n = x.size // x.shape[1]
    mean = x.mean(axes)
    var = x.var(axes)
    return mean, var * n / (n - 1) if unbiased else var


def _closed_form_ema(stats, m, init):
    t = len(stats)
    return (1 - m) ** t * init + sum(m * (1 - m) ** (t - 1 - i) * s for i, s in enumerate(stats))


def _run(layer, batches):
    layer.train()
    for b in batches:
        layer(torch.from_numpy(b))
    return layer.running_mean.numpy(), layer.running_var.numpy()


def test_pytorch_ema_matches_closed_form_and_torch_nn():
    batches = _batches()
    mean, var = _run(normlab.BatchNorm1d(C, momentum=0.1).double(), batches)
    s = [_np_stats(b, unbiased=True) for b in batches]
    np.testing.assert_allclose(mean, _closed_form_ema([a for a, _ in s], 0.1, 0.0), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(var, _closed_form_ema([v for _, v in s], 0.1, 1.0), rtol=1e-12)
    ref = nn.BatchNorm1d(C, momentum=0.1).double()
    for b in batches:
        ref(torch.from_numpy(b))
    np.testing.assert_allclose(mean, ref.running_mean.numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(var, ref.running_var.numpy(), rtol=1e-12)


def test_keras_flax_decay_099_equals_torch_001():
    assert normlab.functional.convert_momentum(0.99, to="torch") == pytest.approx(0.01, abs=1e-15)
    assert normlab.functional.convert_momentum(0.01, to="decay") == pytest.approx(0.99, abs=1e-15)
    batches = _batches(k=4)
    decay = _run(normlab.BatchNorm1d(C, momentum=0.99, momentum_convention="decay").double(), batches)
    torch_ = _run(normlab.BatchNorm1d(C, momentum=0.01).double(), batches)
    s = [_np_stats(b, unbiased=True) for b in batches]
    np.testing.assert_allclose(decay[0], _closed_form_ema([a for a, _ in s], 0.01, 0.0), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(decay[1], _closed_form_ema([v for _, v in s], 0.01, 1.0), rtol=1e-12)
    np.testing.assert_allclose(decay[0], torch_[0], rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(decay[1], torch_[1], rtol=1e-12)


@pytest.mark.parametrize("framework", ["keras", "flax"])
def test_keras_and_flax_update_rule_with_biased_storage(framework):
    # Keras 3: moving = moving * momentum + batch * (1 - momentum), biased batch variance, eps 1e-3, channels last;
    # Flax linen: ra = momentum * ra + (1 - momentum) * batch, var = E[x^2] - E[x]^2 (biased), eps 1e-5.
    eps = 1e-3 if framework == "keras" else 1e-5
    rng = np.random.default_rng(3)
    batches = [rng.normal(1.5, 2.0, size=(5, 4, C)) for _ in range(3)]  # (N, S, C), features last
    layer = normlab.BatchNorm(
        C, eps=eps, momentum=0.99, momentum_convention="decay", unbiased_running_var=False, feature_dim=-1
    ).double()
    moving_mean, moving_var = np.zeros(C), np.ones(C)
    for b in batches:
        y = layer(torch.from_numpy(b)).detach().numpy()
        mean, var = b.mean((0, 1)), b.var((0, 1))
        np.testing.assert_allclose(y, (b - mean) / np.sqrt(var + eps), rtol=1e-10, atol=1e-12)
        moving_mean = moving_mean * 0.99 + mean * (1 - 0.99)
        moving_var = moving_var * 0.99 + var * (1 - 0.99)
    np.testing.assert_allclose(layer.running_mean.numpy(), moving_mean, rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(layer.running_var.numpy(), moving_var, rtol=1e-12)
    layer.eval()
    x = rng.normal(size=(2, 4, C))
    np.testing.assert_allclose(
        layer(torch.from_numpy(x)).detach().numpy(), (x - moving_mean) / np.sqrt(moving_var + eps), rtol=1e-10
    )


@pytest.mark.parametrize("unbiased", [True, False], ids=["unbiased", "biased"])
def test_stored_variance_biased_or_unbiased(unbiased):
    batches = _batches(k=3, shapes=[(4, C, 2), (7, C, 3), (3, C, 5)])
    _, var = _run(normlab.BatchNorm1d(C, momentum=0.3, unbiased_running_var=unbiased).double(), batches)
    expected = _closed_form_ema([_np_stats(b, unbiased)[1] for b in batches], 0.3, 1.0)
    np.testing.assert_allclose(var, expected, rtol=1e-12)


def test_cumulative_average_matches_closed_form_and_torch_nn():
    batches = _batches(k=4, shapes=[(5, C, 3), (8, C, 3), (2, C, 3), (6, C, 3)])
    layer = normlab.BatchNorm1d(C, momentum=None).double()
    mean, var = _run(layer, batches)
    s = [_np_stats(b, unbiased=True) for b in batches]
    np.testing.assert_allclose(mean, np.mean([a for a, _ in s], 0), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(var, np.mean([v for _, v in s], 0), rtol=1e-12)
    assert int(layer.num_batches_tracked) == 4
    ref = nn.BatchNorm1d(C, momentum=None).double()
    for b in batches:
        ref(torch.from_numpy(b))
    np.testing.assert_allclose(mean, ref.running_mean.numpy(), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(var, ref.running_var.numpy(), rtol=1e-12)


@pytest.mark.parametrize("momentum,convention,m", [(0.1, "torch", 0.1), (0.9, "decay", 0.1), (0.99, "decay", 0.01)])
def test_zero_debiased_ema_matches_closed_form(momentum, convention, m):
    batches = _batches(k=6)
    layer = normlab.BatchNorm1d(C, momentum=momentum, momentum_convention=convention, debias=True).double()
    s = [_np_stats(b, unbiased=True) for b in batches]
    for t in (1, 6):
        layer.reset_running_stats()
        mean, var = _run(layer, batches[:t])
        norm = 1 - (1 - m) ** t  # an EMA started at zero, bias-corrected (Adam)
        np.testing.assert_allclose(mean, _closed_form_ema([a for a, _ in s[:t]], m, 0.0) / norm, rtol=1e-11)
        np.testing.assert_allclose(var, _closed_form_ema([v for _, v in s[:t]], m, 0.0) / norm, rtol=1e-11)
    np.testing.assert_allclose(_run(layer.__class__(C, debias=True).double(), batches[:1])[0], s[0][0], rtol=1e-12)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_batch_is_skipped_counted_and_warned_once(monkeypatch, bad):
    monkeypatch.setattr(_ops, "_warned", set())
    batches = _batches(k=3)
    layer = normlab.BatchNorm1d(C, momentum=0.2).double()
    _run(layer, batches[:2])
    before = (layer.running_mean.clone(), layer.running_var.clone(), int(layer.num_batches_tracked))
    poisoned = torch.from_numpy(batches[2]).clone()
    poisoned[1, 0, 2] = bad
    with pytest.warns(RuntimeWarning, match="non-finite"):
        layer(poisoned)
    assert torch.equal(layer.running_mean, before[0]) and torch.equal(layer.running_var, before[1])
    assert int(layer.num_batches_tracked) == before[2] and int(layer.num_nonfinite_batches) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the second skip is counted silently
        layer(poisoned * 2)
    assert int(layer.num_nonfinite_batches) == 2 and torch.equal(layer.running_mean, before[0])
    assert "num_nonfinite_batches" not in layer.state_dict()  # state dicts stay PyTorch's
    torch_bn = nn.BatchNorm1d(C).double()  # the contrast: torch.nn lets the batch into its buffers
    torch_bn(poisoned)
    assert not torch.isfinite(torch_bn.running_mean).all() or not torch.isfinite(torch_bn.running_var).all()
    mean, var = _run(layer, batches[2:])  # the next finite batch updates as if nothing happened
    s = [_np_stats(b, unbiased=True) for b in batches]
    np.testing.assert_allclose(mean, _closed_form_ema([a for a, _ in s], 0.2, 0.0), rtol=1e-12, atol=1e-14)
    np.testing.assert_allclose(var, _closed_form_ema([v for _, v in s], 0.2, 1.0), rtol=1e-12)


def test_masked_statistics_use_only_valid_positions():
    rng = np.random.default_rng(5)
    n, s, d = 4, 6, C
    x = rng.normal(0.7, 1.8, size=(n, s, d))
    lengths = [6, 3, 1, 4]
    mask = np.arange(s)[None, :] < np.array(lengths)[:, None]  # (N, S), True = real token
    x[~mask] = 1e6  # padding that would dominate the statistics if it leaked in
    layer = normlab.BatchNorm(d, feature_dim=-1, momentum=0.5).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.5, 1.5, 2.0], dtype=torch.float64))
        layer.bias.copy_(torch.tensor([0.1, -0.2, 0.3], dtype=torch.float64))
    y = layer(torch.from_numpy(x), mask=torch.from_numpy(mask)).detach().numpy()
    valid = x[mask]  # (M, D)
    mean, var = valid.mean(0), valid.var(0)
    expected = (valid - mean) / np.sqrt(var + layer.eps) * np.array([0.5, 1.5, 2.0]) + np.array([0.1, -0.2, 0.3])
    np.testing.assert_allclose(y[mask], expected, rtol=1e-10, atol=1e-10)
    m = valid.shape[0]
    np.testing.assert_allclose(layer.running_mean.numpy(), 0.5 * mean, rtol=1e-12)
    np.testing.assert_allclose(layer.running_var.numpy(), 0.5 + 0.5 * var * m / (m - 1), rtol=1e-12)


# --------------------------------------------------------------------------- micro-batches

_LAYERS = {
    "torch.nn": lambda: nn.BatchNorm2d(C),
    "torch.nn cumulative": lambda: nn.BatchNorm2d(C, momentum=None),
    "normlab": lambda: normlab.BatchNorm2d(C, momentum=0.3),
    "normlab decay+debias": lambda: normlab.BatchNorm2d(C, momentum=0.9, momentum_convention="decay", debias=True),
    "normlab biased": lambda: normlab.BatchNorm2d(C, unbiased_running_var=False),
    "renorm": lambda: normlab.BatchRenorm(C, r_max_warmup=(0, 0), d_max_warmup=(0, 0)),
    "channels-last": lambda: normlab.BatchNorm(C, feature_dim=-1),
}


@pytest.mark.parametrize("kind", list(_LAYERS))
def test_micro_batch_accumulation_equals_full_batch(kind):
    full, micro = _LAYERS[kind]().double(), _LAYERS[kind]().double()
    full.train()
    micro.train()
    rng = np.random.default_rng(7)
    for step in range(3):
        x = torch.from_numpy(rng.normal(step - 1.0, 1.0 + step, size=(12, C, 3, 2)))
        if kind == "channels-last":
            x = x.movedim(1, -1)
        full(x)
        with normlab.accumulate_stats(micro):
            for xb in x.split([3, 5, 4]):  # uneven micro-batches
                micro(xb)
        torch.testing.assert_close(micro.running_mean, full.running_mean, rtol=1e-12, atol=1e-13)
        torch.testing.assert_close(micro.running_var, full.running_var, rtol=1e-12, atol=1e-13)
        assert int(micro.num_batches_tracked) == int(full.num_batches_tracked) == step + 1
    assert micro.track_running_stats and not micro._forward_hooks


def test_micro_batch_accumulation_with_masks_and_through_a_model():
    rng = np.random.default_rng(11)
    model = nn.Sequential(
        nn.Linear(4, C), normlab.BatchNorm(C, feature_dim=-1), nn.ReLU(), nn.Linear(C, 2), nn.BatchNorm1d(2)
    )
    model = model.double().train()
    x = torch.from_numpy(rng.normal(size=(10, 4)))
    seen = []
    model[4].register_forward_hook(lambda m, a, o: seen.append(a[0].detach().numpy()))
    with normlab.accumulate_stats(model):
        for xb in x.split([4, 6]):
            model(xb)
    # the first BN sees the same inputs either way: its statistics are the full batch's
    h = model[0](x).detach().numpy()
    np.testing.assert_allclose(model[1].running_mean.numpy(), 0.1 * h.mean(0), rtol=1e-12)
    np.testing.assert_allclose(model[1].running_var.numpy(), 0.9 + 0.1 * h.var(0, ddof=1), rtol=1e-12)
    # the second sees micro-batch-normalised inputs: its update pools exactly what it saw
    pooled = np.concatenate(seen)
    np.testing.assert_allclose(model[4].running_mean.numpy(), 0.1 * pooled.mean(0), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(model[4].running_var.numpy(), 0.9 + 0.1 * pooled.var(0, ddof=1), rtol=1e-12)

    # masked sequences: the pooled statistics are those of the valid positions of the whole batch
    bn = normlab.BatchNorm(C, feature_dim=-1, momentum=1.0).double()
    seq = torch.from_numpy(rng.normal(size=(6, 5, C)))
    mask = torch.from_numpy(rng.random((6, 5)) < 0.6)
    mask[:, 0] = True
    with normlab.accumulate_stats(bn):
        for xb, mb in zip(seq.split(3), mask.split(3)):
            bn(xb, mask=mb)
    valid = seq.numpy()[mask.numpy()]
    np.testing.assert_allclose(bn.running_mean.numpy(), valid.mean(0), rtol=1e-12)
    np.testing.assert_allclose(bn.running_var.numpy(), valid.var(0, ddof=1), rtol=1e-12)


def test_micro_batch_accumulation_ghost_and_frozen_and_errors():
    ghost_full = normlab.GhostBatchNorm(C, virtual_batch_size=2).double()
    ghost_micro = normlab.GhostBatchNorm(C, virtual_batch_size=2).double()
    x = torch.randn(8, C, 3, dtype=torch.float64) * 2 + 1
    ghost_full(x)
    with normlab.accumulate_stats(ghost_micro):
        for xb in x.split([4, 2, 2]):  # whole virtual batches per micro-batch
            ghost_micro(xb)
    torch.testing.assert_close(ghost_micro.running_mean, ghost_full.running_mean, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(ghost_micro.running_var, ghost_full.running_var, rtol=1e-12, atol=1e-13)
    assert int(ghost_micro.num_batches_tracked) == 4

    frozen = normlab.BatchNorm1d(C, frozen=True).double()
    with normlab.accumulate_stats(frozen):
        frozen(x)
    assert int(frozen.num_batches_tracked) == 0
    assert torch.equal(frozen.running_mean, torch.zeros(C, dtype=torch.float64))

    bn = normlab.BatchNorm1d(C).double()
    with pytest.raises(RuntimeError, match="boom"):
        with normlab.accumulate_stats(bn):
            bn(x)
            raise RuntimeError("boom")
    assert int(bn.num_batches_tracked) == 0 and bn.track_running_stats and not bn._forward_hooks
