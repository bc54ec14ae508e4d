"""The verdict engine on hand-computed cases: the decision rule, each estimator against scipy and closed forms."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from normlab.lab.experiments.verdicts import (
    DOES_NOT_HOLD,
    HOLDS,
    INCONCLUSIVE,
    Part,
    SeedPlan,
    decide,
    estimate,
    judge,
    parts_digest,
)


def part(**kw) -> Part:
    base = dict(name="p", says="A beats B", metric="v", a={"arm": "a"}, b={"arm": "b"}, margin=0.1, why="test")
    return Part(**{**base, **kw})


# --------------------------------------------------------------------------- the rule


@pytest.mark.parametrize(
    ("lo", "hi", "direction", "expected"),
    [
        (0.05, 0.30, "greater", 1),  # right of zero and reaching past delta
        (0.01, 0.09, "greater", -1),  # right of zero but wholly inside (-delta, delta): too small to matter
        (-0.30, -0.05, "greater", -1),  # wholly on the other side
        (-0.05, 0.30, "greater", 0),  # straddles zero
        (0.00, 0.30, "greater", 0),  # touching zero is not "wholly on the claimed side"
        (0.05, 0.10, "greater", 1),  # hi == delta: not wholly inside the open band
        (-0.30, -0.05, "less", 1),  # mirrored
        (0.05, 0.30, "less", -1),
        (-0.09, -0.01, "less", -1),
        (-0.05, 0.05, "equivalent", 1),  # inside the band
        (0.10, 0.30, "equivalent", -1),  # wholly outside (lo == delta counts as outside)
        (-0.30, -0.10, "equivalent", -1),
        (-0.05, 0.20, "equivalent", 0),
        (float("nan"), float("nan"), "greater", 0),
    ],
)
def test_decision_rule_on_hand_intervals(lo, hi, direction, expected):
    assert int(decide(lo, hi, direction, 0.1)) == expected


def test_decision_rule_is_vectorised():
    lo = np.array([0.05, 0.01, -0.3])
    hi = np.array([0.30, 0.09, -0.05])
    assert decide(lo, hi, "greater", 0.1).tolist() == [1, -1, -1]


# --------------------------------------------------------------------------- estimators against scipy


def test_paired_t_interval_equals_the_closed_form_on_differences():
    a = np.array([0.91, 0.93, 0.88, 0.95, 0.90])
    b = np.array([0.85, 0.90, 0.86, 0.88, 0.87])
    est = estimate(part(), a[None], b[None], [0.95, 0.99])
    d = a - b
    se = d.std(ddof=1) / math.sqrt(len(d))
    for level in (0.95, 0.99):
        q = stats.t.ppf(0.5 + level / 2, len(d) - 1)
        lo, hi = est.interval(level)
        assert lo[0] == pytest.approx(d.mean() - q * se, rel=1e-12)
        assert hi[0] == pytest.approx(d.mean() + q * se, rel=1e-12)
    assert est.effect[0] == pytest.approx(d.mean()) and est.se[0] == pytest.approx(se, rel=1e-10)
    assert est.p_value[0] == pytest.approx(stats.ttest_rel(a, b).pvalue, rel=1e-12)
    assert est.df[0] == 4 and est.n_a == est.n_b == 5


def test_welch_interval_equals_the_closed_form():
    a = np.array([1.0, 1.3, 0.8, 1.6])
    b = np.array([0.2, 0.9, 0.1, 0.5, 0.7, 0.3])
    est = estimate(part(paired=False), a[None], b[None], [0.95])
    va, vb = a.var(ddof=1) / len(a), b.var(ddof=1) / len(b)
    df = (va + vb) ** 2 / (va**2 / (len(a) - 1) + vb**2 / (len(b) - 1))  # Welch-Satterthwaite
    q = stats.t.ppf(0.975, df)
    diff = a.mean() - b.mean()
    lo, hi = est.interval(0.95)
    assert (lo[0], hi[0]) == pytest.approx((diff - q * math.sqrt(va + vb), diff + q * math.sqrt(va + vb)), rel=1e-10)
    assert est.df[0] == pytest.approx(df, rel=1e-10) and (est.n_a, est.n_b) == (4, 6)


def test_one_sample_against_a_bound():
    a = np.array([0.12, 0.15, 0.11, 0.14])
    est = estimate(part(b=None, bound=0.1), a[None], None, [0.95])
    res = stats.ttest_1samp(a, 0.1)
    ci = res.confidence_interval(0.95)
    lo, hi = est.interval(0.95)
    assert est.effect[0] == pytest.approx(a.mean() - 0.1)
    assert (lo[0], hi[0]) == pytest.approx((ci.low - 0.1, ci.high - 0.1), rel=1e-12)


def test_log_scale_compares_ratios():
    a = np.array([10.0, 12.0, 9.0])
    b = np.array([30.0, 28.0, 35.0])
    p = part(direction="less", log=True, margin=1.25)
    est = estimate(p, a[None], b[None], [0.95])
    d = np.log10(a) - np.log10(b)
    assert est.effect[0] == pytest.approx(d.mean()) and p.delta == pytest.approx(math.log10(1.25))
    ci = stats.ttest_rel(np.log10(a), np.log10(b)).confidence_interval(0.95)
    assert est.interval(0.95)[1][0] == pytest.approx(ci.high, rel=1e-12)
    with pytest.raises(ValueError, match="values <= 0"):
        estimate(p, np.array([[1.0, 0.0, 2.0]]), b[None], [0.95])


def test_zero_spread_gives_the_point_as_its_interval():
    a = np.array([-0.5, -0.5, -0.5])
    b = np.array([-1.5, -1.0, -2.0])
    same = estimate(part(), a[None], (a - 0.3)[None], [0.95])
    assert same.interval(0.95)[0][0] == pytest.approx(0.3) and same.interval(0.95)[1][0] == pytest.approx(0.3)
    assert same.se[0] == 0 and same.p_value[0] == 0
    flat = estimate(part(paired=False), a[None], a[None], [0.95])
    assert flat.interval(0.95)[0][0] == 0 and flat.p_value[0] == 1
    welch = estimate(part(paired=False), a[None], b[None], [0.95])  # one arm varies: a real interval
    assert welch.interval(0.95)[0][0] < welch.effect[0] < welch.interval(0.95)[1][0]


def test_bootstrap_interval_is_scipys_bca_and_its_p_value_a_sign_flip_test():
    a = np.array([0.9, 0.1, 0.85, 0.92, 0.88, 0.1, 0.91, 0.87])  # two diverged seeds at chance
    b = np.array([0.8, 0.8, 0.82, 0.79, 0.81, 0.83, 0.8, 0.78])
    est = estimate(part(method="bootstrap"), a[None], b[None], [0.95], seed=7)
    rng = np.random.default_rng(7)
    ref = stats.bootstrap((a - b,), np.mean, confidence_level=0.95, method="BCa", rng=rng)
    lo, hi = est.interval(0.95)
    assert (lo[0], hi[0]) == pytest.approx(tuple(ref.confidence_interval), rel=1e-12)
    assert est.se[0] == pytest.approx(ref.standard_error, rel=1e-12)
    assert 0 < est.p_value[0] <= 1 and est.effect[0] == pytest.approx((a - b).mean())


def test_proportion_part_uses_the_exact_binomial_interval():
    diverged = np.array([1, 1, 1, 0, 1, 1, 1, 1, 1.0])
    p = part(b=None, bound=0.5, method="proportion")
    est = estimate(p, diverged[None], None, [0.95])
    ci = stats.binomtest(8, 9).proportion_ci(0.95, method="exact")
    lo, hi = est.interval(0.95)
    assert (lo[0], hi[0]) == pytest.approx((ci.low - 0.5, ci.high - 0.5), rel=1e-12)
    assert est.p_value[0] == pytest.approx(stats.binomtest(8, 9, p=0.5).pvalue)
    with pytest.raises(ValueError, match="0/1 values"):
        estimate(p, np.array([[0.5, 1.0]]), None, [0.95])


# --------------------------------------------------------------------------- declarations


def test_parts_must_declare_a_margin_with_its_reason_and_one_comparison():
    with pytest.raises(ValueError, match="margin δ must be > 0"):
        part(margin=0.0)
    with pytest.raises(ValueError, match="say why"):
        part(why=" ")
    with pytest.raises(ValueError, match="ratio above 1"):
        part(log=True, margin=0.5)
    with pytest.raises(ValueError, match="exactly one of b"):
        part(bound=0.5)
    with pytest.raises(ValueError, match="direction"):
        part(direction="bigger")
    with pytest.raises(ValueError, match="proportion"):
        part(method="proportion")


def test_changing_a_declaration_changes_the_digest():
    assert parts_digest([part()]) == parts_digest([part()])
    assert parts_digest([part()]) != parts_digest([part(margin=0.2)])
    assert parts_digest([part()]) != parts_digest([part(decides=False)])


def test_seed_plan_rounds():
    assert SeedPlan.rounds(3, 12).looks == (3, 6, 9, 12)
    assert SeedPlan.rounds(3, 10).looks == (3, 6, 9, 10)
    assert SeedPlan.rounds(2, 2).looks == (2,)
    assert SeedPlan.rounds(3, 12).alpha_per_look == pytest.approx(0.0125)
    with pytest.raises(ValueError):
        SeedPlan((3, 3))


# --------------------------------------------------------------------------- judging rows


def _rows(values_a, values_b, **extra):
    rows = [{"arm": "a", "seed": s, "v": v, **extra} for s, v in enumerate(values_a)]
    return rows + [{"arm": "b", "seed": s, "v": v, **extra} for s, v in enumerate(values_b)]


def test_judge_reaches_each_outcome_paired_and_unpaired():
    b = [0.80, 0.81, 0.79, 0.80, 0.82, 0.78]
    up = [x + 0.10 + 0.005 * i for i, x in enumerate(b)]
    down = [x - 0.10 - 0.005 * i for i, x in enumerate(b)]
    same = [x + 0.001 * (-1) ** i for i, x in enumerate(b)]
    noisy = [0.80, 0.95, 0.70, 0.90, 0.65, 0.99]
    plan = SeedPlan((6,))
    for paired in (True, False):
        p = part(paired=paired, margin=0.05)
        assert judge([p], _rows(up, b), plan).status == HOLDS
        assert judge([p], _rows(down, b), plan).status == DOES_NOT_HOLD
        assert judge([p], _rows(same, b), plan).status == DOES_NOT_HOLD  # shown to be within the margin
        assert judge([p], _rows(noisy, b), plan).status == INCONCLUSIVE
        r = judge([part(paired=paired, margin=0.05, direction="equivalent")], _rows(same, b), plan)
        assert r.status == HOLDS


def test_judge_states_interval_and_detectable_effect_and_levels():
    b = [0.80, 0.81, 0.79, 0.80, 0.82, 0.78]
    a = [0.80, 0.95, 0.70, 0.90, 0.65, 0.99]
    j = judge([part(margin=0.05)], _rows(a, b), SeedPlan.rounds(3, 6))
    (r,) = j.parts
    assert r.status == INCONCLUSIVE and r.level == pytest.approx(1 - 0.05 / 2)  # Bonferroni over 2 looks
    d = np.array(a) - np.array(b)
    se = d.std(ddof=1) / math.sqrt(6)
    q = stats.t.ppf(1 - 0.025 / 2, 5) + stats.t.ppf(0.8, 5)  # alpha 0.05 split over 2 looks, two-sided
    assert r.detectable == pytest.approx(q * se, rel=1e-9)
    assert "detectable ≥" in r.line() and j.seeds == 6 and j.look == 2
    assert r.ci95 == pytest.approx(tuple(stats.ttest_rel(a, b).confidence_interval(0.95)), rel=1e-12)


def test_holm_gives_the_clearer_part_the_stricter_level_and_stops_at_the_first_undecided():
    b = [0.0] * 8
    strong = [1.0 + 0.01 * i for i in range(8)]  # decided at any level
    weak = [0.06, 0.02, 0.09, 0.01, 0.08, 0.03, 0.07, 0.05]  # mean 0.05: inside a band of 0.3
    rows = [{"arm": arm, "seed": s, "x": xs[s], "y": ys[s]} for arm, xs, ys in (("a", strong, weak), ("b", b, b))
            for s in range(8)]  # fmt: skip
    px = part(name="x", metric="x", margin=0.3)
    py = part(name="y", metric="y", margin=0.3)
    j = judge([px, py], rows, SeedPlan((8,)))
    levels = {r.part.name: r.level for r in j.parts}
    assert levels["x"] == pytest.approx(1 - 0.05 / 2) and levels["y"] == pytest.approx(1 - 0.05 / 1)
    assert j.status == DOES_NOT_HOLD  # y is shown too small to matter
    # an undecided first part stops Holm: the second is not reached
    noisy = [0.9, -0.8, 0.7, -0.6, 1.1, -0.9, 0.8, -0.7]
    rows = [{"arm": arm, "seed": s, "x": xs[s], "y": ys[s]} for arm, xs, ys in (("a", noisy, noisy), ("b", b, b))
            for s in range(8)]  # fmt: skip
    j = judge([px, py], rows, SeedPlan((8,)))
    assert [r.status for r in j.parts] == [INCONCLUSIVE, INCONCLUSIVE]


def test_reported_parts_never_change_the_claim():
    b = [0.80, 0.81, 0.79, 0.80, 0.82, 0.78]
    up = [x + 0.10 + 0.005 * i for i, x in enumerate(b)]
    down = [x - 0.10 for x in b]
    rows = [{"arm": "a", "seed": s, "v": up[s], "w": down[s]} for s in range(6)]
    rows += [{"arm": "b", "seed": s, "v": b[s], "w": b[s]} for s in range(6)]
    j = judge([part(margin=0.05), part(name="w", metric="w", margin=0.05, decides=False)], rows, SeedPlan((6,)))
    assert j.status == HOLDS and j.parts[1].status == DOES_NOT_HOLD and j.parts[1].level == 0.95


def test_diverged_runs_count_as_declared_never_dropped():
    rows = _rows([0.9, None, 0.92, float("nan")], [0.8, 0.81, 0.79, 0.8])
    with pytest.raises(ValueError, match="declare the value such a run counts as"):
        judge([part()], rows, SeedPlan((4,)))
    j = judge([part(missing=0.1, method="bootstrap")], rows, SeedPlan((4,)))
    assert j.parts[0].effect == pytest.approx(np.mean([0.9 - 0.8, 0.1 - 0.81, 0.92 - 0.79, 0.1 - 0.8]))
    with pytest.raises(ValueError, match="two rows for seed 0"):
        judge([part()], _rows([0.9, 0.9], [0.8, 0.8]) + [{"arm": "a", "seed": 0, "v": 0.5}], SeedPlan((2,)))


def test_judgement_records_what_a_reader_needs():
    b = [0.80, 0.81, 0.79, 0.80, 0.82, 0.78]
    up = [x + 0.10 + 0.005 * i for i, x in enumerate(b)]
    j = judge([part(margin=0.05)], _rows(up, b), SeedPlan.rounds(3, 6))
    d = j.to_dict()
    assert d["status"] == HOLDS and d["rule_version"] == 1 and d["looks"] == [3, 6] and d["seeds"] == 3
    p = d["parts"][0]
    assert p["ci"][0] < p["effect"] < p["ci"][1] and p["margin"] == 0.05 and p["why_margin"] == "test"
    assert p["declaration"]["a"] == {"arm": "a"} and j.stopped_early
