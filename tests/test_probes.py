"""normlab.lab.probes: Hessian, landscape and layer-input statistics against closed forms."""

import math

import numpy as np
import pytest
import torch
from torch import nn

import normlab
from normlab.lab import probes

F64 = torch.float64


# --------------------------------------------------------------------------- helpers


class Quadratic(nn.Module):
    """Parameters w (n,), loss 1/2 w^T A w: gradient A w, Hessian A."""

    def __init__(self, w: torch.Tensor):
        super().__init__()
        self.w = nn.Parameter(w.clone())


def orthogonal(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, r = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=F64))
    return q * torch.sign(torch.diagonal(r))  # (n, n) Haar-distributed


def spectrum_matrix(eigs, seed=0):
    eigs = torch.as_tensor(eigs, dtype=F64)
    q = orthogonal(len(eigs), seed)
    return q @ torch.diag(eigs) @ q.T, q


def quad_loss(m: Quadratic, a: torch.Tensor):
    return lambda: 0.5 * m.w @ a @ m.w


# --------------------------------------------------------------------------- Hessian


def test_top_eigenvalues_of_quadratic_with_known_spectrum():
    eigs = [12.0, -9.0, 6.0, 3.0] + [0.5 - 0.02 * i for i in range(26)]
    a, q = spectrum_matrix(eigs, seed=1)
    m = Quadratic(torch.randn(30, dtype=F64))
    r = probes.hessian_eigenvalues(m, quad_loss(m, a), mode="train", k=3, tol=1e-13, max_iter=2000, return_vectors=True)
    assert r.converged == [True, True, True]
    # power iteration with deflation: largest magnitude first, sign kept
    np.testing.assert_allclose(r.eigenvalues, [12.0, -9.0, 6.0], rtol=1e-9)
    for j, u in enumerate(r.eigenvectors):
        assert abs(float(u[0] @ q[:, j])) == pytest.approx(1.0, abs=1e-6)


def test_top_eigenvalue_is_seeded_and_reports_non_convergence():
    a, _ = spectrum_matrix([5.0, 4.99, 1.0, 0.5], seed=2)
    m = Quadratic(torch.randn(4, dtype=F64))
    r1 = probes.hessian_eigenvalues(m, quad_loss(m, a), mode="eval", tol=1e-14, max_iter=3, seed=7)
    r2 = probes.hessian_eigenvalues(m, quad_loss(m, a), mode="eval", tol=1e-14, max_iter=3, seed=7)
    assert r1.eigenvalues == r2.eigenvalues and r1.converged == [False] and r1.iterations == [3]


def test_hutchinson_trace_of_quadratic():
    # diagonal Hessian: every Rademacher sample v^T A v equals the trace exactly
    d = torch.tensor([3.0, -1.0, 0.25, 7.0, 2.0], dtype=F64)
    m = Quadratic(torch.randn(5, dtype=F64))
    t = probes.hessian_trace(m, quad_loss(m, torch.diag(d)), mode="train", num_samples=5)
    assert t.samples == pytest.approx([float(d.sum())] * 5, abs=1e-12) and t.stderr == pytest.approx(0.0, abs=1e-12)
    # full Hessian: unbiased, with the known variance 2 (|A|_F^2 - sum_i A_ii^2) per sample
    eigs = torch.linspace(-2, 5, 20, dtype=F64)
    a, _ = spectrum_matrix(eigs, seed=3)
    m = Quadratic(torch.randn(20, dtype=F64))
    t = probes.hessian_trace(m, quad_loss(m, a), mode="train", num_samples=400, seed=1)
    sd_theory = math.sqrt(2 * (float((a**2).sum()) - float((torch.diagonal(a) ** 2).sum())) / 400)
    assert t.stderr == pytest.approx(sd_theory, rel=0.2)
    assert abs(t.trace - float(eigs.sum())) < 4 * sd_theory
    assert probes.hessian_trace(m, quad_loss(m, a), mode="train", num_samples=400, seed=1).samples == t.samples


