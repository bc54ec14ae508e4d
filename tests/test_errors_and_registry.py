"""Bad input gets an error that says what was wrong and how to fix it; the registry builds by name, class or partial."""

import functools

import pytest
import torch
from torch import nn

import normlab


@pytest.mark.parametrize(
    "layer,x,match",
    [
        (
            lambda: normlab.BatchNorm2d(4),
            torch.randn(2, 3, 5, 5),
            r"3 features on axis 1.*num_features=4.*BatchNorm2d\(3\)",
        ),
        (lambda: normlab.BatchNorm2d(4), torch.randn(2, 4, 5), r"expected 4D input \(N, C, H, W\), got 3D"),
        (lambda: normlab.BatchNorm1d(4), torch.randn(1, 4), r"more than 1 value per feature.*batch of at least 2"),
        (lambda: normlab.BatchNorm(4, feature_dim=3), torch.randn(2, 4, 5), r"feature_dim=3 is out of range"),
        (
            lambda: normlab.LayerNorm(6),
            torch.randn(2, 5),
            r"normalized_shape \(6,\) must equal the input's trailing dims",
        ),
        (lambda: normlab.RMSNorm((3, 4)), torch.randn(2, 4, 3), r"normalized_shape \(3, 4\)"),
        (lambda: normlab.GroupNorm(2, 4), torch.randn(2, 6, 3), r"expected input \(N, 4, \*\)"),
        (lambda: normlab.InstanceNorm2d(4, affine=True), torch.randn(2, 3, 5, 5), r"3 channels.*num_features=4"),
        (lambda: normlab.InstanceNorm1d(4), torch.randn(2, 4, 1), r"more than 1 spatial element"),
        (lambda: normlab.BatchNorm1d(4), torch.randint(0, 3, (5, 4)), r"floating-point input.*x.float\(\)"),
    ],
)
def test_bad_input_errors_say_how_to_fix(layer, x, match):
    with pytest.raises((ValueError, TypeError, IndexError), match=match):
        layer()(x)


def test_groupnorm_that_does_not_divide_lists_valid_groups():
    with pytest.raises(ValueError, match=r"num_groups=4 must divide num_channels=6; valid choices are \[1, 2, 3, 6\]"):
        normlab.GroupNorm(4, 6)
    with pytest.raises(ValueError, match="valid choices"):
        normlab.functional.group_norm(torch.randn(2, 6, 3), 4)


def test_functional_shape_errors():
    with pytest.raises(ValueError, match=r"weight has shape \(3,\).*4 features"):
        normlab.functional.batch_norm(torch.randn(5, 4), None, None, torch.ones(3), training=True)
    with pytest.raises(ValueError, match="eval mode needs running_mean"):
        normlab.functional.batch_norm(torch.randn(5, 4), None, None, training=False)
    with pytest.raises(ValueError, match=r"mask has shape \(5,\), expected \(5, 3\)"):
        normlab.functional.batch_norm(
            torch.randn(5, 3, 4), None, None, training=True, feature_dim=-1, mask=torch.ones(5, dtype=torch.bool)
        )


def test_invalid_constructor_arguments():
    with pytest.raises(ValueError, match="num_features must be a positive int"):
        normlab.BatchNorm1d(0)
    with pytest.raises(ValueError, match="unknown momentum convention 'keras'"):
        normlab.BatchNorm1d(3, momentum_convention="keras")
    with pytest.raises(ValueError, match="outside"):
        normlab.BatchNorm1d(3, momentum=1.5)


def test_make_norm_by_name_class_and_partial():
    assert isinstance(normlab.make_norm("batchnorm", 8), normlab.BatchNorm)
    assert isinstance(normlab.make_norm("BatchNorm", 8), normlab.BatchNorm)
    assert isinstance(normlab.make_norm(normlab.BatchNorm2d, 8), normlab.BatchNorm2d)
    assert isinstance(normlab.make_norm(nn.BatchNorm2d, 8, feature_dim=1), nn.BatchNorm2d)  # torch classes work too
    assert normlab.make_norm(normlab.BatchNorm, 8, feature_dim=-1).feature_dim == -1
    gn = normlab.make_norm(functools.partial(normlab.GroupNorm, 4), 8)
    assert isinstance(gn, normlab.GroupNorm) and gn.num_groups == 4
    assert isinstance(normlab.make_norm("none", 8), nn.Identity)
    assert isinstance(normlab.make_norm(None, 8), nn.Identity)
    ln = normlab.make_norm("layernorm", 8, feature_dim=-1)
    assert isinstance(ln, normlab.LayerNorm) and ln.normalized_shape == (8,)
    assert normlab.make_norm("groupnorm", 48).num_groups == 24  # largest divisor of C not above 32
    assert normlab.make_norm("groupnorm", 64, num_groups=8).num_groups == 8


def test_channel_first_layernorm_is_groupnorm_one_group():
    x = torch.randn(3, 8, 5, 5, dtype=torch.float64)
    m = normlab.make_norm("layernorm", 8).double()
    torch.testing.assert_close(m(x), nn.functional.layer_norm(x, (8, 5, 5)))
    r = normlab.make_norm("rmsnorm", 8).double()
    torch.testing.assert_close(r(x), nn.functional.rms_norm(x, (8, 5, 5), eps=1e-5))


def test_unknown_norm_lists_known_names():
    with pytest.raises(KeyError, match=r"unknown norm 'batchnrom'; known norms: .*batchnorm.*groupnorm"):
        normlab.make_norm("batchnrom", 8)
    with pytest.raises(ValueError, match="channel-first"):
        normlab.make_norm("groupnorm", 8, feature_dim=-1)


def test_register_norm_rejects_duplicates():
    with pytest.raises(KeyError, match="already registered"):
        normlab.register_norm("batchnorm", lambda c, **kw: nn.Identity())
