"""Proof that the rule is honest: the engine's error rates and power on synthetic seeds whose truth is known.

Each test runs the engine's own sequential code path (:func:`judge_arrays`:
estimation, the decision rule, Holm over parts, Bonferroni over the looks) on
2,000 simulated experiments at the quick budget (looks at 3, 6, 9 and 12 seeds)
and asserts a rate against its target with a one-sided binomial test
(scipy.stats.binomtest): a rate is "at most p" unless the counts show it
above p at the 1 % level, so the tests neither flake on one unlucky draw nor
pass on a rate that is really too high. No training: vectorised numpy.

Effects are in units of the per-seed standard deviation of what is compared:
for paired parts the per-seed difference, for unpaired parts each arm.
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats

from normlab.lab.experiments.verdicts import Part, SeedPlan, judge_arrays

S = 2000
QUICK = SeedPlan.rounds(3, 12)


def _parts(m: int, *, delta: float, paired: bool = True, direction: str = "greater") -> list[Part]:
    return [
        Part(f"p{j}", "simulated", "v", {"arm": "a"}, {"arm": "b"}, direction=direction, margin=delta,
             why="simulation", paired=paired)
        for j in range(m)
    ]  # fmt: skip


def _simulate(effect, *, m=1, delta=0.5, paired=True, direction="greater", rho=0.0, seed=0, plan=QUICK):
    """Claim decisions (S,) and stopping looks (S,) for ``m`` parts with true ``effect`` each (SD units).

    ``rho``: correlation between the parts' per-seed values (parts measured on the same runs).
    """
    rng = np.random.default_rng(seed)
    n = plan.max_seeds
    effects = np.broadcast_to(np.asarray(effect, dtype=float), (m,))
    shared = rng.standard_normal((S, n))
    arrays = []
    for j in range(m):
        own = np.sqrt(rho) * shared + np.sqrt(1 - rho) * rng.standard_normal((S, n))
        if paired:  # B is noise common to both arms; A - B has unit SD
            b = rng.standard_normal((S, n))
            a = b + own + effects[j]
        else:
            b = rng.standard_normal((S, n))
            a = own + effects[j]
        arrays.append((a, b))
    claim, _, look, _, _ = judge_arrays(_parts(m, delta=delta, paired=paired, direction=direction), arrays, plan)
    return claim, look


def _at_most(hits: np.ndarray, rate: float) -> None:
    k = int(hits.sum())
    p = stats.binomtest(k, hits.size, rate, alternative="greater").pvalue
    assert p > 0.01, f"rate {k}/{hits.size} = {k / hits.size:.3f} is above {rate} (binomial p = {p:.2g})"


def _at_least(hits: np.ndarray, rate: float) -> None:
    k = int(hits.sum())
    p = stats.binomtest(k, hits.size, rate, alternative="less").pvalue
    assert p > 0.01, f"rate {k}/{hits.size} = {k / hits.size:.3f} is below {rate} (binomial p = {p:.2g})"


@pytest.mark.parametrize("paired", [True, False])
@pytest.mark.parametrize("direction", ["greater", "less"])
def test_no_effect_rarely_holds(paired, direction):
    claim, _ = _simulate(0.0, paired=paired, direction=direction, seed=1)
    _at_most(claim == 1, 0.05)


@pytest.mark.parametrize("m", [2, 3])
def test_no_effect_rarely_holds_with_several_correlated_parts(m):
    claim, _ = _simulate(0.0, m=m, rho=0.5, seed=2)
    _at_most(claim == 1, 0.05)


@pytest.mark.parametrize("m", [1, 3])
@pytest.mark.parametrize("paired", [True, False])
def test_a_true_effect_of_twice_the_margin_rarely_ends_does_not_hold(m, paired):
    claim, _ = _simulate(2 * 0.5, m=m, paired=paired, rho=0.5, seed=3)
    _at_most(claim == -1, 0.05)


def test_an_effect_in_the_wrong_direction_rarely_holds():
    claim, _ = _simulate(-1.5, seed=4)
    _at_most(claim == 1, 0.05)
    _at_least(claim == -1, 0.8)  # the mirror of the power requirement


def test_an_effect_well_inside_the_margin_ends_does_not_hold_not_holds():
    # true effect a tenth of the margin, which is two per-seed SDs: the budget can show it is negligible
    claim, _ = _simulate(0.2, delta=2.0, seed=5)
    _at_least(claim == -1, 0.8)
    _at_most(claim == 1, 0.05)


def test_equivalence_parts_control_both_errors():
    at_margin, _ = _simulate(1.0, delta=1.0, direction="equivalent", seed=6)  # true effect exactly on the margin
    _at_most(at_margin == 1, 0.05)
    null, _ = _simulate(0.0, delta=1.5, direction="equivalent", seed=7)  # truly equivalent, margin 1.5 SD
    _at_least(null == 1, 0.8)
    _at_most(null == -1, 0.05)


def test_power_at_one_and_a_half_standard_deviations_is_at_least_80_percent():
    claim, _ = _simulate(1.5, delta=0.5, seed=8)
    _at_least(claim == 1, 0.8)
    claim, _ = _simulate(1.5, delta=0.5, paired=False, seed=9)
    _at_least(claim == 1, 0.8)


def test_seeds_stop_early_on_a_large_effect():
    _, look = _simulate(3.0, delta=0.5, seed=10)
    assert np.mean(look) < 1.0  # most stop at the first or second look of four
    _at_least(look == 0, 0.3)