def test_hessian_of_a_parameter_subset_is_the_diagonal_block():
    a, _ = spectrum_matrix([9.0, 4.0, 2.0, 1.0, 0.5, 0.1], seed=4)

    class Two(nn.Module):
        def __init__(self):
            super().__init__()
            self.u = nn.Parameter(torch.randn(3, dtype=F64))
            self.v = nn.Parameter(torch.randn(3, dtype=F64))

    m = Two()

    def loss():
        w = torch.cat([m.u, m.v])
        return 0.5 * w @ a @ w

    block = a[:3, :3]
    r = probes.hessian_eigenvalues(m, loss, mode="train", k=1, params=[m.u], tol=1e-13, max_iter=2000)
    assert r.params == ["u"]
    lam = torch.linalg.eigvalsh(block)
    assert r.eigenvalues[0] == pytest.approx(float(lam[lam.abs().argmax()]), rel=1e-9)
    t = probes.hessian_trace(m, loss, mode="train", params=["u"], num_samples=50)
    assert abs(t.trace - float(torch.trace(block))) < 5 * t.stderr + 1e-12
    hv = probes.hessian_vector_product(m, loss, mode="train", params=["v"], vector={"v": torch.ones(3, dtype=F64)})
    torch.testing.assert_close(hv[0], a[3:, 3:] @ torch.ones(3, dtype=F64))


