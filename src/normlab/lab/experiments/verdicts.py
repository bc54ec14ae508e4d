"""The verdict engine: declared parts, interval estimates over seeds, one decision rule, seeds in rounds.

A claim is judged through its **parts**. Each :class:`Part` is declared before
the runs it judges (in the experiment module, beside its config): the metric,
the two arms compared (or one arm and a fixed bound), the claimed direction
(``"greater"``, ``"less"`` or ``"equivalent"``), the **margin** δ — the
smallest effect that matters, in the metric's unit, with one line saying why —
whether the comparison is on a log scale, whether the arms are paired by seed,
and whether the part decides the claim or is only reported.

Estimation
----------
For each part, the effect is ``A − B`` (or ``A − bound``; on a log scale
``log10 A − log10 B``, shown as the ratio ``A / B``) with a confidence
interval from scipy: Student's t on the per-seed differences when the arms are
paired by seed (same seed: same initialisation draw and batch order,
:func:`scipy.stats.ttest_rel`), Welch's t otherwise
(:func:`scipy.stats.ttest_ind` with ``equal_var=False``), a one-sample t
against a bound (:func:`scipy.stats.ttest_1samp`), a BCa bootstrap
(:func:`scipy.stats.bootstrap`, p-value by :func:`scipy.stats.permutation_test`)
for heavy-tailed metrics, or an exact binomial interval
(:func:`scipy.stats.binomtest`) for a rate (0/1 per seed) against a bound.
A run whose metric is missing or not finite (a diverged run) is never dropped:
the part declares the value it counts as (``missing=``, e.g. chance accuracy),
or the experiment judges divergence as a rate part of its own; without either
the engine refuses to judge.

The rule (:data:`RULE`, version :data:`RULE_VERSION`)
-----------------------------------------------------
With ``[lo, hi]`` the part's interval for the effect, oriented so that the
claimed side is positive (for ``"less"`` the effect's sign is flipped):

* directional part (``"greater"`` / ``"less"``) — **holds** when the interval
  lies wholly on the claimed side of zero (``lo > 0``) and not wholly inside
  ``(−δ, δ)`` (so ``hi ≥ δ``); **does not hold** when it lies wholly on the
  other side of zero (``hi < 0``), or wholly inside ``(−δ, δ)`` — an effect
  too small to matter, whatever its sign; **inconclusive** otherwise;
* ``"equivalent"`` part (``A ≈ B``) — **holds** when the interval lies inside
  ``(−δ, δ)`` (equivalence, i.e. both one-sided tests of the two one-sided
  tests procedure reject); **does not hold** when it lies wholly outside
  (``lo ≥ δ`` or ``hi ≤ −δ``); **inconclusive** otherwise.

An inconclusive part states its interval and the smallest effect its seeds
could have detected (80 % power at the level used).

Error rates
-----------
Two multiplicities are controlled, each by the simplest rule valid whatever the
dependence between the tests:

* **over the parts**: the deciding parts are judged by Holm's step-down
  procedure — ordered by the smallest level at which each would be decided,
  the ``j``-th (from 0) is judged with the interval at level
  ``1 − α_look / (m − j)``; at the first part not decided at its level, that
  part and all after it are inconclusive. A claim **holds** when every deciding
  part holds, **does not hold** when any deciding part does not hold, and is
  **inconclusive** otherwise. Reported-only parts use plain 95 % intervals.
* **over the interim looks**: seeds run in rounds (:class:`SeedPlan`, e.g. 3,
  6, 9, 12 seeds) and the experiment stops at the first look at which every
  deciding part is decided. The overall α = 0.05 is split equally over the
  planned looks (Bonferroni: ``α_look = α / K``). This spends a little power
  compared with a group-sequential boundary, but it needs no assumption about
  how the looks' statistics are correlated (they are not Gaussian with known
  information fractions here: the metrics are accuracies, ratios, counts), it
  stays valid if the run stops for any reason, and with K = 4 it costs only a
  modestly wider interval (t quantile at 98.75 % instead of 95 %).

The simulation suite (``tests/test_verdicts_simulation.py``) checks the error
rates of exactly this code on synthetic seed values whose truth is known.
"""

from __future__ import annotations

import hashlib
import json
import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

import numpy as np
from scipy import stats

__all__ = [
    "RULE",
    "RULE_VERSION",
    "ALPHA",
    "HOLDS",
    "DOES_NOT_HOLD",
    "INCONCLUSIVE",
    "STATUSES",
    "Part",
    "SeedPlan",
    "Estimate",
    "PartResult",
    "Judgement",
    "decide",
    "estimate",
    "judge",
    "judge_arrays",
    "parts_digest",
    "arm_values",
    "part_cells",
]

