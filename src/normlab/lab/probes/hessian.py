"""The loss Hessian through Hessian-vector products: top eigenvalues and trace.

Nothing here forms the Hessian. One forward pass builds the loss, one backward
with ``create_graph=True`` builds the gradient ``g(w)`` as a differentiable
graph, and each Hessian-vector product is one more backward through it
(Pearlmutter 1994): ``H v = d/dw (g(w) . v)``. normlab's layers are twice
differentiable (their analytic backward is itself recorded when
``create_graph=True``), so this works through them, in train mode (batch
statistics, whose dependence on ``w`` is part of the Hessian) as in eval mode.

* :func:`hessian_eigenvalues` — the ``k`` eigenvalues of largest magnitude by
  power iteration with deflation (as in PyHessian, Yao et al. 2020, and the
  top-eigenvalue measurements of Santurkar et al. 2018 / Ghorbani et al. 2019).
* :func:`hessian_trace` — Hutchinson's estimator ``tr H = E[v^T H v]`` with
  Rademacher ``v`` (Hutchinson 1989; Avron & Toledo 2011).
* :func:`hessian_vector_product` — one product, for tests and custom methods.

All three work over all trainable parameters or a chosen subset (``params=``:
the Hessian block of those parameters, the others held fixed), take the
train/eval mode as an explicit argument, draw their random vectors from a
seeded generator, and leave the model exactly as found (see
:mod:`normlab.lab.probes._common`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import asdict, dataclass, field

import torch
from torch import Tensor, nn

from normlab.lab.probes._common import Batch, Evaluator, LossSpec, dot, norm, objective, probing, select_params

__all__ = ["hessian_eigenvalues", "hessian_trace", "hessian_vector_product", "HessianEigen", "HessianTrace"]


@dataclass(frozen=True)
class HessianEigen:
    """Result of :func:`hessian_eigenvalues`.

    ``eigenvalues[j]`` is the Rayleigh quotient ``v^T H v`` at the last
    iterate of the ``j``-th power iteration (in order found: decreasing
    magnitude); ``iterations[j]`` the Hessian-vector products it took;
    ``converged[j]`` whether the relative change fell below ``tol`` within
    ``max_iter``; ``eigenvectors[j]`` (if asked for) the unit eigenvector as a
    list of tensors shaped like ``params``.
    """

    eigenvalues: list[float]
    iterations: list[int]
    converged: list[bool]
    params: list[str]
    eigenvectors: list[list[Tensor]] | None = field(default=None, repr=False)

    def as_dict(self) -> dict:
        d = asdict(self)
        d.pop("eigenvectors")
        return d


@dataclass(frozen=True)
class HessianTrace:
    """Result of :func:`hessian_trace`: ``trace`` = mean of ``samples`` (each ``v^T H v``); ``stderr`` its s.e.."""

    trace: float
    stderr: float
    num_samples: int
    samples: list[float] = field(repr=False)
    params: list[str] = field(repr=False)

    def as_dict(self) -> dict:
        return asdict(self)


class _HVP:
    """``v -> H v`` at the model's current parameters, from one forward and one differentiable backward."""

    def __init__(self, ev: Evaluator, names: list[str]) -> None:
        self.names = names
        self.loss, grads, leaves = ev.gradient(names, create_graph=True)
        self.leaves = list(leaves.values())
        self.shapes = [p.shape for p in self.leaves]
        # gradients that do not depend on the parameters (loss linear in them) have no graph: their rows of H are 0
        self._live = [i for i, g in enumerate(grads) if g.requires_grad]
        self._grads = [grads[i] for i in self._live]
        self.count = 0

    def __call__(self, v: list[Tensor]) -> list[Tensor]:
        self.count += 1
        if not self._live:
            return [torch.zeros_like(p) for p in self.leaves]
        with torch.enable_grad():
            hv = torch.autograd.grad(
                self._grads,
                self.leaves,
                grad_outputs=[v[i] for i in self._live],
                retain_graph=True,
                allow_unused=True,
                materialize_grads=True,
            )
        return [h.detach() for h in hv]


def _random(shapes, like: list[Tensor], gen: torch.Generator, kind: str) -> list[Tensor]:
    """Random vectors drawn on the CPU from ``gen`` (reproducible on any device), then moved to the parameters'."""
    out = []
    for s, p in zip(shapes, like):
        if kind == "gaussian":
            t = torch.randn(s, generator=gen, dtype=torch.float64)
        else:  # Rademacher: +-1 with probability 1/2
            t = torch.randint(0, 2, s, generator=gen, dtype=torch.int64).to(torch.float64).mul_(2).sub_(1)
        out.append(t.to(device=p.device, dtype=p.dtype))
    return out


def _axpy(a: float, x: list[Tensor], y: list[Tensor]) -> list[Tensor]:
    return [yi + a * xi for xi, yi in zip(x, y)]


def _scale(a: float, x: list[Tensor]) -> list[Tensor]:
    return [a * xi for xi in x]


def _project_out(v: list[Tensor], basis: list[list[Tensor]]) -> list[Tensor]:
    for u in basis:
        v = _axpy(-dot(u, v), u, v)
    return v


def _setup(model, loss, batch, params):
    fn = objective(model, loss, batch)
    names = select_params(model, params)
    return fn, names


