"""normlab's layers as first-class PyTorch citizens: compile, func transforms, export, ONNX, standard tools.

Oracles: torch.nn's own layers (the same tools applied to them), the
plain-autograd formulas of ``normlab.reference`` in float64, eager execution
(for compiled models) and onnxruntime (for ONNX exports).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.func import functional_call, grad, hessian, jacrev, jvp, vmap
from torch.nn.modules.batchnorm import _BatchNorm

import normlab
from normlab import reference as R
from normlab.lab.models import build_model

CHANNEL_FIRST = [n for n in normlab.norm_names()]
FEATURES_LAST = [n for n in normlab.norm_names() if n not in ("groupnorm", "instancenorm")]  # channel-first only


def _cnn(norm: str) -> nn.Module:
    return build_model("cnn", in_shape=(3, 8, 8), num_classes=3, norm_layer=norm, channels=(4, 8))


def _transformer(norm: str) -> nn.Module:
    return build_model("transformer", in_shape=(6, 8), num_classes=3, norm_layer=norm, d_model=16, depth=1, heads=2)


def _mask(n: int = 4, s: int = 6) -> torch.Tensor:
    mask = torch.ones(n, s, dtype=torch.bool)
    mask[1, 4:] = False
    return mask


# --------------------------------------------------------------------------- torch.compile


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize(
    "model, norm",
    [("cnn", n) for n in CHANNEL_FIRST] + [("transformer", n) for n in FEATURES_LAST],
)
def test_dynamo_sees_no_graph_break(model, norm, mode):
    torch._dynamo.reset()
    net = _cnn(norm) if model == "cnn" else _transformer(norm)
    net.train(mode == "train")
    args = (torch.randn(4, 3, 8, 8),) if model == "cnn" else (torch.randn(4, 6, 8), _mask())
    explanation = torch._dynamo.explain(net)(*args)
    assert explanation.graph_break_count == 0, [str(b.reason) for b in explanation.break_reasons]
    assert explanation.graph_count == 1


def _train_steps(net: nn.Module, data, steps: int) -> list[float]:
    opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for i in range(steps):
        x, y = data[i % len(data)]
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.detach())
    return losses


def _compiled_vs_eager(norm: str, dtype: torch.dtype, backend: str, steps: int = 20):
    torch._dynamo.reset()
    torch.manual_seed(0)
    eager = _cnn(norm).to(dtype)
    compiled_net = _cnn(norm).to(dtype)
    compiled_net.load_state_dict(eager.state_dict())
    g = torch.Generator().manual_seed(1)
    data = [
        (torch.randn(8, 3, 8, 8, generator=g, dtype=dtype), torch.randint(0, 3, (8,), generator=g)) for _ in range(4)
    ]
    losses_eager = _train_steps(eager, data, steps)
    losses_compiled = _train_steps(torch.compile(compiled_net, backend=backend), data, steps)
    return eager, compiled_net, torch.stack(losses_eager), torch.stack(losses_compiled)


@pytest.mark.parametrize("norm", ["batchnorm", "layernorm", "groupnorm", "batchrenorm", "ghostbatchnorm"])
def test_compiled_training_equals_eager_float64(norm):
    """20 SGD steps under torch.compile (dynamo + AOTAutograd) give eager's losses and running buffers."""
    eager, comp, l_eager, l_comp = _compiled_vs_eager(norm, torch.float64, backend="aot_eager")
    torch.testing.assert_close(l_comp, l_eager, rtol=1e-10, atol=1e-10)
    for (name, b_eager), b_comp in zip(eager.named_buffers(), comp.buffers()):
        torch.testing.assert_close(b_comp, b_eager, rtol=1e-10, atol=1e-10, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("norm", ["batchnorm", "layernorm", "groupnorm"])
def test_inductor_training_equals_eager(norm, dtype, tol):
    """The same with the default inductor backend (slow: it generates and compiles C++)."""
    eager, comp, l_eager, l_comp = _compiled_vs_eager(norm, dtype, backend="inductor")
    torch.testing.assert_close(l_comp, l_eager, rtol=tol, atol=tol)
    for b_eager, b_comp in zip(eager.buffers(), comp.buffers()):
        torch.testing.assert_close(b_comp, b_eager, rtol=tol, atol=tol)


class _FeaturesLastBatchNorm(nn.BatchNorm1d):
    """torch.nn's BatchNorm over the last axis: the oracle of ``normlab.BatchNorm(c, feature_dim=-1)``."""

    def forward(self, x):
        return super().forward(x.movedim(-1, 1)).movedim(1, -1)


COMPILED_CASES = {  # id: (normlab layer, the torch.nn layer, input shape, channels-last input)
    "batchnorm2d": (lambda: normlab.BatchNorm2d(3), lambda: nn.BatchNorm2d(3), (6, 3, 4, 5), False),
    "batchnorm2d-channels-last": (lambda: normlab.BatchNorm2d(3), lambda: nn.BatchNorm2d(3), (6, 3, 4, 5), True),
    "batchnorm2d-no-affine": (
        lambda: normlab.BatchNorm2d(3, affine=False),
        lambda: nn.BatchNorm2d(3, affine=False),
        (6, 3, 4, 5),
        False,
    ),
    "batchnorm1d": (lambda: normlab.BatchNorm1d(3), lambda: nn.BatchNorm1d(3), (8, 3), False),
    "batchnorm-features-last": (
        lambda: normlab.BatchNorm(3, feature_dim=-1),
        lambda: _FeaturesLastBatchNorm(3),
        (4, 5, 3),
        False,
    ),
    "groupnorm": (lambda: normlab.GroupNorm(2, 4), lambda: nn.GroupNorm(2, 4), (3, 4, 5, 5), False),
    "groupnorm-no-affine": (
        lambda: normlab.GroupNorm(2, 4, affine=False),
        lambda: nn.GroupNorm(2, 4, affine=False),
        (3, 4, 5, 5),
        False,
    ),
    "layernorm": (lambda: normlab.LayerNorm((4, 5)), lambda: nn.LayerNorm((4, 5)), (3, 6, 4, 5), False),
    "layernorm-no-bias": (
        lambda: normlab.LayerNorm(5, bias=False),
        lambda: nn.LayerNorm(5, bias=False),
        (3, 6, 5),
        False,
    ),
    "rmsnorm": (lambda: normlab.RMSNorm(5), lambda: nn.RMSNorm(5), (3, 6, 5), False),
    "instancenorm2d-tracked": (
        lambda: normlab.InstanceNorm2d(3, affine=True, track_running_stats=True),
        lambda: nn.InstanceNorm2d(3, affine=True, track_running_stats=True),
        (4, 3, 5, 5),
        False,
    ),
}


@pytest.mark.parametrize("case", COMPILED_CASES.values(), ids=COMPILED_CASES.keys())
def test_compiled_layers_equal_torch_nns_with_gradients_and_buffers(case):
    """Compiled, each layer runs its formulas in tensor ops with the analytic backward: torch.nn's outputs,
    input and parameter gradients and running buffers (float64, two training steps)."""
    make_ours, make_theirs, shape, channels_last = case
    torch._dynamo.reset()
    torch.manual_seed(0)
    ours, theirs = make_ours().double(), make_theirs().double()
    with torch.no_grad():
        for p in ours.parameters():
            p.uniform_(0.5, 1.5)
    theirs.load_state_dict(ours.state_dict())
    compiled = torch.compile(ours, backend="aot_eager")
    close = {"rtol": 1e-10, "atol": 1e-10}
    for _ in range(2):  # the second step blends into the buffers the first one wrote
        x = torch.randn(shape, dtype=torch.float64) * 2 + 3
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        g = torch.randn(shape, dtype=torch.float64)
        x_ours, x_theirs = x.clone().requires_grad_(), x.clone().requires_grad_()
        y_ours, y_theirs = compiled(x_ours), theirs(x_theirs)
        torch.testing.assert_close(y_ours, y_theirs, **close)
        y_ours.backward(g)
        y_theirs.backward(g)
        torch.testing.assert_close(x_ours.grad, x_theirs.grad, **close)
        for (name, p_ours), p_theirs in zip(ours.named_parameters(), theirs.parameters()):
            torch.testing.assert_close(p_ours.grad, p_theirs.grad, **close, msg=name)
        ours.zero_grad()
        theirs.zero_grad()
    theirs_state = theirs.state_dict()
    for name, t in ours.state_dict().items():
        torch.testing.assert_close(t, theirs_state[name], **close, msg=name)


def test_compile_sees_the_norms_as_tensor_ops_and_the_update_as_the_operator():
    """What inductor fuses must be visible to it: no normlab forward operator in the traced graph, while the
    running statistics are still updated by normlab::update_running_stats_ (its guard and conventions)."""
    targets = set()

    def backend(gm, example_inputs):
        targets.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return gm.forward

    torch._dynamo.reset()
    torch.compile(_net().train(), backend=backend)(torch.randn(2, 3, 8, 8))
    assert {t for t in targets if "normlab" in t} == {"normlab.update_running_stats_.default"}


@pytest.mark.parametrize("backend", ["aot_eager", pytest.param("inductor", marks=pytest.mark.slow)])
@pytest.mark.parametrize("norm", ["batchnorm", "groupnorm", "layernorm"])
def test_compiled_float32_norms_stay_accurate_far_from_zero(norm, backend):
    """|mean| = 10^4 std: a float32 mean rounded once is off by ~10^-3 std. Compiled, the mean is summed in
    float64 and its rounding remainder subtracted too (two-pass: centre, then square), as in the eager
    kernels, so both stay within 2e-6 of torch.nn's layer in float64."""
    torch._dynamo.reset()
    torch.manual_seed(0)
    make = {
        "batchnorm": (lambda lib: lib.BatchNorm2d(8), (64, 8, 16, 16)),
        "groupnorm": (lambda lib: lib.GroupNorm(2, 8), (4, 8, 32, 32)),
        "layernorm": (lambda lib: lib.LayerNorm(1024), (8, 1024)),
    }
    layer, shape = make[norm]
    ours = layer(normlab)
    with torch.no_grad():
        for p in ours.parameters():
            p.uniform_(0.5, 1.5)
    theirs = layer(nn).double()
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(shape) + 1e4
    expected = theirs(x.double())
    for y in (torch.compile(ours, backend=backend)(x), ours(x)):
        torch.testing.assert_close(y.double(), expected, rtol=0, atol=2e-6)


# --------------------------------------------------------------------------- torch.func


def _layer_and_reference(norm: str):
    """A float64 layer in train mode (running statistics off: transforms evaluate it many times) and its formula."""
    torch.manual_seed(0)
    if norm in ("batchnorm", "batchrenorm", "ghostbatchnorm"):
        kw = {"virtual_batch_size": 3} if norm == "ghostbatchnorm" else {}
        kw |= {"r_max_warmup": (0, 0), "d_max_warmup": (0, 0)} if norm == "batchrenorm" else {}
        layer = normlab.make_norm(norm, 3, **kw).double()
        if norm == "ghostbatchnorm":
            return layer, lambda x: torch.cat([R.batch_norm(c, layer.weight, layer.bias) for c in x.split(3)])
        if norm == "batchrenorm":  # r, d clipped at the running statistics (mean 0, var 1 here)
            layer.running_var.fill_(2.0)
            return layer, None
        return layer, lambda x: R.batch_norm(x, layer.weight, layer.bias)
    layer = normlab.make_norm(norm, 3).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.uniform_(0.5, 1.5)
    if norm == "layernorm":  # channel-first: GroupNorm(1, C), statistics over (C, *spatial)
        return layer, lambda x: R.group_norm(x, 1, layer.weight, layer.bias)
    if norm == "rmsnorm":  # channel-first: uncentred GroupNorm(1, C) without bias
        return layer, lambda x: R.normalize(x, range(1, x.dim()), 1e-5, centered=False) * layer.weight.view(1, 3, 1)
    if norm == "groupnorm":
        return layer, lambda x: R.group_norm(x, layer.num_groups, layer.weight, layer.bias)
    if norm == "instancenorm":
        return layer, lambda x: R.instance_norm(x, layer.weight, layer.bias)
    raise AssertionError(norm)


FUNC_NORMS = [n for n in normlab.norm_names() if n not in ("none", "noisybatchnorm")]  # noisy: random by design


@pytest.mark.parametrize("norm", FUNC_NORMS)
def test_func_transforms_agree_with_the_reference(norm):
    layer, ref = _layer_and_reference(norm)
    x = torch.randn(6, 3, 4, dtype=torch.float64)
    v = torch.randn_like(x)
    before = {k: b.clone() for k, b in layer.named_buffers()}
    if ref is None:  # BatchRenorm: the renorm formula, r and d (constants) from the batch and running statistics

        def ref(t):
            s = t.detach()
            mu, var = s.mean((0, 2)), s.var((0, 2), unbiased=False)
            sigma = torch.sqrt(layer.running_var + layer.eps)
            r = (torch.sqrt(var + layer.eps) / sigma).clamp(1 / 3, 3)
            d = ((mu - layer.running_mean) / sigma).clamp(-5, 5)
            return R.batch_norm(t) * (layer.weight * r).view(1, 3, 1) + (layer.weight * d + layer.bias).view(1, 3, 1)

    def f(t):
        return (layer(t) * torch.linspace(-1, 1, t.numel(), dtype=t.dtype).view(t.shape)).square().sum()

    def f_ref(t):
        return (ref(t) * torch.linspace(-1, 1, t.numel(), dtype=t.dtype).view(t.shape)).square().sum()

    close = {"rtol": 1e-9, "atol": 1e-10}
    torch.testing.assert_close(grad(f)(x), grad(f_ref)(x), **close)
    torch.testing.assert_close(jacrev(layer)(x), jacrev(ref)(x), **close)
    torch.testing.assert_close(jvp(layer, (x,), (v,))[1], jvp(ref, (x,), (v,))[1], **close)
    torch.testing.assert_close(hessian(f)(x), hessian(f_ref)(x), **close)
    xs = torch.randn(5, 6, 3, 4, dtype=torch.float64)  # per-sample gradients: 5 independent batches
    torch.testing.assert_close(vmap(grad(f))(xs), vmap(grad(f_ref))(xs), **close)
    for k, b in layer.named_buffers():  # a transform evaluates the function many times: no buffer updates
        assert torch.equal(b, before[k]), k


def test_per_sample_parameter_gradients_through_layernorm():
    """vmap(grad) over functional_call: the per-sample weight gradients are those of one-sample batches."""
    torch.manual_seed(0)
    ln = normlab.LayerNorm(5).double()
    with torch.no_grad():
        ln.weight.uniform_(0.5, 1.5)
    params = {k: v.detach() for k, v in ln.named_parameters()}
    xs = torch.randn(7, 5, dtype=torch.float64)

    def loss(p, x):
        return functional_call(ln, p, (x,)).pow(3).sum()

    per_sample = vmap(grad(loss), in_dims=(None, 0))(params, xs)
    for i in range(7):
        xr = xs[i].clone()
        w = ln.weight.detach().clone().requires_grad_()
        b = ln.bias.detach().clone().requires_grad_()
        gw, gb = torch.autograd.grad(R.layer_norm(xr, (5,), w, b).pow(3).sum(), (w, b))
        torch.testing.assert_close(per_sample["weight"][i], gw)
        torch.testing.assert_close(per_sample["bias"][i], gb)


# --------------------------------------------------------------------------- export and ONNX


class _Net(nn.Module):
    """Conv -> BatchNorm2d -> ReLU -> GroupNorm -> (N, H, W, C) -> LayerNorm: every kind of normlab kernel."""

    def __init__(self, norms=normlab) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn = norms.BatchNorm2d(4)
        self.relu = nn.ReLU()
        self.gn = norms.GroupNorm(2, 4)
        self.ln = norms.LayerNorm(4)

    def forward(self, x):
        return self.ln(self.gn(self.relu(self.bn(self.conv(x)))).permute(0, 2, 3, 1))


def _net(norms=normlab) -> nn.Module:
    torch.manual_seed(0)
    net = _Net(norms)
    with torch.no_grad():
        net.bn.weight.uniform_(0.5, 1.5)
        net.bn.bias.uniform_(-0.5, 0.5)
        net.bn.running_mean.uniform_(-1, 1)
        net.bn.running_var.uniform_(0.5, 2.0)
    return net


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_torch_export_runs_like_eager(mode):
    net = _net()
    net.train(mode == "train")
    x = torch.randn(2, 3, 8, 8)
    program = torch.export.export(net, (x,))
    targets = {str(n.target) for n in program.graph.nodes if n.op == "call_function"}
    assert any("normlab" in t for t in targets)  # normlab's operators, not a decomposition
    exported = program.module()
    ref = _net()
    ref.train(mode == "train")
    torch.testing.assert_close(exported(x), ref(x))
    if mode == "train":  # the exported program updates the running statistics as the module does
        torch.testing.assert_close(exported.bn.running_mean, ref.bn.running_mean)
        torch.testing.assert_close(exported.bn.running_var, ref.bn.running_var)


def test_onnx_export_has_torch_nns_nodes_and_runs_in_onnxruntime():
    onnx = pytest.importorskip("onnx", reason="onnx is in the dev extra")
    ort = pytest.importorskip("onnxruntime", reason="onnxruntime is in the dev extra")
    pytest.importorskip("onnxscript", reason="torch.onnx.export(dynamo=True) needs onnxscript (dev extra)")
    x = torch.randn(2, 3, 8, 8)

    def export(net):
        program = torch.onnx.export(net.eval(), (x,), dynamo=True, verbose=False)
        return program.model_proto

    ours, theirs = export(_net()), export(_net(nn))
    kinds = sorted(n.op_type for n in ours.graph.node)
    assert kinds == sorted(n.op_type for n in theirs.graph.node)  # the very nodes torch.nn's layers give
    assert "LayerNormalization" in kinds and not any("normlab" in n.domain for n in ours.graph.node)
    onnx.checker.check_model(ours)
    session = ort.InferenceSession(ours.SerializeToString(), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), _net().eval()(x), rtol=1e-4, atol=1e-5)