RULE = "interval-vs-margin, Holm over parts, Bonferroni over looks"
RULE_VERSION = 1
ALPHA = 0.05  # overall error rate of a claim's verdict
POWER = 0.8  # power at which the smallest detectable effect is stated

HOLDS, DOES_NOT_HOLD, INCONCLUSIVE = "holds", "does not hold", "inconclusive"
STATUSES = (HOLDS, DOES_NOT_HOLD, INCONCLUSIVE)
_CODE = {1: HOLDS, -1: DOES_NOT_HOLD, 0: INCONCLUSIVE}

Direction = Literal["greater", "less", "equivalent"]
Method = Literal["t", "bootstrap", "proportion"]


# --------------------------------------------------------------------------- declarations


@dataclass(frozen=True)
class Part:
    """One declared part of a claim (see the module docstring for what each field means).

    ``a`` and ``b`` select the per-seed rows of each arm by equality of their
    entries (``{"norm": "batchnorm", "depth": 10}``); with ``bound`` instead of
    ``b`` arm A is compared with a fixed number. ``margin`` is δ in the
    metric's unit, or, for ``log=True``, a ratio above 1 (``1.25`` = 25 %).
    """

    name: str  # short id, unique within the claim, e.g. "beta-deep"
    says: str  # the part in words: "BN's effective β is lower than without BN (10 layers)"
    metric: str  # the per-seed value compared (a key of the experiment's per-seed rows)
    a: Mapping[str, Any]  # selector of arm A
    b: Mapping[str, Any] | None = None  # selector of arm B; None: compare A with `bound`
    bound: float | None = None  # fixed comparison value when there is no arm B
    direction: Direction = "greater"  # A greater / less than B, or A ≈ B ("equivalent")
    margin: float = 0.0  # δ: the smallest effect that matters (metric units; a ratio > 1 when log=True)
    why: str = ""  # one line: why δ has this size (a paper's number, a noise floor, a practical threshold)
    log: bool = False  # compare log10 of the metric (ratios such as β or λ_max)
    paired: bool = True  # arms paired by seed (same seed: same initialisation draw and batch order)
    decides: bool = True  # False: reported only, never changes the claim's verdict
    method: Method = "t"  # "t" (paired / Welch / one-sample), "bootstrap" (heavy tails), "proportion" (a 0/1 rate)
    missing: float | None = None  # the value a run counts as when its metric is missing/non-finite (e.g. diverged)
    unit: str = ""  # the metric's unit, for display ("accuracy", "nats", "log10 lr")
    label_a: str = ""  # display name of arm A (default: its selector)
    label_b: str = ""  # display name of arm B

    def __post_init__(self) -> None:
        where = f"part {self.name!r}"
        if not self.name or not self.says or not self.metric:
            raise ValueError(f"{where}: name, says and metric are required")
        if self.direction not in ("greater", "less", "equivalent"):
            raise ValueError(f"{where}: direction {self.direction!r} is not 'greater', 'less' or 'equivalent'")
        if (self.b is None) == (self.bound is None):
            raise ValueError(f"{where}: give exactly one of b (a second arm) and bound (a fixed value)")
        if not (isinstance(self.margin, (int, float)) and math.isfinite(self.margin)):
            raise ValueError(f"{where}: margin must be a finite number, got {self.margin!r}")
        if self.log and not self.margin > 1:
            raise ValueError(f"{where}: a log-scale margin is a ratio above 1 (1.25 = 25 %), got {self.margin}")
        if not self.log and not self.margin > 0:
            raise ValueError(f"{where}: the margin δ must be > 0 (the smallest effect that matters), got {self.margin}")
        if not self.why.strip():
            raise ValueError(f"{where}: say why the margin is {self.margin} (why=...)")
        if self.method not in ("t", "bootstrap", "proportion"):
            raise ValueError(f"{where}: method {self.method!r} is not 't', 'bootstrap' or 'proportion'")
        if self.method == "proportion" and (self.b is not None or self.log):
            raise ValueError(f"{where}: method='proportion' judges one arm's 0/1 rate against a bound, linear scale")
        if self.log and self.bound is not None and not self.bound > 0:
            raise ValueError(f"{where}: a log-scale bound must be > 0, got {self.bound}")

    @property
    def delta(self) -> float:
        """δ on the scale the effect is computed on (log10 of the ratio for log parts)."""
        return math.log10(self.margin) if self.log else float(self.margin)

    @property
    def arm_a(self) -> str:
        return self.label_a or _selector_label(self.a)

    @property
    def arm_b(self) -> str:
        if self.b is None:
            return f"{self.bound:g}"
        return self.label_b or _selector_label(self.b)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["a"], d["b"] = dict(self.a), (dict(self.b) if self.b is not None else None)
        return d


