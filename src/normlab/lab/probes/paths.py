"""A deep residual network as an ensemble of paths: how the output variance splits over path lengths.

Veit et al. 2016 ("Residual Networks Behave Like Ensembles of Relatively
Shallow Networks") unroll ``x_{i+1} = x_i + f_i(x_i)`` over ``d`` blocks into
``2^d`` paths, one per subset ``S`` of branches taken. De & Smith 2020 ("Batch
Normalization Biases Residual Blocks Towards the Identity Function in Deep
Networks", §3 and Fig. 3) ask how the *variance* of the output splits over
path lengths ``|S|`` at initialisation. The model behind every function here:

* linear branches ``f_i(x) = alpha W_i x / s_i`` with independent, zero-mean,
  unit-gain random ``W_i`` (``Var(W_i z) = Var(z)``); then different paths are
  uncorrelated, and the path through ``S`` carries the variance
  ``v_1 prod_{i in S} alpha^2 / s_i^2`` (``v_1`` = variance of the first block's input);
* **with normalisation** (BN in the branch): ``s_i^2 = v_i``, the variance of the
  block input, so every branch outputs variance ``alpha^2`` and the skip
  variance grows additively, ``v_{i+1} = v_i + alpha^2`` (CLAIMS.md C9: with
  ``v_1 = alpha = 1``, ``v_i = i``). Branch ``i`` then carries the share
  ``p_i = alpha^2 / (v_i + alpha^2)`` of the variance at its depth, ``1/(i+1)``
  for ``v_1 = alpha = 1`` (C10: "branch i carries ~ 1/i");
* **without normalisation**: ``s_i = 1``, the branch preserves its input's
  variance, ``v_{i+1} = (1 + alpha^2) v_i``, and ``p_i = alpha^2 / (1 + alpha^2)``
  (1/2 for ``alpha = 1``: Veit et al.'s binomial path distribution).

Because path ``S`` carries ``v_{d+1} prod_{i in S} p_i prod_{i not in S} (1 - p_i)``
of the output variance ``v_{d+1}``, the share of the output variance carried by
paths through exactly ``k`` branches is the coefficient of ``z^k`` in the
generating polynomial ``prod_i ((1 - p_i) + p_i z)``: the law of the number of
successes of independent Bernoulli(``p_i``) trials (a Poisson-binomial law). For
``v_1 = alpha = 1`` it is ``c(d+1, k+1) / (d+1)!`` (unsigned Stirling numbers of
the first kind), with mean ``H_{d+1} - 1`` (``H`` the harmonic numbers).

* :func:`branch_shares` — the ``p_i``;
* :func:`path_length_distribution` — the coefficients, exactly, by dynamic
  programming over the polynomial product (every step a convex combination of
  non-negative numbers, so it is stable in float64; ``O(d^2)``, ~0.1 s for
  ``d = 10,000``);
* :func:`cumulative_share`, :func:`paths_needed` — the share through at most
  ``k`` branches, and the ``k`` that reaches a given share;
* :func:`simulate_path_lengths` — Monte-Carlo: sample paths, each taking
  branch ``i`` independently with probability ``p_i`` (a path is then drawn
  with probability equal to its share of the output variance), and histogram
  their lengths;
* :func:`brute_force_path_distribution` — for small ``d``, enumerate all
  ``2^d`` paths, computing each path's variance from the variance recursion
  itself (not from ``p_i``); used by the tests as the oracle.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = [
    "branch_shares",
    "variance_recursion",
    "path_length_distribution",
    "bn_path_distribution",
    "cumulative_share",
    "paths_needed",
    "mean_path_length",
    "simulate_path_lengths",
    "PathSimulation",
    "brute_force_path_distribution",
]


def _check_depth(d: int) -> None:
    if not isinstance(d, (int, np.integer)) or d < 1:
        raise ValueError(f"depth d must be a positive int, got {d!r}")


def variance_recursion(d: int, *, normalized: bool = True, alpha: float = 1.0, initial_variance: float = 1.0):
    """``(v, b)``: ``v[i]`` the variance of block ``i+1``'s input (``v`` has ``d + 1`` entries, ``v[d]`` the
    output's) and ``b[i]`` the variance of branch ``i+1``'s output (``d`` entries), in the linear model above."""
    _check_depth(d)
    if initial_variance <= 0:
        raise ValueError(f"initial_variance must be > 0, got {initial_variance}")
    a2 = float(alpha) ** 2
    v = np.empty(d + 1)
    b = np.empty(d)
    v[0] = initial_variance
    for i in range(d):
        b[i] = a2 if normalized else a2 * v[i]
        v[i + 1] = v[i] + b[i]
    return v, b


def branch_shares(d: int, *, normalized: bool = True, alpha: float = 1.0, initial_variance: float = 1.0) -> np.ndarray:
    """``p_i`` (d,): the share of the variance at the output of block ``i`` carried by its branch.

    With normalisation ``p_i = alpha^2 / (v_i + alpha^2)``, ``v_i = v_1 + (i - 1) alpha^2``
    (``1/(i+1)`` for ``alpha = v_1 = 1``); without, ``p_i = alpha^2 / (1 + alpha^2)``.
    """
    _check_depth(d)
    a2 = float(alpha) ** 2
    if normalized:
        if initial_variance <= 0:
            raise ValueError(f"initial_variance must be > 0, got {initial_variance}")
        v = initial_variance + a2 * np.arange(d, dtype=np.float64)  # v_i, i = 1..d
        return a2 / (v + a2)
    return np.full(d, a2 / (1.0 + a2))


def path_length_distribution(shares) -> np.ndarray:
    """``P`` (d+1,): ``P[k]`` = coefficient of ``z^k`` in ``prod_i ((1 - p_i) + p_i z)``, the share of the output
    variance carried by paths through exactly ``k`` branches. Exact up to float64 rounding; sums to 1."""
    p = np.asarray(shares, dtype=np.float64).reshape(-1)
    if p.size == 0 or np.any(p < 0) or np.any(p > 1) or not np.all(np.isfinite(p)):
        raise ValueError("shares must be a non-empty array of probabilities in [0, 1]")
    dist = np.zeros(p.size + 1)
    dist[0] = 1.0
    for i, pi in enumerate(p):  # multiply by (1 - p_i) + p_i z; coefficients 0..i+1 can be non-zero
        dist[1 : i + 2] = (1.0 - pi) * dist[1 : i + 2] + pi * dist[0 : i + 1]
        dist[0] *= 1.0 - pi
    return dist


def bn_path_distribution(d: int, *, alpha: float = 1.0, initial_variance: float = 1.0) -> np.ndarray:
    """:func:`path_length_distribution` for a normalised residual net of depth ``d`` (C10's setting)."""
    return path_length_distribution(branch_shares(d, normalized=True, alpha=alpha, initial_variance=initial_variance))


def cumulative_share(dist) -> np.ndarray:
    """``S[k] = sum_{j <= k} P[j]``: the share of the output variance through at most ``k`` branches (clipped to 1)."""
    return np.minimum(np.cumsum(np.asarray(dist, dtype=np.float64)), 1.0)


def paths_needed(dist, share: float) -> int:
    """The smallest ``k`` such that paths through at most ``k`` branches carry at least ``share`` of the variance."""
    if not 0 < share <= 1:
        raise ValueError(f"share must be in (0, 1], got {share}")
    c = cumulative_share(dist)
    hit = np.nonzero(c >= share - 1e-12)[0]
    return int(hit[0]) if hit.size else len(c) - 1


def mean_path_length(dist) -> float:
    """``sum_k k P[k]`` (= ``sum_i p_i``)."""
    dist = np.asarray(dist, dtype=np.float64)
    return float(np.dot(np.arange(dist.size), dist))


@dataclass(frozen=True)
class PathSimulation:
    """Monte-Carlo path lengths: ``lengths`` (num_paths,) and their histogram ``distribution`` (d+1,).

    ``stderr[k] = sqrt(P_k (1 - P_k) / num_paths)`` for the histogram estimated
    from the analytic ``P`` (pass it to :meth:`stderr`).
    """

    lengths: np.ndarray = field(repr=False)
    distribution: np.ndarray = field(repr=False)
    num_paths: int = 0

    @property
    def mean(self) -> float:
        return float(self.lengths.mean())

    def stderr(self, dist) -> np.ndarray:
        p = np.asarray(dist, dtype=np.float64)
        return np.sqrt(p * (1 - p) / self.num_paths)

    def as_dict(self) -> dict:
        return {"distribution": self.distribution.tolist(), "num_paths": self.num_paths, "mean": self.mean}


def simulate_path_lengths(
    shares, num_paths: int = 10_000, *, seed: int = 0, chunk_elements: int = 1 << 22
) -> PathSimulation:
    """Sample ``num_paths`` paths, each taking branch ``i`` independently with probability ``p_i``; histogram lengths.

    Under the model above a path is drawn with probability equal to its share
    of the output variance, so the histogram estimates
    :func:`path_length_distribution`. Seeded (``numpy.random.default_rng``);
    drawn in chunks of at most ``chunk_elements`` Bernoulli trials.
    """
    p = np.asarray(shares, dtype=np.float64).reshape(-1)
    if p.size == 0 or np.any(p < 0) or np.any(p > 1):
        raise ValueError("shares must be a non-empty array of probabilities in [0, 1]")
    if num_paths < 1:
        raise ValueError(f"num_paths must be >= 1, got {num_paths}")
    rng = np.random.default_rng(seed)
    rows = max(1, chunk_elements // p.size)
    lengths = np.empty(num_paths, dtype=np.int64)
    for start in range(0, num_paths, rows):
        m = min(rows, num_paths - start)
        lengths[start : start + m] = (rng.random((m, p.size)) < p).sum(axis=1)  # (m, d) -> (m,)
    dist = np.bincount(lengths, minlength=p.size + 1).astype(np.float64) / num_paths
    return PathSimulation(lengths, dist, num_paths)


def brute_force_path_distribution(
    d: int, *, normalized: bool = True, alpha: float = 1.0, initial_variance: float = 1.0, max_depth: int = 22
) -> np.ndarray:
    """The path-length distribution by enumerating all ``2^d`` paths (small ``d`` only; an oracle for tests).

    Runs the variance recursion (:func:`variance_recursion`); path ``S``
    carries ``v_1 prod_{i in S} alpha^2 / s_i^2`` with ``s_i^2 = v_i``
    (normalised) or 1; sums these per ``|S|`` and divides by the output
    variance ``v_{d+1}``. Raises if the path variances do not add up to
    ``v_{d+1}`` (they must: the paths are uncorrelated).
    """
    _check_depth(d)
    if d > max_depth:
        raise ValueError(f"brute force enumerates 2^d paths; d={d} exceeds max_depth={max_depth}")
    v, _ = variance_recursion(d, normalized=normalized, alpha=alpha, initial_variance=initial_variance)
    gain = float(alpha) ** 2 / (v[:d] if normalized else np.ones(d))  # (d,) variance factor of taking branch i
    masks = np.arange(1 << d, dtype=np.int64)  # every subset S as a bit mask
    bits = (masks[:, None] >> np.arange(d)) & 1  # (2^d, d)
    weights = v[0] * np.prod(np.where(bits == 1, gain, 1.0), axis=1)  # (2^d,) variance of each path
    total = weights.sum()
    if not np.isclose(total, v[d], rtol=1e-10, atol=0):
        raise AssertionError(f"path variances sum to {total}, the recursion gives {v[d]}")
    return np.bincount(bits.sum(axis=1), weights=weights, minlength=d + 1) / v[d]
