"""C5 ``centering``: what subtracting the mean and dividing by the std each do to a layer.

Pre-registration
----------------
**Claim** (S0, the sections "Cauchy inequality" and "subtract the mean,
divide by the std"; the derivation restates Santurkar et al. 2018 in its own
terms). For a layer ``g(⟨x, w⟩ + b)`` the change of the weight gradient is
bounded, by Cauchy–Schwarz, by a factor ``sqrt(|E[x⊗x]|₁)``, so lowering that
term lowers the gradient's Lipschitz constant. (1) Shifting the input,
``x → x − μ``, changes the term to ``|E[(x−μ)⊗(x−μ)]|₁``, which the source
calls "just the minimum of a quadratic function", reached at ``μ = E[x]``:
subtracting the mean lowers the Lipschitz constant without costing the
network any expressiveness. (2) Dividing the centred input by its std acts
like an adaptive, per-layer learning rate: it evens out how differently the
layers' inputs drive their parameters' updates, so the layers train more
"in step". In the readers' comments the author agrees that scaling alone,
by the RMS instead of the std, is (batch) RMS normalisation.

*Which norm makes the derivation right.* Cauchy–Schwarz gives exactly
``‖E[λx]‖₂ ≤ sqrt(E[λ²]) · sqrt(E‖x‖²)`` and ``E‖x‖² = Σᵢ E[xᵢ²] =
tr E[xxᵀ]`` — the L1 norm of the *vector* ``E[x∘x]`` of per-feature second
moments, i.e. ``⊗`` read as the elementwise product, as the source itself
uses it two paragraphs later (``σ⊗σ`` with ``σ`` "a vector the size of x",
and the ratio "becomes an all-ones vector"; a reader asks in the comments
which product ``⊗`` is, unanswered). Then the term is
``tr E[(x−μ)(x−μ)ᵀ] = tr Cov x + |E x − μ|²``: exactly a quadratic in ``μ``,
minimised at the mean. Read instead as the entrywise L1 norm of the
``D×D`` outer-product matrix (CLAIMS.md's reading), ``Σᵢⱼ |Cᵢⱼ + dᵢdⱼ|``
with ``d = E x − μ`` is not a quadratic, and with negatively correlated
features a shift away from the mean can lower it; the Frobenius norm is
minimised at the mean too (``C`` is positive semi-definite) but is quartic in
``d``. So the trace is the reading under which the source's argument is
exact; it decides, and the entrywise L1 and Frobenius readings are measured
beside it.

Per run: an MLP (6 hidden layers of 64, Linear → norm → ReLU, He init) trained
with SGD on digits; arms ``norm=none``, ``batchnorm`` (centre and divide),
``mean-only`` (centre only: ``γ(x − E_B x) + β``) and ``scale-only`` (divide
only, by the batch RMS: ``γ x / sqrt(E_B x² + ε) + β``, the comments'
variant), all with the same affine parameters, **paired by seed** (same
seed: same Linear initialisation, same batch order). On the trained networks
without norm and with BN, the population moments of every Linear layer's
input over the training set give per layer the term with and without
centring in each reading; per seed the metric is the geometric mean over the
layers of the ratio centred / uncentred: ``trace_ratio`` (``tr C / tr
E[xxᵀ]``), ``l1_ratio`` (``|C|₁ / |E[xxᵀ]|₁``, entrywise), ``fro_ratio``
(Frobenius). ``l1_gap`` is the largest over the layers of
``(|C|₁ − min_s |E[(x−s)(x−s)ᵀ]|₁) / |C|₁`` (0 when the mean minimises the
entrywise L1 term; the minimum searched numerically). During training every
hidden Linear layer's update-to-weight ratio ``|W_t − W_{t−1}| / |W_{t−1}|``
is recorded at every step; a layer's typical rate is the mean over steps of
its ``log10``, and ``update_spread`` is the standard deviation of these
across the layers (decades): small when the layers move in step.

Deciding parts:

* ``centring-lowers-trace`` — network without norm: ``trace_ratio`` below 1
  (one arm against the bound 1, direction "less", log scale), margin ×1.25.
  Why: a **practical threshold** — a 25 % smaller term, the same relative
  size as C4's margin on β (the term enters the bound on the Lipschitz
  constant under a square root: ×1.25 on the term is ×1.12 on the bound);
  centring that changes the term by less would not be worth doing for it.
* ``division-evens-updates`` — ``update_spread`` lower with ``batchnorm``
  than with ``mean-only`` (paired, direction "less"), margin
  ``log10(1.25)`` = 0.097 decades. Why: a **practical threshold** — the
  layers' update rates 25 % closer to their common rate; less would not change
  how in step the layers train.

Reported parts (shown, never deciding):

* ``centring-lowers-trace-bn`` — the same as ``centring-lowers-trace`` on the
  network trained with BN (its layer inputs are ReLUs of normalised
  pre-activations).
* ``centring-lowers-l1`` — ``l1_ratio`` (the entrywise reading) below 1,
  ×1.25. Reported: it is not the quantity the derivation bounds (see above).
* ``centring-lowers-frobenius`` — ``fro_ratio`` below 1, ×1.25. Reported for
  the same reason.
* ``l1-optimum-at-mean`` — network without norm: ``l1_gap`` ≈ 0
  ("equivalent" to the bound 0), margin 0.01. Why: a **practical
  threshold** — a shift that lowers the entrywise L1 term by less than 1 % of
  ``|C|₁`` leaves "the mean minimises it" true in practice. Reported: it tests
  the entrywise reading, under which the source's "quadratic" does not apply.
* ``rms-evens-updates`` — ``update_spread`` lower with ``scale-only`` than
  with ``mean-only``, margin 0.097 decades: does division alone (by the RMS,
  without centring) even out the layers as the comments suggest?

A run whose moments are not finite (a diverged network) counts as no
reduction (ratio 1) and, for ``l1-optimum-at-mean``, as a gap of 1; a run
without a finite update ratio counts as a spread of 1 decade (``missing=``).

**Does not hold** if centring is shown to lower the trace term of the layer
inputs of the network without norm by less than 25 %, or if BN's update
spread is shown not to be lower than mean-only BN's by at least 0.097
decades (higher, or within the margin).

**Seeds and budget** (quick): 3 seeds per round, at most 12 (each seed: 4
trainings of 300 SGD steps; layer-input moments on 2 of them, the L1 search
on the network without norm). Measured on the 2-core CPU, one thread per run
(``/usr/bin/time``, user + system): the full budget of 12 seeds costs 117 s
of CPU; the first quick run decided at 3 seeds (38 s).

Design
------
:func:`normlab.lab.train.train` trains each arm; ``mean-only`` and
``scale-only`` are :class:`MeanOnlyBatchNorm` and :class:`BatchRMSNorm`
below, passed as ``train(..., norm_layer=cls)`` (they belong to this
experiment and are not in the norm registry). The update ratios come from
``train``'s step callback (from step 2 on). After training, for the networks
without norm and with BN, :func:`normlab.lab.probes.layer_input_stats` (eval
mode: the trained function, running statistics for BN) collects the input
moments of every Linear layer (the classifier's included) over the whole
training set of :func:`normlab.lab.train.load_data`;
:meth:`~normlab.lab.probes.LayerInputStats.optimal_shift` searches the shift
``s*`` minimising the entrywise ``|E[(x−s)(x−s)ᵀ]|₁`` (L-BFGS on a smoothed
objective from several starts; a local method, so the gap it finds is a lower
bound; on the network without norm only), and at ``s*`` the trace and
Frobenius norm are recorded too (both rise: the L1 optimum is worse in the
readings that make the derivation exact).

Command: ``normlab run centering`` (quick). ``full``: the same on a VGG-like
CNN on CIFAR-10 (conv inputs read as channels × positions; the CIFAR-10
batches must be in ``data_dir``), not run here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from normlab.lab.experiments.framework import (
    Experiment,
    Part,
    Run,
    fmt_mean_std,
    pyplot,
    register_experiment,
    save_figure,
)
from normlab.lab.experiments.verdicts import Judgement

__all__ = ["CenteringConfig", "MeanOnlyBatchNorm", "BatchRMSNorm", "ARMS", "EXPERIMENT", "layer_ratios"]


class _HalfBatchNorm(nn.Module):
    """BatchNorm with only one of its two steps: centring (:class:`MeanOnlyBatchNorm`) or scaling
    (:class:`BatchRMSNorm`). Statistics per feature over every axis but ``feature_dim``.

    Training uses the batch statistic and blends it into a running one with
    PyTorch's momentum convention (``running = (1 − momentum) running +
    momentum batch``); eval mode uses the running one. ``affine=True`` keeps
    ``weight`` (γ, init 1) and ``bias`` (β, init 0): BatchNorm's parameters.
    Plain autograd (twice differentiable). Called as :func:`normlab.make_norm`
    calls a class: ``cls(num_features, feature_dim=...)``.
    """

    _stat = ""  # name of the running buffer

    def __init__(
        self,
        num_features: int,
        *,
        feature_dim: int = 1,
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        if not isinstance(num_features, int) or num_features < 1:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1], got {momentum}")
        self.num_features, self.feature_dim, self.eps, self.momentum = num_features, feature_dim, eps, momentum
        kw = {"device": device, "dtype": dtype}
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features, **kw))
            self.bias = nn.Parameter(torch.zeros(num_features, **kw))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        start = torch.zeros if self._stat == "running_mean" else torch.ones
        self.register_buffer(self._stat, start(num_features, **kw))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long, device=device))

    def _batch_stat(self, x: Tensor, axes: list[int]) -> Tensor:
        raise NotImplementedError

    def _apply_stat(self, x: Tensor, stat: Tensor) -> Tensor:
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        dim = self.feature_dim % x.dim()
        if x.shape[dim] != self.num_features:
            raise ValueError(
                f"{type(self).__name__}: expected {self.num_features} features on axis {dim}, got shape "
                f"{tuple(x.shape)}; build it with num_features={x.shape[dim]} or fix the preceding layer"
            )
        shape = [1] * x.dim()
        shape[dim] = self.num_features
        running = getattr(self, self._stat)
        if self.training:
            stat = self._batch_stat(x, [a for a in range(x.dim()) if a != dim])  # (C,)
            with torch.no_grad():
                running.lerp_(stat.detach().to(running.dtype), self.momentum)
                self.num_batches_tracked += 1
        else:
            stat = running
        y = self._apply_stat(x, stat.view(shape))
        if self.weight is not None:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y

    def extra_repr(self) -> str:
        return f"{self.num_features}, momentum={self.momentum}, feature_dim={self.feature_dim}"


class MeanOnlyBatchNorm(_HalfBatchNorm):
    """Centring only: ``y = γ (x − E_B[x]) + β`` per feature (batch mean in training, ``running_mean`` in eval)."""

    _stat = "running_mean"

    def _batch_stat(self, x: Tensor, axes: list[int]) -> Tensor:
        return x.mean(dim=axes)

    def _apply_stat(self, x: Tensor, stat: Tensor) -> Tensor:
        return x - stat


class BatchRMSNorm(_HalfBatchNorm):
    """Scaling only, by the batch RMS: ``y = γ x / sqrt(E_B[x²] + ε) + β`` per feature (no centring).

    ``running_sq`` holds the running mean square (init 1) used in eval mode.
    """

    _stat = "running_sq"

    def _batch_stat(self, x: Tensor, axes: list[int]) -> Tensor:
        return (x * x).mean(dim=axes)

    def _apply_stat(self, x: Tensor, stat: Tensor) -> Tensor:
        return x / torch.sqrt(stat + self.eps)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", eps={self.eps}"


# arm -> the layer class passed to train() (None: the registered norm of that name)
ARMS: dict[str, type[nn.Module] | None] = {
    "none": None,
    "batchnorm": None,
    "mean-only": MeanOnlyBatchNorm,
    "scale-only": BatchRMSNorm,
}
_MOMENTS = ("none", "batchnorm")  # the arms whose layer inputs are measured


@dataclass(frozen=True)
class CenteringConfig:
    """C5's configuration; see the module docstring for the procedure and the parts."""

    seeds: int = 3  # seeds per round (initialisation and batch order)
    max_seeds: int = 12  # seed budget per arm
    threads: int = 1  # torch threads per run (not part of the run id)
    dataset: str = "digits"  # training data (offline dataset name)
    data_dir: str | None = None  # folder of the CIFAR batches (full scale); not part of the run id
    model: str = "mlp"  # "mlp" (depth hidden layers of width units) or "cnn" (depth conv blocks)
    depth: int = 6  # hidden layers (mlp) / conv blocks (cnn)
    width: int = 64  # hidden units (mlp) / channels of the first conv block (cnn, doubling up to 8x)
    init: str = "kaiming"  # weight initialisation (He normal)
    lr: float = 0.02  # SGD learning rate (per unit gradient)
    momentum: float = 0.9  # SGD momentum coefficient
    batch_size: int = 64  # training examples per step
    steps: int = 300  # optimizer steps (digits: 22 steps per epoch)
    stats_examples: int | None = None  # training examples for the layer-input moments (None = all)
    stats_mode: str = "eval"  # mode of the trained network while its layer inputs are recorded
    shift_restarts: int = 2  # random restarts of the L1 optimal-shift search (network without norm; besides 0, E[x])
    shift_iters: int = 100  # L-BFGS iterations per smoothing stage of that search


