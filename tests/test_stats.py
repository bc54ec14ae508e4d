"""recalibrate (precise BN) against population statistics computed in numpy; freeze/unfreeze inside train()."""

import copy

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import normlab


def _model(unbiased=True):
    torch.manual_seed(2)
    model = nn.Sequential(
        nn.Linear(5, 6),
        nn.BatchNorm1d(6, momentum=0.3),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(6, 4),
        normlab.BatchNorm1d(4, momentum=0.9, momentum_convention="decay", debias=True, unbiased_running_var=unbiased),
    ).double()
    with torch.no_grad():
        for bn in (model[1], model[5]):
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
    return model


def _np(t):
    return t.detach().numpy()


def _numpy_population_stats(model, batches, unbiased_last=True):
    """An independent numpy forward of ``_model`` in train-mode BN with dropout off; per-batch stats averaged."""
    w1, b1, w2, b2 = _np(model[0].weight), _np(model[0].bias), _np(model[4].weight), _np(model[4].bias)
    g1, be1 = _np(model[1].weight), _np(model[1].bias)
    stats1, stats2 = [], []
    for x in batches:
        x = x.numpy()
        n = x.shape[0]
        h = x @ w1.T + b1
        m, v = h.mean(0), h.var(0)
        stats1.append((m, v * n / (n - 1)))
        a = np.maximum((h - m) / np.sqrt(v + 1e-5) * g1 + be1, 0.0)
        z = a @ w2.T + b2
        stats2.append((z.mean(0), z.var(0) * n / (n - 1) if unbiased_last else z.var(0)))
    avg = lambda s: (np.mean([a for a, _ in s], 0), np.mean([b for _, b in s], 0))  # noqa: E731
    return avg(stats1), avg(stats2)


def _batches(sizes=(8, 5, 11, 7, 6), seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, 5, generator=g, dtype=torch.float64) * 1.5 + 0.3 for n in sizes]


@pytest.mark.parametrize("unbiased", [True, False], ids=["unbiased", "biased"])
def test_recalibrate_equals_numpy_population_stats(unbiased):
    model = _model(unbiased)
    batches = _batches()
    used = normlab.recalibrate(model, batches, num_batches=4)
    assert used == 4
    (m1, v1), (m2, v2) = _numpy_population_stats(model, batches[:4], unbiased_last=unbiased)
    np.testing.assert_allclose(_np(model[1].running_mean), m1, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(_np(model[1].running_var), v1, rtol=1e-10)
    np.testing.assert_allclose(_np(model[5].running_mean), m2, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(_np(model[5].running_var), v2, rtol=1e-10)


def test_recalibrate_matches_torch_swa_update_bn():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 3, 1), nn.BatchNorm2d(3))
    model = model.double()
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 2, 6, 6, generator=g, dtype=torch.float64), torch.zeros(4)) for _ in range(3)]
    ref = copy.deepcopy(model)
    torch.optim.swa_utils.update_bn(batches, ref)  # PyTorch's own: cumulative average over the loader
    normlab.recalibrate(model, batches)
    for a, b in zip(normlab.running_stats.batchnorm_modules(model), normlab.running_stats.batchnorm_modules(ref)):
        torch.testing.assert_close(a.running_mean, b.running_mean, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(a.running_var, b.running_var, rtol=1e-10, atol=1e-12)


def _hooks(m):
    return dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._forward_hooks_with_kwargs)


