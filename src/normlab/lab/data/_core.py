"""The :class:`Dataset` record, the loader registry and the shared steps of every loader.

Every loader returns raw numpy arrays (:class:`Raw`); :func:`load_dataset`
then applies the same steps to all of them, in this order:

1. ``n_train`` / ``n_test``: a seeded, class-stratified subset (for loaders
   that do not generate exactly that many samples themselves);
2. standardisation with *training* statistics: per channel over (N, *spatial)
   for images and signals, per feature over the real (unmasked) positions for
   sequences, per feature for vectors; padded positions are set to 0 afterwards;
3. conversion to float32 / int64 tensors on the CPU.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from normlab.registry import Registry, check_options

__all__ = ["Dataset", "Raw", "load_dataset", "dataset_names", "register_dataset", "stratified_subset"]

KINDS = ("image", "signal", "sequence", "vector")


@dataclass(frozen=True, eq=False)
class Dataset:
    """A classification dataset held in memory as tensors.

    ``x_*`` are float32 ``(N, *input_shape)`` standardised with the training
    statistics ``mean``/``std`` (each shaped to broadcast against one sample,
    e.g. (C, 1, 1) for images; ``x_raw = x * std + mean``); ``y_*`` are int64
    ``(N,)`` class indices in ``[0, num_classes)``. Sequences carry
    ``mask_*`` of shape (N, S), True at real positions, False at padding.
    """

    name: str
    x_train: Tensor  # float32, (N, *input_shape)
    y_train: Tensor  # int64, (N,)
    x_test: Tensor  # float32, (M, *input_shape)
    y_test: Tensor  # int64, (M,)
    num_classes: int
    input_shape: tuple[int, ...]  # (C, H, W) images, (C, L) signals, (S, D) sequences, (D,) vectors
    kind: str  # "image" | "signal" | "sequence" | "vector"
    mask_train: Tensor | None = None  # bool, (N, S); True = real position
    mask_test: Tensor | None = None  # bool, (M, S)
    mean: Tensor | None = field(default=None)  # the training mean that was subtracted (broadcasts against a sample)
    std: Tensor | None = field(default=None)  # the training std that was divided by

    def __repr__(self) -> str:
        masked = ", masked" if self.mask_train is not None else ""
        return (
            f"Dataset({self.name!r}, kind={self.kind!r}, input_shape={self.input_shape}, "
            f"num_classes={self.num_classes}, n_train={len(self.y_train)}, n_test={len(self.y_test)}{masked})"
        )


@dataclass
class Raw:
    """What a loader returns: numpy arrays before subsetting and standardisation."""

    x_train: np.ndarray  # (N, *input_shape), any real dtype
    y_train: np.ndarray  # (N,) integer labels
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    kind: str
    mask_train: np.ndarray | None = None  # (N, S) bool
    mask_test: np.ndarray | None = None


DATASETS: Registry[Callable[..., Raw]] = Registry("dataset")


def register_dataset(name: str):
    """Register ``loader(*, seed, data_dir, **options) -> Raw`` under ``name`` (a decorator).

    A loader that accepts ``n_train``/``n_test`` itself generates exactly that
    many samples; otherwise :func:`load_dataset` takes a stratified subset.
    """
    return DATASETS.register(name)


def dataset_names() -> list[str]:
    """The registered dataset names, sorted."""
    return DATASETS.names()


def _options(loader: Callable) -> list[str]:
    return [p for p in inspect.signature(loader).parameters if p not in ("seed", "data_dir")]


def load_dataset(
    name: str,
    *,
    seed: int = 0,
    data_dir=None,
    n_train: int | None = None,
    n_test: int | None = None,
    standardize: bool = True,
    **kw,
) -> Dataset:
    """Load a registered dataset into memory; deterministic given ``seed``.

    ``seed`` fixes the train/test split (digits), the generated data
    (synthetic sets) and the ``n_train``/``n_test`` subsets; MNIST-1D is always
    the package's canonical set (its own seed 42). ``data_dir`` is where CIFAR
    files live. ``**kw`` are the dataset's own options (see each loader's
    docstring; an unknown option raises and lists the valid ones).
    """
    key = DATASETS.canonical(name)
    loader = DATASETS.get(key)
    options = _options(loader)
    check_options(f"load_dataset({key!r})", kw, options + ["n_train", "n_test", "standardize"])
    for label, n in (("n_train", n_train), ("n_test", n_test)):
        if n is not None and (not isinstance(n, (int, np.integer)) or isinstance(n, bool) or n < 1):
            raise ValueError(f"{label} must be a positive int or None, got {n!r}")
    generated = {k: v for k, v in (("n_train", n_train), ("n_test", n_test)) if k in options and v is not None}
    raw = loader(seed=seed, data_dir=data_dir, **generated, **kw)
    if raw.kind not in KINDS:
        raise ValueError(f"loader for {key!r} returned kind={raw.kind!r}; expected one of {KINDS}")

    rng = np.random.default_rng([int(seed), 0x5EED])
    parts = {}
    for split, n in (("train", n_train), ("test", n_test)):
        x, y, m = getattr(raw, f"x_{split}"), getattr(raw, f"y_{split}"), getattr(raw, f"mask_{split}")
        if n is not None and f"n_{split}" not in generated:
            if n > len(y):
                raise ValueError(
                    f"n_{split}={n} but {key!r} has only {len(y)} {split}ing samples; use n_{split} <= {len(y)}"
                )
            idx = stratified_subset(y, n, rng)
            x, y, m = x[idx], y[idx], (None if m is None else m[idx])
        parts[split] = (x, y, m)

    (xtr, ytr, mtr), (xte, yte, mte) = parts["train"], parts["test"]
    mean = std = None
    if standardize:
        xtr, xte, mean, std = _standardize(xtr, xte, raw.kind, mtr, mte)
    to_mask = lambda m: None if m is None else torch.as_tensor(np.ascontiguousarray(m), dtype=torch.bool)  # noqa: E731
    return Dataset(
        name=key,
        x_train=torch.as_tensor(np.ascontiguousarray(xtr, dtype=np.float32)),
        y_train=torch.as_tensor(np.ascontiguousarray(ytr, dtype=np.int64)),
        x_test=torch.as_tensor(np.ascontiguousarray(xte, dtype=np.float32)),
        y_test=torch.as_tensor(np.ascontiguousarray(yte, dtype=np.int64)),
        num_classes=int(raw.num_classes),
        input_shape=tuple(int(s) for s in xtr.shape[1:]),
        kind=raw.kind,
        mask_train=to_mask(mtr),
        mask_test=to_mask(mte),
        mean=None if mean is None else torch.as_tensor(mean, dtype=torch.float32),
        std=None if std is None else torch.as_tensor(std, dtype=torch.float32),
    )


def stratified_subset(y: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """Indices of ``n`` samples drawn without replacement, each class in proportion to its frequency.

    Class ``c`` with ``n_c`` of the ``N`` samples gets ``floor(n * n_c / N)``
    places, and the places left over go to the classes with the largest
    remainders (ties broken at random), as in a stratified split. Returned sorted.
    """
    y = np.asarray(y)
    classes, counts = np.unique(y, return_counts=True)
    exact = n * counts / len(y)
    alloc = np.floor(exact).astype(np.int64)
    left = n - int(alloc.sum())
    order = np.lexsort((rng.permutation(len(classes)), -(exact - alloc)))
    alloc[order[:left]] += 1
    picks = [rng.choice(np.flatnonzero(y == c), size=k, replace=False) for c, k in zip(classes, alloc)]
    return np.sort(np.concatenate(picks))


def _standardize(xtr, xte, kind: str, mtr, mte):
    """Subtract the training mean and divide by the training std; returns float32 arrays and the statistics.

    Statistics are accumulated in float64, two passes, in chunks of samples
    (CIFAR-10 in float64 would need 1.2 GB at once).
    """
    if kind == "sequence":  # per feature over the real positions of (N, S, D)
        x64 = np.asarray(xtr, dtype=np.float64)
        w = (np.ones(x64.shape[:2]) if mtr is None else mtr.astype(np.float64))[..., None]
        count = w.sum()
        mean = (x64 * w).sum(axis=(0, 1), keepdims=True) / count
        std = np.sqrt((((x64 - mean) * w) ** 2).sum(axis=(0, 1), keepdims=True) / count)
    else:  # images/signals: per channel over (N, *spatial); vectors: per feature over N
        axes = (0,) + tuple(range(2, xtr.ndim)) if kind in ("image", "signal") else (0,)
        mean = _chunked_sum(xtr, axes, lambda c: c) / _count(xtr, axes)
        std = np.sqrt(_chunked_sum(xtr, axes, lambda c: (c - mean) ** 2) / _count(xtr, axes))
    std = np.where(std > 1e-12, std, 1.0)  # constant features stay constant (at 0)
    out = []
    for x, m in ((xtr, mtr), (xte, mte)):
        y = np.empty(x.shape, dtype=np.float32)
        for i in range(0, len(x), _CHUNK):
            y[i : i + _CHUNK] = (np.asarray(x[i : i + _CHUNK], dtype=np.float64) - mean) / std
        if m is not None:
            y *= m[..., None]  # padding back to exactly 0
        out.append(y)
    return out[0], out[1], mean[0], std[0]


_CHUNK = 2048  # samples per chunk when standardising


def _count(x, axes) -> int:
    return int(np.prod([x.shape[a] for a in axes]))


def _chunked_sum(x, axes, f):
    total = 0.0
    for i in range(0, len(x), _CHUNK):
        total = total + f(np.asarray(x[i : i + _CHUNK], dtype=np.float64)).sum(axis=axes, keepdims=True)
    return total
