"""normlab.lab.models: every model with every registered norm, norm placement, residual blocks, masks."""

from __future__ import annotations

import functools
import math

import numpy as np
import pytest
import torch
from torch import nn

import normlab
from normlab.lab.models import build_model, model_names, register_model, wrn_depth_to_blocks
from normlab.normfree import ResidualBlock, ScaledStdConv2d, SkipInit

K = 5  # classes
SMALL = {  # model -> (in_shape, small options)
    "mlp": [((1, 8, 8), {"width": 16, "depth": 2}), ((12,), {"width": 16, "depth": 2})],
    "cnn": [((1, 8, 8), {"channels": (8, 16)}), ((2, 40), {"channels": (8, 16)})],
    "resnet": [((1, 8, 8), {"depth": 3, "base_width": 8}), ((2, 40), {"depth": 3, "base_width": 8})],
    "transformer": [((10, 6), {"d_model": 16, "heads": 2, "depth": 1})],
}
NOT_APPLICABLE = {("mlp", "instancenorm")}  # instance statistics of a vector: one value per (sample, channel)
TORCH_NORMS = (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.LocalResponseNorm)


def _inputs(shape, n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *shape, generator=g)
    if len(shape) == 2 and shape[0] == 10:  # sequences: lengths 3..10, padding zero
        lengths = torch.tensor([10, 3, 7, 5, 10, 4, 8, 6][:n])
        mask = torch.arange(shape[0])[None, :] < lengths[:, None]
        return x * mask[..., None], mask
    return x, None


def _run(model, x, mask):
    return model(x, mask) if mask is not None else model(x)


def test_model_names():
    assert model_names() == ["cnn", "mlp", "resnet", "transformer"]


CASES = [(m, s, o) for m, cases in SMALL.items() for s, o in cases]


@pytest.mark.parametrize("norm", normlab.norm_names())
@pytest.mark.parametrize("name, in_shape, opts", CASES, ids=[f"{m}-{'x'.join(map(str, s))}" for m, s, _ in CASES])
def test_every_model_with_every_norm_runs_forward_and_backward(name, in_shape, opts, norm):
    torch.manual_seed(0)
    x, mask = _inputs(in_shape)
    if (name, norm) in NOT_APPLICABLE:
        with pytest.raises(ValueError):
            _run(build_model(name, in_shape=in_shape, num_classes=K, norm_layer=norm, **opts), x, mask)
        return
    if name == "transformer" and norm in ("groupnorm", "instancenorm"):  # channel-first only: refused at build time
        with pytest.raises(ValueError, match="channel-first"):
            build_model(name, in_shape=in_shape, num_classes=K, norm_layer=norm, **opts)
        return
    model = build_model(name, in_shape=in_shape, num_classes=K, norm_layer=norm, **opts)
    out = _run(model, x, mask)
    assert out.shape == (8, K) and torch.isfinite(out).all()
    out.logsumexp(1).mean().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert sum(float(g.abs().sum()) for g in grads) > 0
    model.eval()
    with torch.no_grad():
        assert _run(model, x, mask).shape == (8, K)
    # normlab's layers subclass torch.nn's; no norm of torch.nn's own (an instance not from normlab) is left
    assert not any(
        isinstance(m, TORCH_NORMS) and not type(m).__module__.startswith("normlab.") for m in model.modules()
    )


@pytest.mark.parametrize("name, in_shape, opts", CASES, ids=[f"{m}-{'x'.join(map(str, s))}" for m, s, _ in CASES])
def test_norms_come_only_from_make_norm_with_the_right_width_and_axis(name, in_shape, opts):
    calls = []

    def spy(num_features, *, feature_dim=1):
        calls.append((num_features, feature_dim))
        return normlab.make_norm("batchnorm", num_features, feature_dim=feature_dim)

    model = build_model(name, in_shape=in_shape, num_classes=K, norm_layer=spy, **opts)
    norms = [m for m in model.modules() if isinstance(m, normlab.BatchNorm)]
    assert len(norms) == len(calls) > 0
    assert sorted(c for c, _ in calls) == sorted(m.num_features for m in norms)
    assert {fd for _, fd in calls} == ({-1} if name == "transformer" else {1})
    x, mask = _inputs(in_shape)
    assert _run(model, x, mask).shape == (8, K)