def test_recalibrate_restores_modes_momentum_counters_and_hooks():
    model = _model()
    model.train()
    model[1].eval()  # mixed modes must come back as they were
    model[1].num_batches_tracked.fill_(17)
    model[5].num_batches_tracked.fill_(3)
    calls = []
    handles = [
        model[1].register_forward_hook(lambda m, a, o: calls.append("post")),
        model[5].register_forward_pre_hook(lambda m, a: calls.append("pre")),
    ]
    modes = [m.training for m in model.modules()]
    hooks = [_hooks(m) for m in model.modules()]
    normlab.recalibrate(model, _batches()[:2])
    assert [m.training for m in model.modules()] == modes
    assert [_hooks(m) for m in model.modules()] == hooks
    assert calls == ["post", "pre"] * 2  # the user's hooks ran, ours are gone
    assert model[1].momentum == 0.3 and model[5].momentum == 0.9 and model[5].momentum_convention == "decay"
    assert model[5].debias and model[1].track_running_stats and model[5].track_running_stats
    assert int(model[1].num_batches_tracked) == 17 and int(model[5].num_batches_tracked) == 3
    for h in handles:
        h.remove()


def test_recalibrate_errors_leave_the_model_untouched():
    model = _model()
    state = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="yielded no batch"):
        normlab.recalibrate(model, [], num_batches=5)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert model.training and model[1].track_running_stats
    with pytest.raises(ValueError, match="no \\(unfrozen\\) BatchNorm"):
        normlab.recalibrate(nn.Linear(2, 2), [torch.randn(3, 2)])
    with pytest.raises(TypeError, match="forward=lambda model, batch"):
        normlab.recalibrate(model, [object()])


def test_recalibrate_with_fewer_batches_than_asked_uses_them_all_and_warns():
    short, full = _model(), _model()
    with pytest.warns(UserWarning, match="ran out after 2 of num_batches=5"):
        normlab.recalibrate(short, _batches()[:2], num_batches=5)
    normlab.recalibrate(full, _batches()[:2])
    for (k, v), w in zip(short.state_dict().items(), full.state_dict().values()):
        assert torch.equal(v, w), k


def test_recalibrate_masks_ghost_batches_and_frozen_layers():
    rng = np.random.default_rng(0)
    bn = normlab.BatchNorm(3, feature_dim=-1).double()
    batches, expected_m, expected_v = [], [], []
    for _ in range(3):
        x = rng.normal(1.0, 2.0, size=(4, 5, 3))
        mask = rng.random((4, 5)) < 0.7
        mask[:, 0] = True
        batches.append((torch.from_numpy(x), torch.zeros(4), torch.from_numpy(mask)))
        valid = x[mask]
        expected_m.append(valid.mean(0))
        expected_v.append(valid.var(0, ddof=1))
    normlab.recalibrate(bn, batches)  # (x, y, mask) batches are fed as bn(x, mask=mask)
    np.testing.assert_allclose(_np(bn.running_mean), np.mean(expected_m, 0), rtol=1e-12)
    np.testing.assert_allclose(_np(bn.running_var), np.mean(expected_v, 0), rtol=1e-12)

    ghost = normlab.GhostBatchNorm(3, virtual_batch_size=3).double()
    xs = [torch.from_numpy(rng.normal(size=(6, 3))) for _ in range(2)]
    normlab.recalibrate(ghost, xs)
    chunks = [c.numpy() for x in xs for c in x.split(3)]  # every virtual batch counts as a batch
    np.testing.assert_allclose(_np(ghost.running_mean), np.mean([c.mean(0) for c in chunks], 0), rtol=1e-12)
    np.testing.assert_allclose(_np(ghost.running_var), np.mean([c.var(0, ddof=1) for c in chunks], 0), rtol=1e-12)

    model = nn.Sequential(normlab.BatchNorm1d(3), normlab.BatchNorm1d(3)).double()
    normlab.freeze(model, ["1"])
    normlab.recalibrate(model, xs)  # frozen layers keep their statistics...
    assert torch.equal(model[1].running_mean, torch.zeros(3, dtype=torch.float64)) and model[1].frozen
    assert not torch.equal(model[0].running_mean, torch.zeros(3, dtype=torch.float64))
    normlab.recalibrate(model, xs, modules=[model[1]])  # ...unless listed, and stay frozen
    assert not torch.equal(model[1].running_mean, torch.zeros(3, dtype=torch.float64)) and model[1].frozen