# --------------------------------------------------------------------------- standard tools


def test_swa_update_bn_updates_normlab_buffers_as_torch_nns():
    data = [torch.randn(8, 3) * 3 + 1 for _ in range(4)]
    nets = []
    for norms in (normlab, nn):
        torch.manual_seed(0)
        net = nn.Sequential(nn.Linear(3, 4), norms.BatchNorm1d(4))
        torch.optim.swa_utils.update_bn(data, net)
        nets.append(net)
    ours, theirs = nets
    assert int(ours[1].num_batches_tracked) == 4
    torch.testing.assert_close(ours[1].running_mean, theirs[1].running_mean)
    torch.testing.assert_close(ours[1].running_var, theirs[1].running_var)
    assert ours[1].momentum == 0.1  # update_bn restores what it changed


def test_convert_sync_batchnorm_converts_normlab_layers():
    net = nn.Sequential(nn.Conv2d(3, 4, 3), normlab.BatchNorm2d(4), normlab.BatchRenorm(4))
    weight = net[1].weight
    out = nn.SyncBatchNorm.convert_sync_batchnorm(net)
    assert type(out[1]) is nn.SyncBatchNorm and type(out[2]) is nn.SyncBatchNorm
    torch.testing.assert_close(out[1].weight, weight)
    # normlab's own conversion keeps normlab's layer (synchronised on any backend, gloo included)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), normlab.BatchNorm2d(4))
    assert type(normlab.convert_sync_batchnorm(net)[1]) is normlab.SyncBatchNorm
    # a _BatchNorm, but not an nn.SyncBatchNorm: DDP refuses those on the CPU, where normlab's one works
    assert isinstance(net[1], _BatchNorm) and not isinstance(net[1], nn.SyncBatchNorm)