def _model_kwargs(cfg: CenteringConfig) -> dict[str, Any]:
    if cfg.model == "mlp":
        return {"width": cfg.width, "depth": cfg.depth, "init": cfg.init}
    if cfg.model == "cnn":
        return {"channels": [cfg.width * 2 ** min(i, 3) for i in range(cfg.depth)], "init": cfg.init}
    raise ValueError(f"model={cfg.model!r} is not one of: 'mlp', 'cnn'")


def _grid(cfg: CenteringConfig):
    for arm in ARMS:
        yield {
            "dataset": cfg.dataset,
            "model": cfg.model,
            "model_kwargs": _model_kwargs(cfg),
            "norm": arm,  # a registered name, or a label for the layer class in ARMS
            "optimizer": "sgd",
            "lr": cfg.lr,
            "momentum": cfg.momentum,
            "batch_size": cfg.batch_size,
            "epochs": 10**6,  # bounded by max_steps
            "max_steps": cfg.steps,
            "stats_examples": cfg.stats_examples,
            "stats_mode": cfg.stats_mode,
            "layer_stats": arm in _MOMENTS,
            "shift_restarts": cfg.shift_restarts if arm == "none" else None,  # the L1 search: network without norm
            "shift_iters": cfg.shift_iters,
        }


def _weight_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Linear/Conv layers in order; all but the last (the classifier) feed a norm."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d))]