def _cnn():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 3, 1), normlab.BatchNorm2d(3))
    model = model.double()
    with torch.no_grad():
        for bn in (model[1], model[4]):
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.uniform_(0.5, 1.5)
            bn.bias.uniform_(-0.5, 0.5)
            bn.num_batches_tracked.fill_(5)
    return model


def test_freeze_uses_and_keeps_running_stats_inside_train():
    model = _cnn()
    reference = copy.deepcopy(model).eval()  # frozen BN in train() == BN in eval()
    params = list(model.parameters())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model = normlab.freeze(model)
    assert isinstance(model[1], normlab.BatchNorm2d) and model[1].frozen and model[4].frozen
    assert all(a is b for a, b in zip(model.parameters(), params))  # the optimizer's tensors, still
    assert opt.param_groups[0]["params"][2] is model[1].weight
    model.train()
    buffers = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 2, 7, 7, dtype=torch.float64, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    y, yr = model(x), reference(xr)
    torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
    # and the eval-mode formula, independently
    eval_bn = lambda z, bn: F.batch_norm(z, bn.running_mean, bn.running_var, bn.weight, bn.bias, False)  # noqa: E731
    expected = eval_bn(model[3](F.relu(eval_bn(model[0](x), model[1]))), model[4])
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(y)
    y.backward(g)
    yr.backward(g)
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-12, atol=1e-12)
    for p, pr in zip(model.parameters(), reference.parameters()):
        torch.testing.assert_close(p.grad, pr.grad, rtol=1e-12, atol=1e-12)
    for k, v in model.state_dict().items():
        assert torch.equal(v, buffers[k]), k  # statistics and counters unchanged

    normlab.unfreeze(model)
    assert not model[1].frozen and not model[4].frozen
    y = model(x)
    h = F.relu(F.batch_norm(model[0](x), None, None, model[1].weight, model[1].bias, True))
    expected = F.batch_norm(model[3](h), None, None, model[4].weight, model[4].bias, True)
    torch.testing.assert_close(y, expected, rtol=1e-10, atol=1e-10)
    assert int(model[1].num_batches_tracked) == 6


def test_freeze_selected_layers_and_affine():
    model = _cnn()
    bn = model[4]
    model = normlab.freeze(model, ["4"], affine_trainable=False)
    assert isinstance(model[1], nn.BatchNorm2d)  # not chosen: untouched torch.nn layer
    assert model[4] is bn and bn.frozen and not bn.weight.requires_grad and not bn.bias.requires_grad
    model.train()(torch.randn(3, 2, 5, 5, dtype=torch.float64)).sum().backward()
    assert bn.weight.grad is None and model[1].weight.grad is not None
    assert int(bn.num_batches_tracked) == 5 and int(model[1].num_batches_tracked) == 6
    normlab.unfreeze(model, [bn])
    assert not bn.frozen and bn.weight.requires_grad
    single = normlab.freeze(nn.BatchNorm1d(3))  # a model that is itself a torch.nn BN layer
    assert isinstance(single, normlab.BatchNorm1d) and single.frozen
    sync = normlab.freeze(nn.SyncBatchNorm(3))  # torch's is GPU-only; normlab's runs frozen anywhere
    assert isinstance(sync, normlab.SyncBatchNorm) and sync.frozen
    x = torch.randn(4, 3)
    expected = F.batch_norm(x, sync.running_mean, sync.running_var, sync.weight, sync.bias)
    torch.testing.assert_close(sync.train()(x), expected)
    with pytest.raises(ValueError, match="no running statistics"):
        normlab.freeze(nn.BatchNorm1d(3, track_running_stats=False))
    with pytest.raises(TypeError, match="not a BatchNorm layer"):
        normlab.freeze(model, ["0"])
    with pytest.raises(KeyError, match="no module named 'nope'"):
        normlab.freeze(model, ["nope"])