def test_norm_layer_accepts_a_partial_and_a_class():
    part = functools.partial(normlab.make_norm, "batchnorm", momentum=0.01)
    model = build_model("cnn", in_shape=(1, 8, 8), num_classes=K, norm_layer=part, channels=(4, 8))
    assert [m.momentum for m in model.modules() if isinstance(m, normlab.BatchNorm)] == [0.01, 0.01]
    model = build_model("mlp", in_shape=(6,), num_classes=K, norm_layer=normlab.BatchNorm1d, width=8, depth=1)
    assert isinstance(model.blocks[0].norm, normlab.BatchNorm1d)
    model = build_model("mlp", in_shape=(6,), num_classes=K, norm_layer=None, width=8, depth=1)
    assert not list(model.blocks[0].norm.parameters())


def test_build_model_errors_name_the_valid_choices():
    with pytest.raises(KeyError, match="known models: cnn, mlp, resnet, transformer"):
        build_model("vgg", in_shape=(1, 8, 8), num_classes=K)
    with pytest.raises(TypeError, match="unknown option.*'widht'.*valid options: width, depth"):
        build_model("mlp", in_shape=(1, 8, 8), num_classes=K, widht=3)
    with pytest.raises(ValueError, match="norm_position='middle' is not one of"):
        build_model("mlp", in_shape=(4,), num_classes=K, norm_position="middle")
    with pytest.raises(ValueError, match="activation='swish' is not one of"):
        build_model("cnn", in_shape=(1, 8, 8), num_classes=K, activation="swish")
    with pytest.raises(ValueError, match=r"needs in_shape \(C, H, W\)"):
        build_model("resnet", in_shape=(64,), num_classes=K)
    with pytest.raises(ValueError, match="too small for 4 pooling blocks"):
        build_model("cnn", in_shape=(1, 8, 8), num_classes=K, channels=(4, 4, 4, 4))
    with pytest.raises(KeyError, match="unknown norm 'bn2'"):
        build_model("mlp", in_shape=(4,), num_classes=K, norm_layer="bn2")
    with pytest.raises(KeyError, match="already registered"):
        register_model("mlp")(object)


def test_device_and_dtype():
    model = build_model("mlp", in_shape=(4,), num_classes=K, device="cpu", dtype=torch.float64, width=8, depth=1)
    assert all(p.dtype == torch.float64 and p.device.type == "cpu" for p in model.parameters())


# ------------------------------------------------------------------ placement (MLP / CNN)


@pytest.mark.parametrize(
    "position, order, norm_width",
    [
        ("pre_act", ["linear", "norm", "act"], 16),
        ("post_act", ["linear", "act", "norm"], 16),
        ("before_linear", ["norm", "linear", "act"], 12),
    ],
)
@pytest.mark.parametrize("drop_at, drop_after", [("after_act", "act"), ("before_norm", None)])
def test_mlp_norm_and_dropout_positions(position, order, norm_width, drop_at, drop_after):
    model = build_model(
        "mlp",
        in_shape=(12,),
        num_classes=K,
        width=16,
        depth=2,
        norm_position=position,
        dropout=0.5,
        dropout_position=drop_at,
    )
    first = model.blocks[0]
    names = [n for n, _ in first.named_children()]
    expected = list(order)
    expected.insert(expected.index("act") + 1 if drop_after else expected.index("norm"), "dropout")
    assert names == expected
    assert first.norm.num_features == norm_width
    # the norm really standardises what reaches it: its output has zero mean and unit variance per feature
    seen = {}
    first.norm.register_forward_hook(lambda m, i, o: seen.update(out=o.detach().double().numpy()))
    model(torch.randn(256, 12) * 3 + 1)
    np.testing.assert_allclose(seen["out"].mean(0), 0, atol=1e-6)
    np.testing.assert_allclose(seen["out"].var(0), 1, atol=1e-3)


