"""Checkpoints load both ways; convert swaps every norm and keeps training identical."""

import io

import pytest
import torch
from torch import nn

import normlab

PAIRS = [
    (lambda: nn.BatchNorm1d(5), lambda: normlab.BatchNorm1d(5)),
    (lambda: nn.BatchNorm2d(5, affine=False), lambda: normlab.BatchNorm2d(5, affine=False)),
    (lambda: nn.BatchNorm3d(5, track_running_stats=False), lambda: normlab.BatchNorm3d(5, track_running_stats=False)),
    (lambda: nn.BatchNorm2d(5, bias=False), lambda: normlab.BatchNorm2d(5, bias=False)),
    (lambda: nn.LayerNorm((5, 3)), lambda: normlab.LayerNorm((5, 3))),
    (lambda: nn.LayerNorm(5, bias=False), lambda: normlab.LayerNorm(5, bias=False)),
    (lambda: nn.RMSNorm(5), lambda: normlab.RMSNorm(5)),
    (lambda: nn.GroupNorm(5, 5), lambda: normlab.GroupNorm(5, 5)),
    (
        lambda: nn.InstanceNorm2d(5, affine=True, track_running_stats=True),
        lambda: normlab.InstanceNorm2d(5, affine=True, track_running_stats=True),
    ),
]


@pytest.mark.parametrize("make_ref,make_ours", PAIRS)
def test_state_dict_round_trip_both_ways(make_ref, make_ours):
    ref, ours = make_ref(), make_ours()
    sd_ref, sd_ours = ref.state_dict(), ours.state_dict()
    assert list(sd_ref) == list(sd_ours)
    for k in sd_ref:
        assert sd_ref[k].shape == sd_ours[k].shape and sd_ref[k].dtype == sd_ours[k].dtype, k
    # perturb, save through a real file object, load into the other library
    with torch.no_grad():
        for t in list(ref.parameters()) + [b for b in ref.buffers() if b.is_floating_point()]:
            t.uniform_(0.5, 2.0)
    buf = io.BytesIO()
    torch.save(ref.state_dict(), buf)
    buf.seek(0)
    ours.load_state_dict(torch.load(buf))
    for k, v in ours.state_dict().items():
        torch.testing.assert_close(v, ref.state_dict()[k], rtol=0, atol=0)
    fresh = make_ref()
    fresh.load_state_dict(ours.state_dict())
    for k, v in fresh.state_dict().items():
        torch.testing.assert_close(v, ref.state_dict()[k], rtol=0, atol=0)


def test_old_checkpoint_without_num_batches_tracked_loads():
    sd = nn.BatchNorm2d(3).state_dict()
    del sd["num_batches_tracked"]
    sd._metadata = {"": {"version": 1}}
    m = normlab.BatchNorm2d(3)
    m.load_state_dict(sd)
    assert int(m.num_batches_tracked) == 0


def _cnn():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1, bias=False),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, padding=1),
        nn.GroupNorm(2, 8),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(8 * 6 * 6, 16),
        nn.LayerNorm(16),
        nn.Linear(16, 4),
    )


def test_convert_small_cnn_same_outputs_and_training_continues_identically():
    torch.manual_seed(0)
    ref = _cnn()
    ours = _cnn()
    ours.load_state_dict(ref.state_dict())
    ours = normlab.convert(ours)
    # normlab's layers are instances of torch.nn's classes; none of torch.nn's own classes is left
    assert not any(type(m) in (nn.BatchNorm2d, nn.GroupNorm, nn.LayerNorm) for m in ours.modules())
    assert sum(isinstance(m, (normlab.BatchNorm2d, normlab.GroupNorm, normlab.LayerNorm)) for m in ours.modules()) == 3
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9)
    for _ in range(4):
        x, y = torch.randn(10, 3, 6, 6), torch.randint(0, 4, (10,))
        for m, opt in ((ref, opt_ref), (ours, opt_ours)):
            opt.zero_grad()
            nn.functional.cross_entropy(m(x), y).backward()
            opt.step()
    ref.eval(), ours.eval()
    x = torch.randn(5, 3, 6, 6)
    torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-5)
    for (k, a), (_, b) in zip(ours.state_dict().items(), ref.state_dict().items()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=k)


def test_convert_keeps_parameters_modes_and_goes_back():
    model = _cnn()
    model[1].eval()  # a mixed-mode model
    w = model[1].weight
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    model = normlab.convert(model)
    assert model[1].weight is w, "the very same Parameter: optimizers keep working"
    assert opt.param_groups[0]["params"][1] is model[1].weight
    assert not model[1].training and model[4].training
    back = normlab.convert(model, to="torch")
    assert type(back[1]) is nn.BatchNorm2d and not back[1].training and back[1].weight is w


def test_convert_a_bare_norm_layer_and_decay_convention():
    bn = normlab.BatchNorm1d(4, momentum=0.99, momentum_convention="decay")
    t = normlab.convert(bn, to="torch")
    assert type(t) is nn.BatchNorm1d and t.momentum == pytest.approx(0.01)
    with pytest.raises(ValueError, match="frozen, debiased or biased-variance"):
        normlab.convert(normlab.BatchNorm1d(4, debias=True), to="torch")
    with pytest.raises(ValueError, match="frozen, debiased or biased-variance"):
        normlab.convert(normlab.BatchNorm1d(4, unbiased_running_var=False), to="torch")
    with pytest.raises(ValueError, match="'normlab' or 'torch'"):
        normlab.convert(bn, to="jax")