def _bn_mlp(norm):
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(4, 6), norm(6), nn.Tanh(), nn.Linear(6, 3)).double()


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")  # inside torch.func.jvp
@pytest.mark.parametrize("mode", ["train", "eval"])
def test_hvp_through_normlab_batchnorm_equals_torch_double_backward(mode):
    ours, ref = _bn_mlp(normlab.BatchNorm1d), _bn_mlp(nn.BatchNorm1d)
    with torch.no_grad():  # non-trivial affine and running statistics, identical in both
        for m in (ours, ref):
            m[1].weight.copy_(torch.linspace(0.5, 1.5, 6))
            m[1].bias.copy_(torch.linspace(-0.3, 0.4, 6))
            m[1].running_mean.copy_(torch.linspace(-1, 1, 6))
            m[1].running_var.copy_(torch.linspace(0.5, 2, 6))
    x = torch.randn(16, 4, dtype=F64) * 2 + 0.5
    y = torch.randint(0, 3, (16,))
    names = [n for n, _ in ref.named_parameters()]
    gen = torch.Generator().manual_seed(0)
    v = [torch.randn(p.shape, generator=gen, dtype=F64) for p in ref.parameters()]
    hv_ours = probes.hessian_vector_product(ours, nn.functional.cross_entropy, (x, y), vector=v, mode=mode)
    hv_torch_model = probes.hessian_vector_product(ref, nn.functional.cross_entropy, (x, y), vector=v, mode=mode)

    # independent reference: torch's own double backward on a functional form of the torch.nn model
    ref.train(mode == "train")
    buffers = {n: b.clone() for n, b in ref.named_buffers()}

    def f(*ps):
        out = torch.func.functional_call(
            ref, ({**dict(zip(names, ps))}, {k: b.clone() for k, b in buffers.items()}), (x,)
        )
        return nn.functional.cross_entropy(out, y)

    _, hv_ref = torch.autograd.functional.hvp(f, tuple(p.detach() for p in ref.parameters()), tuple(v))
    assert sum(float(h.norm()) for h in hv_ref) > 1e-3  # non-trivial
    for a, b, c in zip(hv_ours, hv_torch_model, hv_ref):
        torch.testing.assert_close(a, c, rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(b, c, rtol=1e-9, atol=1e-11)
    if mode == "eval":  # and torch.func's forward-over-reverse HVP (no buffer mutation in eval)
        params = {n: p.detach() for n, p in ref.named_parameters()}
        grad_fn = torch.func.grad(
            lambda p: nn.functional.cross_entropy(torch.func.functional_call(ref, (p, buffers), (x,)), y)
        )
        _, hv_func = torch.func.jvp(grad_fn, (params,), (dict(zip(names, v)),))
        for n, a in zip(names, hv_ours):
            torch.testing.assert_close(a, hv_func[n], rtol=1e-9, atol=1e-11)


def test_hessian_depends_on_bn_mode():
    m = _bn_mlp(normlab.BatchNorm1d)
    x, y = torch.randn(16, 4, dtype=F64), torch.randint(0, 3, (16,))
    tr = probes.hessian_eigenvalues(m, nn.functional.cross_entropy, (x, y), mode="train", max_iter=50)
    ev = probes.hessian_eigenvalues(m, nn.functional.cross_entropy, (x, y), mode="eval", max_iter=50)
    assert tr.eigenvalues[0] != pytest.approx(ev.eigenvalues[0], rel=1e-3)


# --------------------------------------------------------------------------- landscape


def test_gradient_landscape_on_quadratic_matches_closed_forms():
    eigs = torch.tensor([8.0, 5.0, 2.0, 1.0, 0.5, 0.25], dtype=F64)
    a, q = spectrum_matrix(eigs, seed=6)
    w = torch.randn(6, dtype=F64)
    m = Quadratic(w)
    etas = [0.01, 0.05, 0.1, 0.3]
    r = probes.gradient_landscape(m, quad_loss(m, a), mode="train", etas=etas)
    g = a @ w
    gg, gag = float(g @ g), float(g @ a @ g)
    loss0 = 0.5 * float(w @ a @ w)
    # L(w - eta g) = L(w) - eta |g|^2 + eta^2 / 2 g^T A g
    np.testing.assert_allclose(r.loss, [loss0 - e * gg + 0.5 * e * e * gag for e in etas], rtol=1e-12)
    # grad L(w) - grad L(w - eta g) = eta A g
    np.testing.assert_allclose(r.grad_change, [e * float((a @ g).norm()) for e in etas], rtol=1e-12)
    # Santurkar's effective beta: |A g| / |g| at every eta, between the Rayleigh quotient and lambda_max
    beta = float((a @ g).norm()) / math.sqrt(gg)
    assert r.beta_eff == pytest.approx(beta, rel=1e-12)
    # the curvature along g is the Rayleigh quotient g^T A g / g^T g
    np.testing.assert_allclose(r.curvature, gag / gg, rtol=1e-10)
    assert gag / gg <= beta <= 8.0
    assert r.loss0 == pytest.approx(loss0) and r.grad_norm == pytest.approx(math.sqrt(gg))
    # at an eigenvector both equal the eigenvalue
    m2 = Quadratic(q[:, 1].clone())
    r2 = probes.gradient_landscape(m2, quad_loss(m2, a), mode="eval", etas=etas)
    assert r2.beta_eff == pytest.approx(5.0, rel=1e-10)
    np.testing.assert_allclose(r2.curvature, 5.0, rtol=1e-10)


def test_loss_slices_on_quadratic_match_closed_forms():
    a, _ = spectrum_matrix([4.0, 2.0, 1.0, -0.5], seed=7)
    w = torch.randn(4, dtype=F64)
    m = Quadratic(w)
    d1, d2 = torch.randn(4, dtype=F64), torch.randn(4, dtype=F64)
    alphas, betas = np.linspace(-1, 1, 5), np.linspace(-0.5, 0.5, 3)
    L = lambda v: 0.5 * float(v @ a @ v)  # noqa: E731
    s1 = probes.loss_slice_1d(m, quad_loss(m, a), mode="train", alphas=alphas, direction={"w": d1})
    np.testing.assert_allclose(s1.loss, [L(w + al * d1) for al in alphas], rtol=1e-12)
    s2 = probes.loss_slice_2d(
        m, quad_loss(m, a), mode="train", alphas=alphas, betas=betas, directions=({"w": d1}, {"w": d2})
    )
    assert s2.loss.shape == (5, 3)
    np.testing.assert_allclose(s2.loss, [[L(w + al * d1 + be * d2) for be in betas] for al in alphas], rtol=1e-12)
    assert s2.loss0 == pytest.approx(L(w))


def test_random_direction_is_filter_normalised_and_seeded():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Conv2d(3, 5, 3), normlab.BatchNorm2d(5), nn.Flatten(), nn.Linear(5 * 4 * 4, 7))
    d = probes.random_direction(m, seed=3)
    for name, p in m.named_parameters():
        if p.dim() > 1:  # every filter (output unit / channel) has the norm of the weight's filter
            torch.testing.assert_close(d[name].flatten(1).norm(dim=1), p.detach().flatten(1).norm(dim=1))
        else:  # biases and BN's scale/shift stay fixed (Li et al.'s ignore='biasbn')
            assert torch.count_nonzero(d[name]) == 0
    d_again, d_other = probes.random_direction(m, seed=3), probes.random_direction(m, seed=4)
    assert all(torch.equal(d[n], d_again[n]) for n in d)
    assert not torch.equal(d["0.weight"], d_other["0.weight"])
    d_keep = probes.random_direction(m, seed=3, ignore_1d=False)
    assert torch.equal(d_keep["1.weight"], m[1].weight.detach())
    x = torch.randn(8, 3, 6, 6)
    s = probes.loss_slice_2d(
        m, lambda out, y: out.pow(2).mean(), (x, x), mode="train", alphas=[-0.5, 0, 0.5], betas=[0, 1], seed=3
    )
    assert s.loss[1, 0] == pytest.approx(s.loss0, rel=1e-6) and np.all(np.isfinite(s.loss))


