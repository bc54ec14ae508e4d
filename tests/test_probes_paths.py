"""normlab.lab.probes.paths: the residual path-length distribution against enumeration, closed forms and simulation."""

import math

import numpy as np
import pytest

from normlab.lab import probes
from normlab.lab.probes import paths as P


def stirling_first_kind(n: int) -> list[int]:
    """Unsigned c(n, k), k = 0..n: coefficients of z (z + 1) ... (z + n - 1)."""
    c = [1]
    for i in range(n):
        nxt = [0] * (len(c) + 1)
        for k, v in enumerate(c):
            nxt[k] += i * v
            nxt[k + 1] += v
        c = nxt
    return c


@pytest.mark.parametrize("d", [1, 2, 5, 100, 10_000])
def test_distribution_sums_to_one_and_is_a_distribution(d):
    dist = probes.bn_path_distribution(d)
    assert dist.shape == (d + 1,)
    assert dist.sum() == pytest.approx(1.0, abs=1e-12) and np.all(dist >= 0)
    c = probes.cumulative_share(dist)
    assert np.all(np.diff(c) >= 0) and c[-1] == pytest.approx(1.0, abs=1e-12)
    # mean path length sum_i 1/(i+1) = H_{d+1} - 1
    assert probes.mean_path_length(dist) == pytest.approx(sum(1.0 / (i + 1) for i in range(1, d + 1)), rel=1e-10)


@pytest.mark.parametrize("d", [1, 3, 8, 12])
@pytest.mark.parametrize(
    "kw",
    [{}, {"alpha": 0.3}, {"initial_variance": 4.0}, {"normalized": False}, {"normalized": False, "alpha": 0.5}],
    ids=["bn", "bn-alpha", "bn-v0", "no-norm", "no-norm-alpha"],
)
def test_analytic_distribution_matches_brute_force_enumeration(d, kw):
    brute = probes.brute_force_path_distribution(d, **kw)  # from the variance recursion over all 2^d paths
    exact = probes.path_length_distribution(probes.branch_shares(d, **kw))  # from the generating polynomial
    np.testing.assert_allclose(exact, brute, rtol=1e-12, atol=1e-15)


def test_closed_forms():
    # BN, v1 = alpha = 1: P[k] = c(d+1, k+1) / (d+1)!
    d = 15
    c = stirling_first_kind(d + 1)
    np.testing.assert_allclose(
        probes.bn_path_distribution(d), [c[k + 1] / math.factorial(d + 1) for k in range(d + 1)], rtol=1e-12
    )
    # no normalisation, alpha = 1: every path carries the same variance, Binomial(d, 1/2) (Veit et al.)
    d = 20
    np.testing.assert_allclose(
        probes.path_length_distribution(probes.branch_shares(d, normalized=False)),
        [math.comb(d, k) / 2**d for k in range(d + 1)],
        rtol=1e-12,
    )
    # the variance recursion of C9: skip variance v_i = i, output variance d + 1
    v, b = probes.variance_recursion(6)
    np.testing.assert_array_equal(v, np.arange(1, 8))
    np.testing.assert_array_equal(b, np.ones(6))
    np.testing.assert_allclose(probes.branch_shares(4), [1 / 2, 1 / 3, 1 / 4, 1 / 5])


def test_depth_10000_is_stable_and_shallow_paths_dominate():
    dist = probes.bn_path_distribution(10_000)
    # tail coefficients underflow to 0 but never go negative or NaN
    assert np.all(np.isfinite(dist)) and np.all(dist >= 0)
    share15 = probes.cumulative_share(dist)[15]
    assert 0.97 < share15 < 0.99  # De & Smith's "about 97% through at most ~15 branches"
    assert probes.paths_needed(dist, 0.97) == 14
    assert probes.paths_needed(dist, 1.0) <= 10_000


@pytest.mark.parametrize("d", [10, 1000])
def test_monte_carlo_agrees_with_analytic_within_sampling_error(d):
    shares = probes.branch_shares(d)
    dist = probes.path_length_distribution(shares)
    n = 20_000
    sim = probes.simulate_path_lengths(shares, n, seed=1)
    assert sim.distribution.sum() == pytest.approx(1.0)
    se = sim.stderr(dist)
    assert np.all(np.abs(sim.distribution - dist) <= 5 * se + 1.0 / n)
    sd = math.sqrt(float(np.sum(shares * (1 - shares))))
    assert abs(sim.mean - probes.mean_path_length(dist)) < 5 * sd / math.sqrt(n)
    # chi-square over the well-populated bins: a simulation from the wrong law fails it
    ok = dist * n > 20
    chi2 = float(np.sum((sim.distribution[ok] - dist[ok]) ** 2 * n / dist[ok]))
    assert chi2 < ok.sum() + 6 * math.sqrt(2 * ok.sum())
    wrong = probes.simulate_path_lengths(probes.branch_shares(d, initial_variance=2.0), n, seed=1).distribution
    assert float(np.sum((wrong[ok] - dist[ok]) ** 2 * n / dist[ok])) > ok.sum() + 6 * math.sqrt(2 * ok.sum())
    assert np.array_equal(probes.simulate_path_lengths(shares, n, seed=1).lengths, sim.lengths)  # seeded


def test_path_errors():
    with pytest.raises(ValueError, match="depth"):
        probes.bn_path_distribution(0)
    with pytest.raises(ValueError, match="max_depth"):
        probes.brute_force_path_distribution(40)
    with pytest.raises(ValueError, match="probabilities"):
        P.path_length_distribution([0.5, 1.5])