_LAYER_KEYS = ("name", "num_features", "second_moment_trace", "covariance_trace", "second_moment_l1", "covariance_l1",
               "second_moment_fro", "covariance_fro", "mean_norm", "l1_optimum", "l1_gap", "shift_distance",
               "trace_at_l1_optimum", "fro_at_l1_optimum")  # fmt: skip


def _layer_moments(
    model: nn.Module, x: Tensor, n: int | None, mode: str, restarts: int | None, iters: int, seed: int
) -> dict:
    """Per Linear layer: the term with and without centring in three readings, and (unless ``restarts`` is None)
    the entrywise-L1 optimum."""
    from normlab.lab.probes import layer_input_stats

    n = x.shape[0] if n is None else min(n, x.shape[0])
    stats = layer_input_stats(model, [x[i : min(i + 500, n)] for i in range(0, n, 500)], mode=mode)
    out: dict[str, list] = {k: [] for k in _LAYER_KEYS}
    nan = float("nan")
    for name, s in stats.items():
        cov = s.covariance  # (D, D)
        opt = None if restarts is None else s.optimal_shift(restarts=restarts, seed=seed, max_iter=iters)
        at_opt = None if opt is None else s.second_moment(opt.shift)  # (D, D): E[(x - s*)(x - s*)^T]
        row = {
            "name": name,
            "num_features": s.num_features,
            "second_moment_trace": float(s.second_moment().trace()),
            "covariance_trace": float(cov.trace()),
            "second_moment_l1": s.second_moment_l1,
            "covariance_l1": s.covariance_l1,
            "second_moment_fro": s.second_moment_fro,
            "covariance_fro": s.covariance_fro,
            "mean_norm": float(s.mean.norm()),
            "l1_optimum": nan if opt is None else opt.objective,
            "l1_gap": nan if opt is None else opt.gap,
            "shift_distance": nan if opt is None else opt.distance,
            "trace_at_l1_optimum": nan if at_opt is None else float(at_opt.trace()),
            "fro_at_l1_optimum": nan if at_opt is None else float(torch.linalg.matrix_norm(at_opt, "fro")),
        }
        for k in _LAYER_KEYS:
            out[k].append(row[k])
    return out