# --------------------------------------------------------------------------- layer-input statistics


def exact_data(n: int, mean, cov, seed: int = 0) -> torch.Tensor:
    """Rows (n, D) whose sample mean and biased sample covariance are exactly ``mean`` and ``cov``."""
    mean, cov = torch.as_tensor(mean, dtype=F64), torch.as_tensor(cov, dtype=F64)
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, mean.numel(), generator=g, dtype=F64)
    z = z - z.mean(0)
    q, _ = torch.linalg.qr(z)  # centred orthonormal columns
    return mean + math.sqrt(n) * q @ torch.linalg.cholesky(cov).T


def _linear_stats(x: torch.Tensor, mode="train"):
    lin = nn.Linear(x.shape[1], 2).double()
    return probes.layer_input_stats(lin, x, mode=mode)[""]


def test_centering_optimum_equals_the_mean_for_uncorrelated_features():
    mu = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0], dtype=F64)
    var = torch.tensor([1.0, 2.0, 0.5, 3.0, 1.5], dtype=F64)
    x = exact_data(200, mu, torch.diag(var))
    st = _linear_stats(x)
    torch.testing.assert_close(st.mean, mu)
    torch.testing.assert_close(st.var, var)
    # closed form for diagonal C: |C + d d^T|_1 = tr C + (sum_i |d_i|)^2, d = E[x] - s
    assert st.covariance_l1 == pytest.approx(float(var.sum()), rel=1e-10)
    assert st.second_moment_l1 - st.covariance_l1 == pytest.approx(float(mu.abs().sum()) ** 2, rel=1e-10)
    assert st.second_moment_fro > st.covariance_fro and st.second_moment_spectral > st.covariance_spectral
    opt = st.optimal_shift()  # found by minimising over s, not seeded at E[x]
    torch.testing.assert_close(opt.shift, mu, atol=1e-4, rtol=0)
    assert opt.gap == pytest.approx(0.0, abs=1e-8) and opt.at_zero == pytest.approx(st.second_moment_l1)
    # and a brute check: no random shift does better than the mean
    for s in torch.randn(200, 5, dtype=F64) * 2:
        assert st.shift_objective(s) >= st.covariance_l1 - 1e-12


def test_centering_attains_the_minimum_for_positively_correlated_features():
    cov = 0.5 * torch.eye(4, dtype=F64) + 0.5  # correlation 1/2 between all features
    mu = torch.tensor([2.0, 1.0, -1.0, 0.5], dtype=F64)
    st = _linear_stats(exact_data(100, mu, cov, seed=1))
    assert st.second_moment_l1 > st.covariance_l1
    opt = st.optimal_shift()
    assert opt.gap == pytest.approx(0.0, abs=1e-7)  # the mean attains the minimum (which need not be unique)