def test_fx_symbolic_trace_traces_every_norm():
    net = nn.Sequential(
        nn.Conv2d(3, 4, 3),
        normlab.BatchNorm2d(4),
        normlab.GroupNorm(2, 4),
        normlab.InstanceNorm2d(4, affine=True),
        normlab.BatchNorm(4),
        normlab.LayerNorm([4, 6, 6]),
        normlab.RMSNorm(6),
    ).eval()
    traced = torch.fx.symbolic_trace(net)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(traced(x), net(x))


def test_fuse_modules_fuses_conv_bn_relu_in_eval():
    x = torch.randn(2, 3, 8, 8)
    fused = {}
    for norms in (normlab, nn):
        net = _net(norms).eval()
        fused[norms] = torch.ao.quantization.fuse_modules(
            net,
            [["conv", "bn", "relu"]],
            fuse_custom_config_dict={"additional_fuser_method_mapping": normlab.fuser_method_mapping()},
        )
        assert type(fused[norms].conv).__name__ == "ConvReLU2d" and isinstance(fused[norms].bn, nn.Identity)
        torch.testing.assert_close(fused[norms](x), net(x), rtol=1e-5, atol=1e-5)


def test_jit_script_of_an_eval_model():
    net = _net().eval()
    scripted = torch.jit.script(net)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(scripted(x), net(x))
    model = _cnn("batchnorm").eval()  # the lab's CNN: normlab.BatchNorm (any rank, feature_dim=1)
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(torch.jit.script(model)(x), model(x))