def test_mlp_takes_sequences_with_a_mask():
    x, mask = _inputs((10, 6))
    model = build_model("mlp", in_shape=(10, 6), num_classes=K, width=8, depth=1)
    torch.testing.assert_close(model(x, mask=mask), model(x))


def test_mlp_depth_zero_is_a_linear_classifier_and_activations_apply():
    model = build_model("mlp", in_shape=(1, 2, 3), num_classes=K, depth=0)
    kinds = [type(m) for m in model.modules() if not isinstance(m, (nn.Sequential, nn.Flatten))]
    assert kinds == [type(model), nn.Linear]
    model = build_model("mlp", in_shape=(4,), num_classes=K, width=8, depth=3, activation="sigmoid", norm_layer="none")
    assert all(isinstance(b.act, nn.Sigmoid) for b in model.blocks)


@pytest.mark.parametrize("in_shape, conv", [((3, 16, 16), nn.Conv2d), ((1, 40), nn.Conv1d)])
def test_cnn_uses_conv_of_the_input_dimension(in_shape, conv):
    model = build_model("cnn", in_shape=in_shape, num_classes=K, channels=(4, 8, 8))
    convs = [m for m in model.modules() if isinstance(m, (nn.Conv1d, nn.Conv2d))]
    assert len(convs) == 3 and all(type(c) is conv for c in convs)
    assert [n for n, _ in model.blocks[0].named_children()] == ["linear", "norm", "act", "pool"]
    spatial = [s // 8 for s in in_shape[1:]]
    assert model.head.in_features == 8 * math.prod(spatial)
    assert model(torch.randn(4, *in_shape)).shape == (4, K)


# ------------------------------------------------------------------ ResNet


def test_resnet_blocks_expose_branch_and_compute_skip_plus_alpha_branch():
    model = build_model(
        "resnet", in_shape=(3, 16, 16), num_classes=K, depth=7, stages=3, base_width=4, width=2, residual_scale=0.3
    )
    blocks = list(model.blocks)
    assert len(blocks) == 7 and all(isinstance(b, ResidualBlock) and isinstance(b.branch, nn.Module) for b in blocks)
    assert model.stage_starts == [0, 3, 5]  # 7 blocks over 3 stages: 3, 2, 2
    assert [b.branch.conv2.out_channels for b in blocks] == [8, 8, 8, 16, 16, 32, 32]
    projected = [i for i, b in enumerate(blocks) if not isinstance(b.skip, nn.Identity)]
    assert projected == [0, 3, 5]  # 4 -> 8 channels at block 0, stride 2 at the stage starts
    h = model.stem(torch.randn(6, 3, 16, 16))
    with torch.no_grad():
        for b in blocks:
            assert isinstance(b.alpha, SkipInit) and float(b.alpha.alpha) == pytest.approx(0.3)
            expected = b.skip(h) + 0.3 * b.branch(h)
            h = b(h)
            torch.testing.assert_close(h, expected)


@pytest.mark.parametrize("in_shape", [(3, 8, 8), (2, 24)])
def test_skipinit_zero_makes_every_identity_block_the_identity(in_shape):
    model = build_model(
        "resnet", in_shape=in_shape, num_classes=K, norm_layer="none", depth=6, base_width=4, residual_scale=0.0
    )
    h = model.stem(torch.randn(4, *in_shape))
    identity_blocks = 0
    for b in model.blocks:
        out = b(h)
        if isinstance(b.skip, nn.Identity):
            assert torch.equal(out, h)
            identity_blocks += 1
        else:
            assert torch.equal(out, b.skip(h))
        h = out
    assert identity_blocks == 4  # 6 blocks, 2 of them open a new stage


@pytest.mark.parametrize(
    "position, names",
    [
        ("pre_act", ["norm1", "act1", "conv1", "norm2", "act2", "conv2"]),
        ("post_act", ["act1", "norm1", "conv1", "act2", "norm2", "conv2"]),
    ],
)
def test_resnet_norm_position(position, names):
    model = build_model("resnet", in_shape=(2, 8, 8), num_classes=K, depth=3, base_width=4, norm_position=position)
    assert all([n for n, _ in b.branch.named_children()] == names for b in model.blocks)
    assert [n for n, _ in model.final.named_children()] == [n[:-1] for n in names[:2]]
    assert model(torch.randn(4, 2, 8, 8)).shape == (4, K)


def test_merge_scale_divides_each_sum_by_sqrt2():
    model = build_model(
        "resnet",
        in_shape=(2, 8, 8),
        num_classes=K,
        norm_layer="none",
        depth=3,
        stages=1,
        base_width=4,
        merge_scale=True,
    )
    b = model.blocks[1]
    h = torch.randn(3, 4, 8, 8)
    torch.testing.assert_close(b(h), (h + b.branch(h)) / math.sqrt(2))


def test_identity_activation_gives_a_linear_network():
    model = build_model(
        "resnet",
        in_shape=(2, 8, 8),
        num_classes=K,
        norm_layer="none",
        depth=4,
        base_width=4,
        activation="identity",
        residual_scale=0.5,
    ).double()
    assert not any(isinstance(m, (nn.ReLU, nn.MaxPool2d)) for m in model.modules())
    x, y = torch.randn(3, 2, 8, 8, dtype=torch.float64), torch.randn(3, 2, 8, 8, dtype=torch.float64)
    f0 = model(torch.zeros_like(x))  # the bias terms
    torch.testing.assert_close(model(2 * x - 3 * y) - f0, 2 * (model(x) - f0) - 3 * (model(y) - f0))


def test_resnet_depth_convention_and_wrn_helper():
    assert [wrn_depth_to_blocks(n) for n in (10, 16, 28)] == [3, 6, 12]
    with pytest.raises(ValueError, match="n = 6b"):
        wrn_depth_to_blocks(18)
    model = build_model("resnet", in_shape=(3, 32, 32), num_classes=10, depth=wrn_depth_to_blocks(16), width=2)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    # WRN-16-2: stem + 2 convs per block + 3 projections = 16 conv layers, as WRN counts its depth
    assert len(model.blocks) == 6 and len(convs) == 1 + 2 * 6 + 3
    assert [model.blocks[i].branch.conv2.out_channels for i in (0, 2, 4)] == [32, 64, 128]
    with pytest.raises(ValueError, match="depth .* must be an int >= stages=3"):
        build_model("resnet", in_shape=(3, 8, 8), num_classes=K, depth=2)


def test_fixup_resnet_structure_and_init():
    model = build_model(
        "resnet", in_shape=(3, 8, 8), num_classes=K, norm_layer="none", fixup=True, depth=4, base_width=8, stages=1
    )
    for b in model.blocks:
        assert torch.count_nonzero(b.branch.conv2.weight) == 0
        assert torch.count_nonzero(b.branch.conv1.weight) > 0
        assert b.branch.scale.scale.item() == 1.0 and b.branch.bias1a.bias.item() == 0.0
    assert torch.count_nonzero(model.head.weight) == 0 and torch.count_nonzero(model.head.bias) == 0
    x = torch.randn(2, 3, 8, 8)
    h = model.stem(x)
    assert torch.equal(model.blocks(h), h)  # every block the identity at init
    assert torch.equal(model(x), torch.zeros(2, K))
    with pytest.raises(ValueError, match="fixup=True replaces normalisation"):
        build_model("resnet", in_shape=(3, 8, 8), num_classes=K, norm_layer="batchnorm", fixup=True)


def test_weight_standardization_option_uses_scaled_ws_convs():
    model = build_model(
        "resnet",
        in_shape=(3, 8, 8),
        num_classes=K,
        norm_layer="none",
        depth=3,
        base_width=4,
        weight_standardization=True,
    )
    ws = [m for m in model.modules() if isinstance(m, ScaledStdConv2d)]
    relu_gamma = math.sqrt(2 / (1 - 1 / math.pi))
    assert len(ws) == 2 * 3 + 2 and all(m.gamma == pytest.approx(relu_gamma, rel=1e-7) for m in ws)
    assert type(model.stem) is nn.Conv2d


def test_deep_resnet_builds_and_stays_finite():
    torch.manual_seed(0)
    x = torch.randn(8, 3, 8, 8)
    for norm, scale in (("batchnorm", None), ("none", 0.0), ("none", 1 / math.sqrt(120))):
        model = build_model(
            "resnet", in_shape=(3, 8, 8), num_classes=K, norm_layer=norm, depth=120, base_width=4, residual_scale=scale
        )
        assert len(model.blocks) == 120
        out = model(x)
        assert torch.isfinite(out).all()
        out.logsumexp(1).mean().backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_batchnorm_resnet_skip_variance_grows_linearly_at_init():
    """The structure C9 measures: each normalised branch adds about unit variance to the skip path."""
    torch.manual_seed(0)
    model = build_model(
        "resnet", in_shape=(4, 8, 8), num_classes=K, depth=24, stages=1, base_width=16, activation="identity"
    )
    with torch.no_grad():
        h = model.stem(torch.randn(128, 4, 8, 8))
        v0 = float(h.var())
        for i, b in enumerate(model.blocks, start=1):
            h = b(h)
            if i in (8, 16, 24):
                assert float(h.var()) == pytest.approx(v0 + i, rel=0.25)


# ------------------------------------------------------------------ Transformer


def test_transformer_masked_positions_do_not_matter_with_masked_batchnorm():
    torch.manual_seed(0)
    x, mask = _inputs((10, 6))
    noisy = torch.where(mask[..., None], x, torch.randn_like(x) * 5)
    for norm in ("layernorm", "rmsnorm", "batchnorm"):
        model = build_model("transformer", in_shape=(10, 6), num_classes=K, norm_layer=norm, d_model=16, heads=2)
        torch.testing.assert_close(model(noisy, mask), model(x, mask))  # train mode: BN statistics too
    leaky = build_model(
        "transformer",
        in_shape=(10, 6),
        num_classes=K,
        norm_layer="batchnorm",
        d_model=16,
        heads=2,
        mask_norm_stats=False,
    )
    assert not torch.allclose(leaky(noisy, mask), leaky(x, mask), atol=1e-4)  # padding enters BN's statistics


def test_transformer_layernorm_is_per_sample_batchnorm_is_not():
    torch.manual_seed(0)
    x, mask = _inputs((10, 6))
    for norm, independent in (("layernorm", True), ("batchnorm", False)):
        model = build_model("transformer", in_shape=(10, 6), num_classes=K, norm_layer=norm, d_model=16, heads=2)
        full = model(x, mask)
        half = model(x[:4], mask[:4])
        assert torch.allclose(full[:4], half, atol=1e-5) == independent


def test_transformer_no_mask_equals_all_true_mask_and_checks_shapes():
    model = build_model("transformer", in_shape=(10, 6), num_classes=K, d_model=16, heads=2)
    x = torch.randn(4, 10, 6)
    torch.testing.assert_close(model(x), model(x, torch.ones(4, 10, dtype=torch.bool)))
    assert model(x[:, :7]).shape == (4, K)  # shorter sequences are fine
    with pytest.raises(ValueError, match=r"mask must be a bool tensor of shape \(N, S\)"):
        model(x, torch.ones(4, 9, dtype=torch.bool))
    with pytest.raises(ValueError, match="exceeds max_len=10"):
        model(torch.randn(2, 11, 6))