def _run_one(run: Run) -> dict[str, Any]:
    from normlab.lab.train import load_data, train

    state: dict[str, Any] = {"prev": None, "ratios": [], "names": None}

    def track(ts) -> None:
        if ts.event != "step":
            return
        layers = _weight_layers(ts.model)[:-1]
        with torch.no_grad():
            now = [m.weight.detach().clone() for _, m in layers]
            if state["prev"] is not None:
                state["ratios"].append(
                    [float((w - p).norm() / p.norm().clamp_min(1e-30)) for w, p in zip(now, state["prev"])]
                )
        state["prev"] = now
        state["names"] = [n for n, _ in layers]

    config = run.train_config()
    result = train(config, progress=run.progress, callback=track, norm_layer=ARMS[run["norm"]])
    out: dict[str, Any] = {
        "diverged": result.diverged,
        "steps": result.steps,
        "final_test_acc": result.final.get("test_acc"),
        "final_train_loss": result.final.get("train_loss"),
        "ratio_layers": state["names"],
        "update_ratio": state["ratios"],  # (steps - 1, layers): |W_t - W_{t-1}| / |W_{t-1}|
    }
    if run["layer_stats"]:
        x = load_data(config).x_train
        out["layers"] = _layer_moments(result.model, x, run["stats_examples"], run["stats_mode"],
                                       run["shift_restarts"], run["shift_iters"], run.seed)  # fmt: skip
    return out