@pytest.mark.parametrize("name, args", [("GroupNorm", (2, 4)), ("InstanceNorm2d", (4,)), ("BatchNorm2d", (4,))])
def test_memory_format_of_the_output_is_torch_nns(name, args):
    """GroupNorm and BatchNorm keep a channels-last input's layout; InstanceNorm2d, like torch.nn's, does not."""
    x = torch.randn(2, 4, 5, 5).contiguous(memory_format=torch.channels_last)
    ours, theirs = getattr(normlab, name)(*args)(x), getattr(nn, name)(*args)(x)
    for fmt in (torch.channels_last, torch.contiguous_format):
        assert ours.is_contiguous(memory_format=fmt) == theirs.is_contiguous(memory_format=fmt)
    assert name == "InstanceNorm2d" or ours.is_contiguous(memory_format=torch.channels_last)


# --------------------------------------------------------------------------- the operators themselves


def _op_samples():
    g = torch.Generator().manual_seed(0)

    def t(*shape, grad=True):
        return torch.randn(shape, generator=g, dtype=torch.float64).requires_grad_(grad)

    x3, w, b = t(4, 3, 5), t(3), t(3)
    y3, mean, var, invstd = torch.ops.normlab.batch_norm_fwd(x3.detach(), w.detach(), b.detach(), 1e-5)
    x, wr, br = t(4, 2, 3, 5), t(1, 2, 3, 1), t(1, 2, 3, 1)
    _, rmean, _, rinv = torch.ops.normlab.row_norm_fwd(x.detach(), wr.detach(), br.detach(), 1e-5, 2, True)
    running = [torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)]
    counters = [torch.tensor(0), torch.tensor(0)]
    count = torch.tensor(20.0, dtype=torch.float64)
    return [
        (torch.ops.normlab.batch_norm_fwd.default, (x3, w, b, 1e-5)),
        (torch.ops.normlab.batch_norm_fwd.default, (x3, None, None, 1e-3)),
        (
            torch.ops.normlab.batch_norm_bwd.default,
            (t(4, 3, 5, grad=False), x3.detach(), mean, invstd, w.detach(), [True, True, True]),
        ),
        (torch.ops.normlab.row_norm_fwd.default, (x, wr, br, 1e-5, 2, True)),
        (torch.ops.normlab.row_norm_fwd.default, (x, wr, None, 1e-5, 2, False)),
        (
            torch.ops.normlab.row_norm_bwd.default,
            (t(4, 2, 3, 5, grad=False), x.detach(), rmean, rinv, wr.detach(), br.detach(), 2, True, [True, True, True]),
        ),
        (
            torch.ops.normlab.update_running_stats_.default,
            (*running, *counters, mean, var, count, 0.1, False, False, True, "opcheck"),
        ),
    ]


