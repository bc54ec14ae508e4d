"""Every probe leaves the model exactly as found (STYLE.md point 8).

One model with normlab BatchNorm *and* torch.nn.BatchNorm2d in train mode, a
residual block, dropout, sigmoid/tanh, a frozen parameter, set and unset
gradients, a submodule in eval mode and user hooks; every probe in both modes;
then parameters, buffers (running statistics, num_batches_tracked, the
non-persistent counters), their version counters, requires_grad flags, grads,
every submodule's mode, hooks, grad mode and the global RNG state are compared
with a snapshot taken before.
"""

import pytest
import torch
from torch import nn

import normlab
from normlab.lab import probes


class Block(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.branch = nn.Sequential(normlab.BatchNorm2d(c), nn.ReLU(), nn.Conv2d(c, c, 3, padding=1))
        self.alpha = nn.Parameter(torch.tensor(0.5))

    def forward(self, x):
        return x + self.alpha * self.branch(x)


def build():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1),
        normlab.BatchNorm2d(4),
        nn.Tanh(),
        Block(4),
        nn.BatchNorm2d(4),
        nn.Sigmoid(),
        nn.Flatten(),
        nn.Dropout(0.3),
        nn.Linear(4 * 5 * 5, 3),
    )
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    for _ in range(3):  # non-trivial running statistics, counters and optimizer state
        x, y = torch.randn(6, 3, 5, 5), torch.randint(0, 3, (6,))
        opt.zero_grad()
        nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model[0].bias.requires_grad_(False)  # a frozen parameter ...
    model[0].bias.grad = None
    model[8].bias.grad = None  # ... an unset grad, the others keep theirs
    model[4].eval()  # mixed modes: one submodule in eval while the model trains
    model.train()
    model[4].eval()
    model[3].register_forward_hook(lambda m, a, o: None)
    model[8].register_forward_pre_hook(lambda m, a: None)
    model[8].weight.register_hook(lambda g: g)
    return model, opt


def snapshot(model, opt):
    return {
        "params": {n: (p.detach().clone(), p._version, p.requires_grad) for n, p in model.named_parameters()},
        "grads": {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()},
        "buffers": {n: (b.clone(), b._version) for n, b in model.named_buffers()},
        "modes": {n: m.training for n, m in model.named_modules()},
        "hooks": {
            n: tuple(
                tuple(getattr(m, h).items())
                for h in ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
            )
            for n, m in model.named_modules()
        },
        "tensor_hooks": {n: dict(p._backward_hooks or {}) for n, p in model.named_parameters()},
        "opt": {id(k): {s: v.clone() for s, v in st.items()} for k, st in opt.state.items()},
        "opt_groups": [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups],
        "rng": torch.get_rng_state(),
        "grad_mode": torch.is_grad_enabled(),
    }


def assert_same(a, b):
    assert a["params"].keys() == b["params"].keys()
    for n in a["params"]:
        (pa, va, ra), (pb, vb, rb) = a["params"][n], b["params"][n]
        assert torch.equal(pa, pb) and va == vb and ra == rb, n
        ga, gb = a["grads"][n], b["grads"][n]
        assert (ga is None and gb is None) or torch.equal(ga, gb), n
    assert a["buffers"].keys() == b["buffers"].keys()
    for n in a["buffers"]:
        assert torch.equal(a["buffers"][n][0], b["buffers"][n][0]) and a["buffers"][n][1] == b["buffers"][n][1], n
    assert a["modes"] == b["modes"]
    assert a["hooks"] == b["hooks"] and a["tensor_hooks"] == b["tensor_hooks"]
    assert a["opt"].keys() == b["opt"].keys()
    for k in a["opt"]:
        assert all(torch.equal(a["opt"][k][s], b["opt"][k][s]) for s in a["opt"][k])
    assert a["opt_groups"] == b["opt_groups"]
    assert torch.equal(a["rng"], b["rng"]) and a["grad_mode"] == b["grad_mode"]


X = torch.randn(8, 3, 5, 5)
Y = torch.randint(0, 3, (8,))
CE = nn.functional.cross_entropy

PROBES = {
    "hessian_eigenvalues": lambda m, o, mode: probes.hessian_eigenvalues(m, CE, (X, Y), mode=mode, k=2, max_iter=3),
    "hessian_trace": lambda m, o, mode: probes.hessian_trace(m, lambda: CE(m(X), Y), mode=mode, num_samples=2),
    "hessian_vector_product": lambda m, o, mode: probes.hessian_vector_product(
        m, CE, (X, Y), mode=mode, params=["8.weight", "3.alpha"], vector=[torch.ones(3, 100), torch.ones(())]
    ),
    "gradient_landscape": lambda m, o, mode: probes.gradient_landscape(m, CE, (X, Y), mode=mode, etas=[0.1, 1.0]),
    "loss_slice_1d": lambda m, o, mode: probes.loss_slice_1d(m, CE, (X, Y), mode=mode, alphas=[-1, 1]),
    "loss_slice_2d": lambda m, o, mode: probes.loss_slice_2d(m, CE, (X, Y), mode=mode, alphas=[-1, 1], betas=[0, 1]),
    "layer_input_stats": lambda m, o, mode: probes.layer_input_stats(m, [X, X[:4]], mode=mode),
    "input_moments": lambda m, o, mode: probes.input_moments(m, [(X, Y)], mode=mode),
    "residual_stats": lambda m, o, mode: probes.residual_stats(m, X, mode=mode),
    "saturation": lambda m, o, mode: probes.saturation(m, X, mode=mode),
    "gradient_norms": lambda m, o, mode: probes.gradient_norms(m, CE, (X, Y), mode=mode),
    "internal_covariate_shift": lambda m, o, mode: probes.internal_covariate_shift(
        m, CE, (X, Y), optimizer=o, mode=mode
    ),
}


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name", sorted(PROBES))
def test_probe_leaves_the_model_exactly_as_found(name, mode):
    model, opt = build()
    before = snapshot(model, opt)
    result = PROBES[name](model, opt, mode)
    assert result is not None
    assert_same(before, snapshot(model, opt))


def test_probe_that_fails_midway_leaves_the_model_as_found():
    model, opt = build()
    before = snapshot(model, opt)
    calls = []

    def bad_loss():
        calls.append(1)
        out = model(X)
        if len(calls) > 1:
            raise RuntimeError("boom")
        return CE(out, Y)

    with pytest.raises(RuntimeError, match="boom"):
        probes.gradient_landscape(model, bad_loss, mode="eval", etas=[0.1])
    with pytest.raises(ValueError, match="no residual blocks|blocks"):
        probes.residual_stats(model[:3], X, mode="train")
    assert_same(before, snapshot(model, opt))


def test_train_mode_probe_sees_batch_statistics_and_eval_mode_running_statistics():
    model, _ = build()
    model.train()
    torch.manual_seed(1)
    x = torch.randn(8, 3, 5, 5) * 4 + 3  # far from the running statistics
    st_train = probes.layer_input_stats(model, x, mode="train", layers=["5"], covariance=False)[
        "5"
    ]  # after the torch BN
    st_eval = probes.layer_input_stats(model, x, mode="eval", layers=["5"], covariance=False)["5"]
    bn = model[4]  # train mode: per channel, mean = bias and variance = weight^2 (up to eps)
    torch.testing.assert_close(st_train.mean, bn.bias.detach().double(), atol=1e-5, rtol=0)
    torch.testing.assert_close(st_train.var, bn.weight.detach().double() ** 2, rtol=1e-3, atol=0)
    assert float((st_eval.mean - bn.bias.detach().double()).abs().max()) > 0.1