def _selector_label(sel: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in sel.items()) or "all"


def parts_digest(parts: Sequence[Part]) -> str:
    """A short hash of the declarations: changing a declared part changes the experiment's identity."""
    text = json.dumps([p.to_dict() for p in parts], sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@dataclass(frozen=True)
class SeedPlan:
    """The seeds at each planned look, e.g. ``(3, 6, 9, 12)``; the overall α is split equally over the looks."""

    looks: tuple[int, ...]
    alpha: float = ALPHA

    def __post_init__(self) -> None:
        looks = tuple(int(n) for n in self.looks)
        if not looks or looks[0] < 1 or any(b <= a for a, b in zip(looks, looks[1:])):
            raise ValueError(f"looks must be increasing seed counts >= 1, got {self.looks}")
        if not 0 < self.alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {self.alpha}")
        object.__setattr__(self, "looks", looks)

    @classmethod
    def rounds(cls, first: int, max_seeds: int, step: int | None = None, alpha: float = ALPHA) -> SeedPlan:
        """``first`` seeds, then ``step`` (default ``first``) more at a time, up to ``max_seeds``."""
        if first < 1 or max_seeds < first:
            raise ValueError(f"need 1 <= first <= max_seeds, got first={first}, max_seeds={max_seeds}")
        step = first if step is None else step
        if step < 1:
            raise ValueError(f"step must be >= 1, got {step}")
        looks = list(range(first, max_seeds + 1, step))
        if looks[-1] != max_seeds:
            looks.append(max_seeds)
        return cls(tuple(looks), alpha)

    @property
    def max_seeds(self) -> int:
        return self.looks[-1]

    @property
    def alpha_per_look(self) -> float:
        return self.alpha / len(self.looks)


# --------------------------------------------------------------------------- the rule


def decide(lo, hi, direction: Direction, delta: float):
    """The decision rule on intervals ``[lo, hi]`` of the effect (arrays or floats): 1 holds, -1 does not, 0 neither.

    ``delta`` is δ on the effect's scale. For ``"less"`` the claimed side is
    negative: the interval is mirrored first. NaN bounds are inconclusive.
    """
    lo, hi = np.asarray(lo, dtype=float), np.asarray(hi, dtype=float)
    with np.errstate(invalid="ignore"):
        if direction == "equivalent":
            holds = (lo > -delta) & (hi < delta)
            fails = (lo >= delta) | (hi <= -delta)
        else:
            if direction == "less":
                lo, hi = -hi, -lo
            inside = (lo > -delta) & (hi < delta)
            holds = (lo > 0) & (hi >= delta)
            fails = (hi < 0) | inside
    return np.where(holds, 1, np.where(fails, -1, 0)).astype(np.int8)


# --------------------------------------------------------------------------- estimation


@dataclass(frozen=True)
class Estimate:
    """A part's effect on its own scale (log10 ratio for log parts) with its intervals; arrays over simulations."""

    effect: np.ndarray
    se: np.ndarray
    df: np.ndarray
    p_value: np.ndarray  # two-sided test of "no difference" (of A = bound for bound parts)
    n_a: int
    n_b: int
    intervals: dict[float, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)  # level -> (lo, hi)

    def interval(self, level: float) -> tuple[np.ndarray, np.ndarray]:
        return self.intervals[level]


def _as_scale(values: np.ndarray, part: Part) -> np.ndarray:
    if not part.log:
        return values
    with np.errstate(divide="ignore", invalid="ignore"):
        out = np.log10(values)
    if not np.all(np.isfinite(out)):
        raise ValueError(f"part {part.name!r}: log-scale metric {part.metric!r} has values <= 0 or non-finite")
    return out


def estimate(part: Part, a: np.ndarray, b: np.ndarray | None, levels: Sequence[float], *, seed: int = 0) -> Estimate:
    """The effect of ``part`` and its intervals at ``levels``, from per-seed values ``a`` (and ``b``).

    ``a`` and ``b`` are arrays of shape ``(S, n)``: ``S`` independent
    experiments (1 for a real one; many in the simulation tests) of ``n`` seeds;
    for paired parts column ``j`` of both is seed ``j``. Computed with scipy.stats.
    """
    a = _as_scale(np.atleast_2d(np.asarray(a, dtype=float)), part)
    if part.b is None:
        bound = math.log10(part.bound) if part.log else float(part.bound)
        b_arr = None
    else:
        b_arr = _as_scale(np.atleast_2d(np.asarray(b, dtype=float)), part)
        bound = 0.0
    levels = sorted(set(float(x) for x in levels))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # zero spread: scipy warns, the interval is the point
        if part.method == "t":
            return _estimate_t(part, a, b_arr, bound, levels)
        if part.method == "bootstrap":
            return _estimate_bootstrap(part, a, b_arr, bound, levels, seed)
        return _estimate_proportion(part, a, bound, levels)


def _estimate_t(part: Part, a, b, bound: float, levels) -> Estimate:
    if b is None:
        res = stats.ttest_1samp(a, bound, axis=-1)
        effect = a.mean(-1) - bound
        shift = -bound  # the interval scipy gives is for the mean of a
    elif part.paired:
        if a.shape != b.shape:
            raise ValueError(
                f"part {part.name!r}: paired arms need the same seeds, got {a.shape[-1]} and {b.shape[-1]}"
            )
        res = stats.ttest_rel(a, b, axis=-1)
        effect = (a - b).mean(-1)
        shift = 0.0
    else:
        res = stats.ttest_ind(a, b, axis=-1, equal_var=False)
        effect = a.mean(-1) - b.mean(-1)
        shift = 0.0
    df = np.broadcast_to(np.asarray(res.df, dtype=float), effect.shape)
    # no spread at all (every seed the same, e.g. a grid-valued metric): the interval is the point itself
    flat = np.ptp(a if b is None else (a - b if part.paired else np.concatenate([a, b], -1)), axis=-1) == 0
    if b is not None and not part.paired:
        flat = (np.ptp(a, axis=-1) == 0) & (np.ptp(b, axis=-1) == 0)
    intervals = {}
    for level in levels:
        ci = res.confidence_interval(level)
        lo, hi = np.asarray(ci.low, dtype=float) + shift, np.asarray(ci.high, dtype=float) + shift
        lo, hi = np.where(flat, effect, lo), np.where(flat, effect, hi)
        intervals[level] = (np.atleast_1d(lo), np.atleast_1d(hi))
    half = intervals[levels[-1]][1] - effect  # se from the widest interval's half-width
    q = stats.t.ppf(0.5 + levels[-1] / 2, df)
    with np.errstate(invalid="ignore", divide="ignore"):
        se = np.where(q > 0, half / q, np.nan)
    se = np.where(flat, 0.0, se)
    p = np.asarray(res.pvalue, dtype=float)
    p = np.where(flat, np.where(effect == 0, 1.0, 0.0), p)
    n_a = a.shape[-1]
    return Estimate(np.atleast_1d(effect), np.atleast_1d(se), np.atleast_1d(df), np.atleast_1d(p), n_a,
                    n_a if b is None else b.shape[-1], intervals)  # fmt: skip


def _estimate_bootstrap(part: Part, a, b, bound: float, levels, seed: int) -> Estimate:
    S = a.shape[0]
    effect, se, p = np.empty(S), np.empty(S), np.empty(S)
    los = {lv: np.empty(S) for lv in levels}
    his = {lv: np.empty(S) for lv in levels}
    for s in range(S):
        if b is None:
            data, stat, paired = (a[s] - bound,), np.mean, False
        elif part.paired:
            data, stat, paired = (a[s] - b[s],), np.mean, False
        else:
            data, paired = (a[s], b[s]), False

            def stat(x, y, axis=-1):
                return np.mean(x, axis=axis) - np.mean(y, axis=axis)

        effect[s] = stat(*data)
        if all(np.ptp(d) == 0 for d in data):  # no spread: the interval is the point
            se[s], p[s] = 0.0, (1.0 if effect[s] == 0 else 0.0)
            for lv in levels:
                los[lv][s] = his[lv][s] = effect[s]
            continue
        rng = np.random.default_rng(seed + s)
        res = stats.bootstrap(data, stat, confidence_level=levels[0], method="BCa", rng=rng, paired=paired)
        se[s] = res.standard_error
        for lv in levels:
            r = stats.bootstrap(data, stat, confidence_level=lv, method="BCa", bootstrap_result=res, n_resamples=0)
            los[lv][s], his[lv][s] = r.confidence_interval
        if len(data) == 1:  # sign-flip test of a zero mean
            perm = stats.permutation_test(data, np.mean, permutation_type="samples", rng=rng)
        else:
            perm = stats.permutation_test(data, stat, permutation_type="independent", rng=rng)
        p[s] = perm.pvalue
    n_a = a.shape[-1]
    df = np.full(S, np.inf)
    return Estimate(effect, se, df, p, n_a, n_a if b is None else b.shape[-1],
                    {lv: (los[lv], his[lv]) for lv in levels})  # fmt: skip


def _estimate_proportion(part: Part, a, bound: float, levels) -> Estimate:
    if not np.all((a == 0) | (a == 1)):
        raise ValueError(f"part {part.name!r}: method='proportion' needs 0/1 values per seed (e.g. diverged or not)")
    S, n = a.shape
    k = a.sum(-1).astype(int)
    effect = k / n - bound
    p = np.array([stats.binomtest(int(ki), n, p=bound).pvalue for ki in k])
    intervals = {}
    for lv in levels:
        cis = [stats.binomtest(int(ki), n).proportion_ci(lv, method="exact") for ki in k]
        intervals[lv] = (np.array([c.low for c in cis]) - bound, np.array([c.high for c in cis]) - bound)
    se = np.sqrt(np.clip((k / n) * (1 - k / n), 0, None) / n)
    return Estimate(effect, se, np.full(S, np.inf), p, n, n, intervals)


def _detectable(part: Part, est: Estimate, level: float) -> np.ndarray:
    """The smallest effect these seeds detect with 80 % power at ``level`` (two-sided), on the effect's scale."""
    df = np.where(np.isfinite(est.df), est.df, 1e6)
    with np.errstate(invalid="ignore"):
        q = stats.t.ppf(0.5 + level / 2, df) + stats.t.ppf(POWER, df)
    return q * est.se


# --------------------------------------------------------------------------- display


def _g(x: Any, digits: int = 3) -> str:
    return f"{x:.{digits}g}" if isinstance(x, (int, float)) and math.isfinite(x) else str(x)


def part_cells(p: Mapping[str, Any]) -> dict[str, str]:
    """A stored part (:meth:`PartResult.to_dict`) as the strings every display shows.

    Keys: ``part``, ``role`` (decides / reported), ``effect`` (a ratio ``×r``
    for log-scale parts), ``interval`` (the one the decision used), ``level``,
    ``ci95``, ``margin`` (``±δ`` or ``×δ``), ``n``, ``decision`` (with the
    smallest detectable effect when inconclusive), ``says`` and ``why``.
    """
    sh, ratio = p["shown"], p.get("scale") == "log10 ratio"
    x = "×" if ratio else ""
    decision = str(p["status"])
    if p["status"] == INCONCLUSIVE and p.get("detectable", 0) > 0:  # no spread across seeds: nothing to state
        decision += f" (detectable ≥ {x}{_g(sh['detectable'])})"
    n = str(p["n_a"]) if p["n_a"] == p["n_b"] else f"{p['n_a']}/{p['n_b']}"
    return {
        "part": str(p["name"]),
        "role": "decides" if p.get("decides") else "reported",
        "effect": f"{x}{_g(sh['effect'])}",
        "interval": f"[{_g(sh['ci'][0])}, {_g(sh['ci'][1])}]",
        "level": f"{100 * p['level']:.3g}%",
        "ci95": f"[{_g(sh['ci95'][0])}, {_g(sh['ci95'][1])}]",
        "margin": f"{'×' if ratio else '±'}{_g(sh['margin'])}",
        "n": n,
        "decision": decision,
        "says": str(p.get("says", "")),
        "why": str(p.get("why_margin", "")),
    }


# --------------------------------------------------------------------------- judging a claim


@dataclass(frozen=True)
class PartResult:
    """A part's outcome in a real experiment (floats, JSON-ready through :meth:`to_dict`)."""

    part: Part
    status: str
    effect: float  # on the part's scale (log10 ratio for log parts)
    ci: tuple[float, float]  # the interval the decision used
    level: float  # its confidence level (Holm and Bonferroni-adjusted for deciding parts)
    ci95: tuple[float, float]  # the plain 95 % interval, for reading
    p_value: float
    n_a: int
    n_b: int
    detectable: float  # smallest effect detectable at 80 % power at `level` (effect scale)
    note: str = ""  # why a deciding part was left undecided (Holm stopped before it), ...

    @property
    def seeds_to_decide(self) -> int | None:
        """About how many seeds per arm would decide this part if the effect is what was observed (None if decided).

        A planning figure, not a promise: the seeds at which the smallest
        detectable effect shrinks to the observed one (to show it), or at
        which the interval's half-width fits inside the margin beside it (to
        show it is too small to matter), whichever is fewer.
        """
        if self.status != INCONCLUSIVE or not (self.detectable > 0 and math.isfinite(self.detectable)):
            return None
        n = self.n_a
        eff, delta = abs(self.effect), self.part.delta
        options = []
        if self.part.direction != "equivalent" and eff > 0:
            options.append(n * (self.detectable / eff) ** 2)
        half = (self.ci[1] - self.ci[0]) / 2
        if eff < delta and half > 0:
            options.append(n * (half / (delta - eff)) ** 2)
        return math.ceil(min(options)) if options else None

    def shown(self, x: float) -> float:
        """A value on the effect's scale as the reader sees it: a ratio for log parts."""
        return 10**x if self.part.log else x

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.part.name,
            "says": self.part.says,
            "status": self.status,
            "decides": self.part.decides,
            "metric": self.part.metric,
            "arm_a": self.part.arm_a,
            "arm_b": self.part.arm_b,
            "direction": self.part.direction,
            "scale": "log10 ratio" if self.part.log else "difference",
            "effect": self.effect,
            "ci": list(self.ci),
            "level": self.level,
            "ci95": list(self.ci95),
            "p_value": self.p_value,
            "n_a": self.n_a,
            "n_b": self.n_b,
            "margin": self.part.margin,
            "delta": self.part.delta,
            "why_margin": self.part.why,
            "detectable": self.detectable,
            "seeds_to_decide": self.seeds_to_decide,
            "shown": {
                "effect": self.shown(self.effect),
                "ci": [self.shown(x) for x in self.ci],
                "ci95": [self.shown(x) for x in self.ci95],
                "margin": self.part.margin,
                "detectable": self.shown(self.detectable) if self.part.log else self.detectable,
            },
            "note": self.note,
            "declaration": self.part.to_dict(),
        }

    def line(self, digits: int = 3) -> str:
        """One line: ``name: effect [lo, hi] (δ …, n …) → status``."""
        g = lambda x: f"{x:.{digits}g}"  # noqa: E731
        if self.part.log:
            eff = f"×{g(self.shown(self.effect))} [{g(self.shown(self.ci[0]))}, {g(self.shown(self.ci[1]))}]"
            margin = f"δ ×{g(self.part.margin)}"
        else:
            eff = f"{g(self.effect)} [{g(self.ci[0])}, {g(self.ci[1])}]"
            margin = f"δ {g(self.part.margin)}"
        n = f"n {self.n_a}" if self.part.b is None or self.part.paired else f"n {self.n_a}/{self.n_b}"
        undecided = self.status == INCONCLUSIVE and self.detectable > 0
        tail = f" (detectable ≥ {g(self.shown(self.detectable))})" if undecided else ""
        return f"{self.part.name}: {eff} at {100 * self.level:.3g} %, {margin}, {n} → {self.status}{tail}"