def test_entrywise_l1_centering_is_not_always_optimal():
    """Three features with pairwise correlation -0.4: for the entrywise L1 norm the shift 0 (E[x x^T]) beats
    centring, 4.2 < 5.4, while the Frobenius and spectral norms are still smallest at the mean."""
    cov = 1.4 * torch.eye(3, dtype=F64) - 0.4
    mu = torch.full((3,), math.sqrt(0.4), dtype=F64)  # C + mu mu^T has zero off-diagonal entries
    st = _linear_stats(exact_data(60, mu, cov, seed=2))
    assert st.covariance_l1 == pytest.approx(5.4) and st.second_moment_l1 == pytest.approx(4.2)
    opt = st.optimal_shift()
    assert opt.objective <= 4.2 + 1e-6 and opt.gap >= 1.2 - 1e-6
    assert st.second_moment_fro >= st.covariance_fro and st.second_moment_spectral >= st.covariance_spectral - 1e-12


def test_layer_input_stats_conv_channels_over_batch_and_space_merged_over_batches():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 4 * 4, 2))
    xs = [torch.randn(5, 3, 6, 6) * 3 + 2, torch.randn(7, 3, 6, 6) - 1]
    st = probes.layer_input_stats(model, xs, mode="eval")
    assert list(st) == ["0", "3"] and st["0"].kind == "conv" and st["3"].kind == "linear"
    rows = torch.cat([x.permute(0, 2, 3, 1).reshape(-1, 3) for x in xs]).double()  # (N*H*W, C)
    assert st["0"].count == rows.shape[0] == 12 * 36
    torch.testing.assert_close(st["0"].mean, rows.mean(0))
    torch.testing.assert_close(st["0"].var, rows.var(0, unbiased=False))
    torch.testing.assert_close(st["0"].covariance, torch.cov(rows.T, correction=0))
    torch.testing.assert_close(st["0"].second_moment(), rows.T @ rows / rows.shape[0])
    assert st["0"].second_moment_l1 == pytest.approx(float((rows.T @ rows / rows.shape[0]).abs().sum()))
    feats = torch.cat([model[:3](x) for x in xs]).double()
    torch.testing.assert_close(st["3"].mean, feats.mean(0))
    d = st["0"].as_dict()
    assert d["covariance_l1"] == pytest.approx(st["0"].covariance_l1)
    assert probes.input_moments(model, xs, mode="eval")["0"].covariance is None


def test_distribution_shift_between_two_measurements():
    lin = nn.Linear(3, 1)
    x = torch.randn(64, 3)
    c = torch.tensor([0.3, -0.6, 0.0])
    before = probes.input_moments(lin, x, mode="train")
    after = probes.input_moments(lin, x * 2 + c, mode="train")
    sh = probes.distribution_shift(before, after)[""]
    dm = after[""].mean - before[""].mean
    torch.testing.assert_close(after[""].mean, 2 * before[""].mean + c.double())
    assert sh["mean_shift"] == pytest.approx(float(dm.pow(2).mean().sqrt()))
    assert sh["log_var_shift"] == pytest.approx(math.log(4), rel=1e-6)  # variance x4 in every feature


class Block(nn.Module):
    """out = x + alpha * branch(x), branch = Linear -> BatchNorm (no affine)."""

    def __init__(self, width, alpha=1.0):
        super().__init__()
        self.branch = nn.Sequential(nn.Linear(width, width, bias=False), normlab.BatchNorm1d(width, affine=False))
        self.alpha = alpha

    def forward(self, x):
        return x + self.alpha * self.branch(x)