def _geo_ratio(num, den) -> float | None:
    """Geometric mean over layers of ``num / den`` (layers with a non-positive value left out; None if none)."""
    logs = [math.log10(a / b) for a, b in zip(num, den) if a > 0 and b > 0 and math.isfinite(a / b)]
    return 10 ** float(np.mean(logs)) if logs else None


def update_spread(update_ratio) -> tuple[float | None, list[float]]:
    """``(spread, per-layer rates)``: each layer's mean over steps of ``log10`` of its update ratio (non-finite or
    zero steps left out), and the standard deviation (ddof 0) of these over the layers, in decades."""
    r = np.asarray(update_ratio, dtype=float)  # (steps - 1, layers)
    if r.ndim != 2 or r.size == 0:
        return None, []
    with np.errstate(divide="ignore", invalid="ignore"):
        logr = np.where(np.isfinite(r) & (r > 0), np.log10(np.where(r > 0, r, 1.0)), np.nan)
    ok = ~np.all(np.isnan(logr), axis=0)
    if not ok.all():
        return None, []
    rates = np.nanmean(logr, axis=0)
    return float(np.std(rates)), rates.tolist()


def layer_ratios(layers: dict[str, list]) -> dict[str, float | None]:
    """A run's per-seed values from its per-layer moments: ``trace_ratio``, ``l1_ratio``, ``fro_ratio`` (geometric
    means over layers of centred / uncentred) and ``l1_gap`` (the largest relative gap of the entrywise L1 optimum)."""
    gaps = [g / c for g, c in zip(layers["l1_gap"], layers["covariance_l1"]) if c > 0 and math.isfinite(g)]
    return {
        "trace_ratio": _geo_ratio(layers["covariance_trace"], layers["second_moment_trace"]),
        "l1_ratio": _geo_ratio(layers["covariance_l1"], layers["second_moment_l1"]),
        "fro_ratio": _geo_ratio(layers["covariance_fro"], layers["second_moment_fro"]),
        "l1_gap": max(gaps) if gaps else None,
    }