@dataclass(frozen=True)
class Judgement:
    """A claim's verdict from its parts: status, the parts' results, and how it was reached."""

    status: str
    parts: tuple[PartResult, ...]
    seeds: int  # seeds per arm at the look that decided (or the last look)
    look: int  # 1-based index of that look
    plan: SeedPlan
    stopped_early: bool  # every deciding part was decided before the last planned look
    digest: str  # parts_digest of the declarations

    @property
    def deciding(self) -> tuple[PartResult, ...]:
        return tuple(r for r in self.parts if r.part.decides)

    def summary(self) -> str:
        deciding = "; ".join(r.line() for r in self.deciding)
        return f"{self.status} at {self.seeds} seeds (look {self.look} of {len(self.plan.looks)}): {deciding}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "status": self.status,
            "rule": RULE,
            "rule_version": RULE_VERSION,
            "alpha": self.plan.alpha,
            "looks": list(self.plan.looks),
            "alpha_per_look": self.plan.alpha_per_look,
            "look": self.look,
            "seeds": self.seeds,
            "stopped_early": self.stopped_early,
            "parts_digest": self.digest,
            "parts": [r.to_dict() for r in self.parts],
        }


def _holm(estimates: Sequence[Estimate], parts: Sequence[Part], alpha: float) -> tuple[np.ndarray, np.ndarray]:
    """Holm's step-down over the deciding parts: decisions (S, m) and the level each was judged at (S, m)."""
    m = len(parts)
    S = estimates[0].effect.shape[0]
    grid = sorted(estimates[0].intervals)  # shared levels, ascending confidence
    # the smallest alpha at which each part is decided: from the widest interval down
    p_dec = np.full((S, m), np.inf)
    for j, (est, part) in enumerate(zip(estimates, parts)):
        for level in grid:  # ascending confidence = descending alpha
            d = decide(*est.interval(level), part.direction, part.delta)
            p_dec[:, j] = np.where(d != 0, 1 - level, p_dec[:, j])
    order = np.argsort(p_dec, axis=1, kind="stable")
    decisions = np.zeros((S, m), dtype=np.int8)
    levels = np.full((S, m), np.nan)
    alive = np.ones(S, dtype=bool)
    for rank in range(m):
        level = 1 - alpha / (m - rank)
        cols = order[:, rank]
        d_rank = np.zeros(S, dtype=np.int8)
        for j, (est, part) in enumerate(zip(estimates, parts)):
            here = cols == j
            if here.any():
                d = decide(*est.interval(level), part.direction, part.delta)
                d_rank = np.where(here, d, d_rank)
        d_rank = np.where(alive, d_rank, 0)
        rows = np.arange(S)
        decisions[rows, cols] = d_rank
        levels[rows, cols] = level
        alive &= d_rank != 0
    return decisions, levels