def test_residual_stats_per_block_against_a_manual_forward():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 8), *[Block(8, alpha=0.5 if i == 2 else 1.0) for i in range(4)]).double()
    x = torch.randn(256, 6, dtype=F64) + 1.0
    stats = probes.residual_stats(net, x, mode="train")
    assert [s.name for s in stats] == ["1", "2", "3", "4"] and [s.depth for s in stats] == [1, 2, 3, 4]
    assert stats[2].alpha == 0.5 and stats[1].alpha == 1.0
    with torch.no_grad():
        h = net[0](x)
        for s, blk in zip(stats, net[1:]):
            b = blk.branch(h)
            out = h + blk.alpha * b
            assert s.skip_variance == pytest.approx(float(h.var(0, unbiased=False).mean()), rel=1e-10)
            assert s.skip.avg_sq_mean == pytest.approx(float(h.mean(0).pow(2).mean()), rel=1e-10)
            # train-mode BN (no affine) outputs exactly var / (var + eps) per channel
            assert s.branch_variance == pytest.approx(float((b.var(0, unbiased=False)).mean()), rel=1e-10)
            assert s.branch_variance == pytest.approx(1.0, abs=1e-3) and s.branch.avg_sq_mean < 1e-20
            assert s.output_variance == pytest.approx(float(out.var(0, unbiased=False).mean()), rel=1e-10)
            assert s.output_sq_mean == pytest.approx(float(out.mean(0).pow(2).mean()), rel=1e-10)
            h = out
    d = probes.blocks_as_arrays(stats)
    assert d["skip_variance"].shape == (4,)


def test_residual_stats_channels_of_sequences():
    blk = Block(4)
    blk.branch = nn.Sequential(nn.Linear(4, 4), normlab.BatchNorm(4, feature_dim=-1, affine=False))
    x = torch.randn(3, 10, 4) * torch.tensor([1.0, 2.0, 3.0, 4.0])  # (N, S, D)
    (s,) = probes.residual_stats(blk, x, mode="train", feature_dim=-1)
    assert s.skip.var.shape == (4,)
    torch.testing.assert_close(s.skip.var, x.reshape(-1, 4).double().var(0, unbiased=False))


def test_probe_errors_are_clear():
    m = Quadratic(torch.randn(3, dtype=F64))
    with pytest.raises(ValueError, match="mode must be 'train' or 'eval'"):
        probes.hessian_trace(m, quad_loss(m, torch.eye(3, dtype=F64)), mode="training")
    with pytest.raises(ValueError, match="scalar"):
        probes.hessian_trace(m, lambda: m.w * 2, mode="train")
    with pytest.raises(KeyError, match="no parameter named"):
        probes.hessian_trace(m, quad_loss(m, torch.eye(3, dtype=F64)), mode="train", params=["v"])
    with pytest.raises(ValueError, match="no residual blocks"):
        probes.residual_stats(nn.Linear(2, 2), torch.randn(4, 2), mode="eval")
    with pytest.raises(TypeError, match="ambiguous"):
        probes.layer_input_stats(nn.Linear(2, 2), (torch.randn(4, 2), torch.randn(4, 2)), mode="eval")
    with pytest.raises(ValueError, match="etas"):
        probes.gradient_landscape(m, quad_loss(m, torch.eye(3, dtype=F64)), mode="train", etas=[0.1, -1])


def test_residual_stats_on_normlab_resnet_blocks_with_skipinit_and_projection():
    from normlab.normfree import ResidualBlock, SkipInit

    torch.manual_seed(0)
    proj = nn.Conv2d(3, 4, 1)
    net = nn.Sequential(
        ResidualBlock(
            nn.Sequential(normlab.BatchNorm2d(3), nn.Conv2d(3, 4, 3, padding=1)), skip=proj, alpha=SkipInit(0.25)
        ),
        ResidualBlock(nn.Sequential(normlab.BatchNorm2d(4), nn.Conv2d(4, 4, 3, padding=1))),
    )
    x = torch.randn(6, 3, 5, 5)
    s1, s2 = probes.residual_stats(net, x, mode="train")
    assert s1.alpha == 0.25 and s2.alpha is None and s2.skip_output is not None  # identity skip is a module too
    with torch.no_grad():
        p = proj(x).double()
    assert s1.skip_output.avg_var == pytest.approx(float(p.var((0, 2, 3), unbiased=False).mean()), rel=1e-6)
    assert s1.skip.var.shape == (3,) and s1.branch.var.shape == (4,)