def _measure(rows: list[dict[str, Any]], cfg: CenteringConfig) -> list[dict[str, Any]]:
    """Per run: ``update_spread`` and, where the layer inputs were measured, :func:`layer_ratios`."""
    out = []
    for r in rows:
        spread, rates = update_spread(r.get("update_ratio", []))
        m = {**r, "update_spread": spread, "layer_rates": rates}
        if "layers" in r:
            m.update(layer_ratios(r["layers"]))
        out.append(m)
    return out


_QUARTER = 1.25  # the lab's practical 25 %
_SPREAD = math.log10(_QUARTER)  # 0.097 decades


def _parts(cfg: CenteringConfig) -> list[Part]:
    why_term = ("practical: a 25 % smaller term (as C4's margin on β; under the bound's square root ×1.12 on the "
                "Lipschitz constant)")  # fmt: skip
    why_spread = "practical: the layers' update rates 25 % closer to their common rate (log10 1.25 decades)"

    def lowers(name, says, metric, arm, decides=False, extra=""):
        return Part(name, says, metric, {"norm": arm}, bound=1.0, direction="less", margin=_QUARTER, log=True,
                    why=why_term + extra, decides=decides, missing=1.0, unit="centred / uncentred",
                    label_a=arm)  # fmt: skip

    def evens(name, says, arm, decides=False):
        return Part(name, says, "update_spread", {"norm": arm}, {"norm": "mean-only"}, direction="less",
                    margin=_SPREAD, why=why_spread, paired=True, decides=decides, missing=1.0,
                    unit="decades", label_a=arm, label_b="mean-only")  # fmt: skip

    return [
        lowers("centring-lowers-trace", "centring lowers tr E[xxᵀ] of every layer's input (no norm)", "trace_ratio",
               "none", decides=True),
        evens("division-evens-updates", "dividing by the std (BN vs mean-only BN) evens out per-layer update rates",
              "batchnorm", decides=True),
        lowers("centring-lowers-trace-bn", "centring lowers tr E[xxᵀ] (network trained with BN)", "trace_ratio",
               "batchnorm"),
        lowers("centring-lowers-l1", "centring lowers the entrywise |E[xxᵀ]|₁ (no norm)", "l1_ratio", "none",
               extra="; entrywise reading, reported"),
        lowers("centring-lowers-frobenius", "centring lowers ‖E[xxᵀ]‖_F (no norm)", "fro_ratio", "none",
               extra="; Frobenius reading, reported"),
        Part("l1-optimum-at-mean", "the mean minimises the entrywise |E[(x−s)(x−s)ᵀ]|₁ (no norm, worst layer)",
             "l1_gap", {"norm": "none"}, bound=0.0, direction="equivalent", margin=0.01,
             why="practical: a shift lowering the entrywise L1 term by < 1 % of |C|₁ leaves 'the mean minimises "
             "it' true in practice", decides=False, missing=1.0, unit="share of |C|₁", label_a="none"),
        evens("rms-evens-updates", "dividing by the batch RMS alone (scale-only vs mean-only) evens out update rates",
              "scale-only"),
    ]  # fmt: skip