def _levels_needed(m: int, alpha: float) -> list[float]:
    holm = [1 - alpha / k for k in range(1, m + 1)]
    fine = list(1 - alpha * np.geomspace(1e-3, 1.0, 25) / max(m, 1))
    return sorted(set(holm + fine + [0.95]))


def _claim_status(decisions: np.ndarray) -> np.ndarray:
    """(S, m) part decisions -> (S,) claim: holds if all hold, does not hold if any does not, else inconclusive."""
    if decisions.shape[1] == 0:
        return np.zeros(decisions.shape[0], dtype=np.int8)
    all_hold = (decisions == 1).all(axis=1)
    any_fail = (decisions == -1).any(axis=1)
    return np.where(any_fail, -1, np.where(all_hold, 1, 0)).astype(np.int8)


def judge_arrays(parts: Sequence[Part], arrays: Sequence[tuple[np.ndarray, np.ndarray | None]], plan: SeedPlan):
    """The sequential engine on arrays: ``arrays[j] = (A, B)`` of shape ``(S, n_max)`` for deciding part ``j``.

    Returns ``(claim, decisions, look_index, levels, estimates_per_look)``: the
    claim's decision per simulation (S,), the parts' decisions (S, m) at the
    look where it stopped, that look's index (S,), the level each part was
    judged at (S, m), and the estimates at every look. Looks beyond the seeds
    available in the arrays are not taken. This is the code path of real
    experiments (S = 1) and of the simulation tests.
    """
    if not parts:
        raise ValueError("a claim needs at least one deciding part")
    n_avail = arrays[0][0].shape[-1]
    looks = [n for n in plan.looks if n <= n_avail]
    if not looks:
        raise ValueError(f"the first look needs {plan.looks[0]} seeds, only {n_avail} are available")
    S = arrays[0][0].shape[0]
    levels_needed = _levels_needed(len(parts), plan.alpha_per_look)
    final_dec = np.zeros((S, len(parts)), dtype=np.int8)
    final_lv = np.full((S, len(parts)), np.nan)
    final_look = np.full(S, len(looks) - 1)
    done = np.zeros(S, dtype=bool)
    per_look = []
    for k, n in enumerate(looks):
        ests = [
            estimate(p, A[:, :n], None if B is None else B[:, :n], levels_needed) for p, (A, B) in zip(parts, arrays)
        ]
        per_look.append(ests)
        dec, lv = _holm(ests, parts, plan.alpha_per_look)
        take = ~done & ((dec != 0).all(axis=1) | (k == len(looks) - 1))
        final_dec[take], final_lv[take], final_look[take] = dec[take], lv[take], k
        done |= take
    return _claim_status(final_dec), final_dec, final_look, final_lv, per_look