def hessian_vector_product(
    model: nn.Module,
    loss: LossSpec,
    batch: Batch | None = None,
    *,
    vector: list[Tensor] | dict[str, Tensor],
    mode: str,
    params: Iterable[str | Tensor] | None = None,
) -> list[Tensor]:
    """``H v`` for the loss Hessian ``H`` over ``params`` (default: all trainable), one tensor per parameter.

    ``vector`` is a list of tensors shaped like the selected parameters (in
    ``named_parameters`` order, or the order of ``params=``) or a dict by name.
    """
    fn, names = _setup(model, loss, batch, params)
    if isinstance(vector, dict):
        missing = [n for n in names if n not in vector]
        if missing:
            raise KeyError(f"vector has no entry for {', '.join(missing)}")
        vector = [vector[n] for n in names]
    with probing(model, mode):
        ev = Evaluator(model, fn)
        op = _HVP(ev, names)
        if len(vector) != len(names) or any(v.shape != s for v, s in zip(vector, op.shapes)):
            want = ", ".join(f"{n}{tuple(s)}" for n, s in zip(names, op.shapes))
            raise ValueError(f"vector must hold one tensor per parameter, shaped {want}")
        return op([v.to(device=p.device, dtype=p.dtype) for v, p in zip(vector, op.leaves)])


def hessian_eigenvalues(
    model: nn.Module,
    loss: LossSpec,
    batch: Batch | None = None,
    *,
    mode: str,
    k: int = 1,
    params: Iterable[str | Tensor] | None = None,
    tol: float = 1e-4,
    max_iter: int = 100,
    seed: int = 0,
    return_vectors: bool = False,
) -> HessianEigen:
    """The ``k`` Hessian eigenvalues of largest magnitude, by power iteration on Hessian-vector products.

    For ``j = 1..k``: start from a Gaussian vector (seeded) with the ``j - 1``
    eigenvectors already found projected out and normalise; iterate
    ``w = P H v``, ``lambda = v . w``, ``v = w / |w|`` where ``P`` projects out the
    found eigenvectors (deflation: ``P H P`` has ``H``'s spectrum with the found
    eigenvalues replaced by 0; in exact arithmetic this is Hotelling's
    ``H - sum_j lambda_j u_j u_j^T``). Stop when ``|lambda_t - lambda_{t-1}| <=
    tol * |lambda_{t-1}|`` or after ``max_iter`` products.

    Power iteration converges to the eigenvalue of largest *magnitude*, with its
    sign: at a point where ``H`` has a negative eigenvalue larger in magnitude
    than the largest positive one, that negative value is returned first. The
    convergence rate is ``|lambda_{j+1} / lambda_j|`` per step, so nearly
    degenerate eigenvalues need more iterations (check ``converged``).
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if max_iter < 1 or tol <= 0:
        raise ValueError(f"need max_iter >= 1 and tol > 0, got max_iter={max_iter}, tol={tol}")
    fn, names = _setup(model, loss, batch, params)
    gen = torch.Generator().manual_seed(seed)
    with probing(model, mode):
        op = _HVP(Evaluator(model, fn), names)
        dim = sum(math.prod(s) for s in op.shapes)
        if k > dim:
            raise ValueError(f"k={k} exceeds the number of parameters selected ({dim})")
        vals, iters, conv, vecs = [], [], [], []
        for _ in range(k):
            v = _project_out(_random(op.shapes, op.leaves, gen, "gaussian"), vecs)
            v = _scale(1.0 / norm(v), v)
            lam, prev, done, it = 0.0, None, False, 0
            for it in range(1, max_iter + 1):  # noqa: B007 - `it` is read after the loop (iterations used)
                w = _project_out(op(v), vecs)
                lam = dot(v, w)
                wn = norm(w)
                if wn == 0.0:  # v lies in the null space of the deflated operator
                    done = True
                    break
                v = _scale(1.0 / wn, w)
                if prev is not None and abs(lam - prev) <= tol * abs(prev):
                    done = True
                    break
                prev = lam
            vals.append(lam)
            iters.append(it)
            conv.append(done)
            vecs.append(v)
    vectors = [[t.detach().clone() for t in u] for u in vecs] if return_vectors else None
    return HessianEigen(vals, iters, conv, names, vectors)


def hessian_trace(
    model: nn.Module,
    loss: LossSpec,
    batch: Batch | None = None,
    *,
    mode: str,
    num_samples: int = 100,
    params: Iterable[str | Tensor] | None = None,
    seed: int = 0,
) -> HessianTrace:
    """Hutchinson's estimate of ``tr H``: the mean of ``v^T H v`` over ``num_samples`` Rademacher vectors (seeded).

    Unbiased; the variance of one sample is ``2 (|H|_F^2 - sum_i H_ii^2)``, so
    a diagonal Hessian is estimated exactly by every sample. ``stderr`` is the
    sample standard deviation over ``sqrt(num_samples)`` (0 for one sample).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    fn, names = _setup(model, loss, batch, params)
    gen = torch.Generator().manual_seed(seed)
    with probing(model, mode):
        op = _HVP(Evaluator(model, fn), names)
        samples = []
        for _ in range(num_samples):
            v = _random(op.shapes, op.leaves, gen, "rademacher")
            samples.append(dot(v, op(v)))
    m = len(samples)
    mean = sum(samples) / m
    sd = math.sqrt(sum((s - mean) ** 2 for s in samples) / (m - 1)) if m > 1 else 0.0
    return HessianTrace(mean, sd / math.sqrt(m), m, samples, names)