def _explain(rows: list[dict[str, Any]], cfg: CenteringConfig, judgement: Judgement):
    per = [r for r in _measure(rows, cfg) if int(r["seed"]) < judgement.seeds]

    def vals(key, arm):
        return [r[key] for r in per if r["norm"] == arm and r.get(key) is not None]

    def pct(key, arm):  # reduction by centring, percent (geometric mean over layers, then mean over seeds)
        xs = vals(key, arm)
        return float(np.mean([100 * (1 - x) for x in xs])) if xs else float("nan")

    none = [r for r in per if r["norm"] == "none" and "layers" in r]
    trace_up, fro_up, worst = [], [], []
    for r in none:
        L = r["layers"]
        j = int(np.argmax([g / c if c > 0 else 0.0 for g, c in zip(L["l1_gap"], L["covariance_l1"])]))
        worst.append(L["name"][j])
        trace_up.append(100 * (L["trace_at_l1_optimum"][j] / L["covariance_trace"][j] - 1))
        fro_up.append(100 * (L["fro_at_l1_optimum"][j] / L["covariance_fro"][j] - 1))
    spread = {arm: vals("update_spread", arm) for arm in ARMS}
    gaps = vals("l1_gap", "none")
    numbers = {
        "centring_reduction_percent": {
            reading: {arm: pct(key, arm) for arm in _MOMENTS}
            for reading, key in (("trace", "trace_ratio"), ("l1", "l1_ratio"), ("frobenius", "fro_ratio"))
        },
        "l1_gap_percent_of_cov_l1": [100 * g for g in gaps],
        "trace_rise_at_l1_optimum_percent": trace_up,
        "frobenius_rise_at_l1_optimum_percent": fro_up,
        "worst_layer": worst,
        "update_spread_decades": {arm: float(np.mean(v)) if v else None for arm, v in spread.items()},
        "final_test_acc": {arm: float(np.mean(vals("final_test_acc", arm) or [np.nan])) for arm in ARMS},
        "exact_reading": "trace (⊗ as the elementwise product): tr E[(x−μ)(x−μ)ᵀ] is a quadratic in μ, least at E[x]",
    }
    text = (
        "The source's argument is exact for the trace, tr E[(x−μ)(x−μ)ᵀ] = E‖x−μ‖² (its ⊗ read as the elementwise "
        f"product, as it uses it for σ⊗σ): centring lowers it by {pct('trace_ratio', 'none'):.0f} % without norm "
        f"({pct('trace_ratio', 'batchnorm'):.0f} % with BN); the entrywise L1 of the outer product drops by "
        f"{pct('l1_ratio', 'none'):.0f} % and the Frobenius norm by {pct('fro_ratio', 'none'):.0f} %"
    )
    if gaps:
        text += (
            f", but the entrywise L1 is not least at the mean: a shift lowers it by a further "
            f"{fmt_mean_std([100 * g for g in gaps], 2)} % of |C|₁ at the worst layer, raising the trace by "
            f"{float(np.mean(trace_up)):.2g} % there"
        )
    if all(spread[a] for a in ARMS):
        bn, mo, no = (float(np.mean(spread[a])) for a in ("batchnorm", "mean-only", "none"))
        text += (
            f"; update-rate spread across layers: BN {bn:.3f}, mean-only {mo:.3f}, scale-only (batch RMS) "
            f"{np.mean(spread['scale-only']):.3f}, no norm {no:.3f} decades"
        )
        if bn > mo - _SPREAD:
            text += (
                " — dividing by the std does not bring the layers' update rates closer than centring alone "
                f"(not by the {_SPREAD:.3f}-decade margin); without any norm their spread is already {no:.2f} "
                "decades"
            )
    return text, numbers


def _short(name: str) -> str:
    return name.replace("blocks.", "").replace(".linear", "")