@pytest.mark.parametrize(
    "op, args", _op_samples(), ids=lambda v: str(v) if isinstance(v, torch._ops.OpOverload) else ""
)
def test_operators_pass_torch_library_opcheck(op, args):
    """Schema (mutations declared), fake kernel, autograd registration and AOT dispatch, by PyTorch's own checker."""
    torch.library.opcheck(op, args)


def test_operator_path_equals_eager_path_with_gradients():
    """The dispatcher path (what compile/export trace) and the eager CPU path compute the same, twice differentiable."""
    from normlab import _ops

    g = torch.Generator().manual_seed(3)
    x3 = torch.randn(5, 3, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.rand(3, generator=g, dtype=torch.float64).add_(0.5).requires_grad_()
    b = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    torch.autograd.gradcheck(lambda *a: _ops.batch_norm_fwd(*a, 1e-5)[0], (x3, w, b))
    torch.autograd.gradgradcheck(lambda *a: _ops.batch_norm_fwd(*a, 1e-5)[0], (x3, w, b))
    y_op = _ops.batch_norm_fwd(x3, w, b, 1e-5)[0]
    y_eager = _ops._EagerBatchNorm.apply(x3, w, b, 1e-5)[0]
    torch.testing.assert_close(y_op, y_eager, rtol=0, atol=0)
    xr = torch.randn(4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    wr = torch.rand(1, 6, generator=g, dtype=torch.float64).add_(0.5).requires_grad_()
    torch.autograd.gradcheck(lambda *a: _ops.row_norm_fwd(*a, None, 1e-5, 1, True)[0], (xr, wr))
    torch.autograd.gradgradcheck(lambda *a: _ops.row_norm_fwd(*a, None, 1e-5, 1, False)[0], (xr, wr))