# --------------------------------------------------------------------------- judging from per-seed rows


def _matches(row: Mapping[str, Any], selector: Mapping[str, Any]) -> bool:
    return all(_same(row.get(k), v) for k, v in selector.items())


def _same(x, y) -> bool:
    if isinstance(x, (list, tuple)) and isinstance(y, (list, tuple)):
        return list(x) == list(y)
    return x == y


def arm_values(part: Part, rows: Sequence[Mapping[str, Any]], selector: Mapping[str, Any]) -> dict[int, float]:
    """``{seed: value}`` of ``part.metric`` over the rows that match ``selector``; missing values as declared."""
    out: dict[int, float] = {}
    for r in rows:
        if not _matches(r, selector):
            continue
        seed = int(r["seed"])
        if seed in out:
            raise ValueError(
                f"part {part.name!r}: two rows for seed {seed} match {dict(selector)}; make the arm unique"
            )
        v = r.get(part.metric)
        ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        if isinstance(v, bool):
            v, ok = float(v), True
        if not ok:
            if part.missing is None:
                raise ValueError(
                    f"part {part.name!r}: seed {seed} of arm {_selector_label(selector)} has {part.metric}={v!r} "
                    "(diverged or missing); declare the value such a run counts as (missing=...) or judge "
                    "divergence as a rate part"
                )
            v = part.missing
        out[seed] = float(v)
    return out