def _plot(rows: list[dict[str, Any]], out_dir: Path, cfg: CenteringConfig) -> list[Path]:
    plt = pyplot()
    per = _measure(rows, cfg)
    fig, axes = plt.subplots(1, 3, figsize=(15.5, 4.3))
    # (a) centred / uncentred term per layer, three readings, network without norm (solid) and with BN (dashed)
    ax = axes[0]
    names: list[str] = []
    readings = (("trace", "second_moment_trace", "covariance_trace"), ("entrywise L1", "second_moment_l1",
                "covariance_l1"), ("Frobenius", "second_moment_fro", "covariance_fro"))  # fmt: skip
    for ls, arm in (("-", "none"), ("--", "batchnorm")):
        rs = [r for r in per if r["norm"] == arm and "layers" in r]
        for c, (label, m, cv) in enumerate(readings):
            ratios = np.array([[a / b for a, b in zip(r["layers"][cv], r["layers"][m])] for r in rs])
            if ratios.size:
                names = rs[0]["layers"]["name"]
                x = np.arange(ratios.shape[1])
                ax.plot(x, np.exp(np.log(ratios).mean(0)), color=f"C{c}", ls=ls, marker="o", ms=3,
                        label=f"{label}, {arm}")  # fmt: skip
    ax.axhline(1 / _QUARTER, color="k", ls=":", lw=1, label="margin (25 % lower)")
    ax.set_xticks(range(len(names)), [_short(n) for n in names])
    ax.set(yscale="log", xlabel="layer (input of)", ylabel="centred / uncentred (geo. mean of seeds)",
           title="what centring does to the term, per reading")  # fmt: skip
    ax.legend(fontsize=7)
    # (b) the entrywise-L1 optimum: its gap below centring, and what it does to the trace
    ax = axes[1]
    for k, r in enumerate(r for r in per if r["norm"] == "none" and "layers" in r):
        L = r["layers"]
        x = np.arange(len(L["name"]))
        gap = [g / c if c > 0 else np.nan for g, c in zip(L["l1_gap"], L["covariance_l1"])]
        rise = [t / c - 1 for t, c in zip(L["trace_at_l1_optimum"], L["covariance_trace"])]
        ax.scatter(x - 0.1, np.maximum(gap, 1e-9), color="C1", s=14, label="entrywise L1: gain of s* over the mean"
                   if k == 0 else None)  # fmt: skip
        ax.scatter(x + 0.1, np.maximum(rise, 1e-9), color="C0", marker="^", s=14,
                   label="trace: rise at s* over the mean" if k == 0 else None)  # fmt: skip
    ax.axhline(0.01, color="k", ls=":", lw=1, label="1 % (l1-optimum-at-mean margin)")
    ax.set_xticks(range(len(names)), [_short(n) for n in names])
    ax.set(yscale="log", xlabel="layer (input of)", ylabel="relative to the value at the mean",
           title="no norm: the entrywise-L1 optimum s* is not the mean")  # fmt: skip
    ax.legend(fontsize=7)
    # (c) per-layer update-to-weight ratios, averaged (in log10) over the steps of training
    ax = axes[2]
    for c, arm in enumerate(("batchnorm", "mean-only", "scale-only", "none")):
        rates = [r["layer_rates"] for r in per if r["norm"] == arm and r["layer_rates"]]
        for m in rates:
            ax.plot(np.arange(len(m)), 10 ** np.array(m), color=f"C{c}", lw=0.7, alpha=0.35)
        if rates:
            spread = np.mean([r["update_spread"] for r in per if r["norm"] == arm and r["update_spread"] is not None])
            ax.plot(np.arange(len(rates[0])), 10 ** np.mean(rates, axis=0), color=f"C{c}", lw=2, marker="o", ms=3,
                    label=f"{arm}: spread {spread:.3f} decades")  # fmt: skip
    lnames = next((r["ratio_layers"] for r in per if r.get("ratio_layers")), [])
    ax.set_xticks(range(len(lnames)), [_short(n) for n in lnames])
    ax.set(yscale="log", xlabel="layer (weights feeding a norm)", ylabel="geometric mean over steps of |ΔW|/|W|",
           title="per-layer update-to-weight ratio (every seed; bold: mean)")  # fmt: skip
    ax.legend(fontsize=7)
    fig.suptitle(f"C5 centring and scaling ({cfg.dataset}, {cfg.model.upper()} {cfg.depth}×{cfg.width}, SGD lr "
                 f"{cfg.lr:g}, trained {cfg.steps} steps)", fontsize=10)  # fmt: skip
    fig.tight_layout()
    return [save_figure(fig, out_dir, "centering")]


EXPERIMENT = register_experiment(
    Experiment(
        name="centering",
        claim="C5",
        title="Centring minimises the input's second-moment term (exactly, read as a trace); dividing by the std "
        "evens out per-layer updates",
        config=CenteringConfig,
        scales={
            "smoke": CenteringConfig(
                seeds=2, max_seeds=2, depth=3, width=16, steps=15, stats_examples=300, shift_restarts=0, shift_iters=15
            ),  # fmt: skip
            "quick": CenteringConfig(),
            "full": CenteringConfig(
                seeds=5,
                max_seeds=20,
                dataset="cifar10",
                data_dir="data/cifar10",
                model="cnn",
                depth=5,
                width=64,
                lr=0.05,
                batch_size=128,
                steps=20000,
                stats_examples=10000,
            ),  # fmt: skip
        },
        grid=_grid,
        run_one=_run_one,
        parts=_parts,
        measure=_measure,
        explain=_explain,
        plot=_plot,
        description=__doc__ or "",
    )
)