def judge(parts: Sequence[Part], rows: Sequence[Mapping[str, Any]], plan: SeedPlan) -> Judgement:
    """Judge a claim from its per-seed rows (each with a ``seed`` and the parts' selectors and metrics).

    Deciding parts go through :func:`judge_arrays` (Holm over parts, looks up
    to the seeds present); reported-only parts get a 95 % interval at the same
    seeds. Seeds ``0 .. n-1`` of every arm must be present for look ``n``.
    """
    deciding = [p for p in parts if p.decides]
    if not deciding:
        raise ValueError("a claim needs at least one deciding part")
    names = [p.name for p in parts]
    if len(set(names)) != len(names):
        raise ValueError(f"part names must be unique, got {names}")
    arrays, n_common = [], None
    for p in parts:
        a = arm_values(p, rows, p.a)
        b = arm_values(p, rows, p.b) if p.b is not None else None
        seeds = set(a) if b is None else set(a) & set(b)
        n = 0
        while n in seeds:
            n += 1
        if n == 0:
            raise ValueError(
                f"part {p.name!r}: no rows for seed 0 in arm A {dict(p.a)}"
                + ("" if b is None else f" or arm B {dict(p.b)}")
            )
        n_common = n if n_common is None else min(n_common, n)
        arrays.append((a, b))
    looks = [n for n in plan.looks if n <= n_common]
    if not looks:
        raise ValueError(f"the plan's first look needs {plan.looks[0]} seeds per arm; the rows have {n_common}")

    def as_arrays(a, b, n):
        A = np.array([[a[s] for s in range(n)]])
        B = None if b is None else np.array([[b[s] for s in range(n)]])
        return A, B

    n_max = looks[-1]
    dec_arrays = [as_arrays(a, b, n_max) for p, (a, b) in zip(parts, arrays) if p.decides]
    claim, dec, look_idx, lv, per_look = judge_arrays(deciding, dec_arrays, plan)
    k = int(look_idx[0])
    n = looks[k]
    results = []
    for p, (a, b) in zip(parts, arrays):
        if p.decides:
            j = deciding.index(p)
            est = per_look[k][j]
            level = float(lv[0, j])
            status = _CODE[int(dec[0, j])]
            note = "" if not math.isnan(level) else "not reached: Holm's procedure stopped at an undecided part"
            if math.isnan(level):
                level = 1 - plan.alpha_per_look
            ci = est.interval(level) if level in est.intervals else _single(p, *as_arrays(a, b, n), level)
        else:
            est = estimate(p, *as_arrays(a, b, n), [0.95])
            level, note = 0.95, "reported only"
            ci = est.interval(0.95)
            status = _CODE[int(decide(*ci, p.direction, p.delta)[0])]
        ci95 = est.interval(0.95) if 0.95 in est.intervals else _single(p, *as_arrays(a, b, n), 0.95)
        results.append(
            PartResult(
                part=p,
                status=status,
                effect=float(est.effect[0]),
                ci=(float(ci[0][0]), float(ci[1][0])),
                level=level,
                ci95=(float(ci95[0][0]), float(ci95[1][0])),
                p_value=float(est.p_value[0]),
                n_a=est.n_a,
                n_b=est.n_b,
                detectable=float(_detectable(p, est, level)[0]),
                note=note,
            )
        )
    stopped_early = k < len(plan.looks) - 1 and (dec[0] != 0).all()
    return Judgement(_CODE[int(claim[0])], tuple(results), n, k + 1, plan, bool(stopped_early), parts_digest(parts))


def _single(part: Part, A, B, level: float):
    return estimate(part, A, B, [level]).interval(level)
