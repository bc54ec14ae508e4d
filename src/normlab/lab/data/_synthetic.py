"""Class-conditional Gaussian data of any size: images and variable-length sequences.

Both are generated from ``numpy.random.default_rng(seed)``, so the same seed
gives the same task *and* the same samples; another seed gives another task.
Labels are balanced (``n // K`` or one more per class) and shuffled.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from normlab.lab.data._core import Raw, register_dataset

__all__: list[str] = []


def _balanced_labels(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    return rng.permutation(np.arange(n) % k).astype(np.int64)


def _check_positive(**values) -> None:
    for name, v in values.items():
        if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
            raise ValueError(f"{name} must be a positive int, got {v!r}")


@register_dataset("synthetic-images")
def _synthetic_images(
    *,
    seed: int,
    data_dir=None,
    n_train: int = 2000,
    n_test: int = 1000,
    channels: int = 3,
    size: int | tuple[int, int] = 16,
    num_classes: int = 10,
    separation: float = 0.15,
    noise: float = 1.0,
    template_size: int = 4,
) -> Raw:
    """Images ``x = template[y] + noise * N(0, I)`` of shape (channels, H, W).

    Each class template is a smooth random image: a (channels, t, t) Gaussian
    grid (``t = template_size``) bilinearly upsampled to (H, W) and scaled to
    root-mean-square ``separation``. The per-pixel signal-to-noise ratio is
    ``separation / noise``; the distance between two class means is about
    ``separation * sqrt(2 * channels * H * W)`` noise units.
    """
    h, w = (size, size) if isinstance(size, (int, np.integer)) else tuple(size)
    _check_positive(
        n_train=n_train,
        n_test=n_test,
        channels=channels,
        H=h,
        W=w,
        num_classes=num_classes,
        template_size=template_size,
    )
    rng = np.random.default_rng([int(seed), 0x1A6E])
    grid = torch.from_numpy(rng.standard_normal((num_classes, channels, template_size, template_size)))
    templates = F.interpolate(grid, size=(h, w), mode="bilinear", align_corners=False).numpy()  # (K, C, H, W)
    rms = np.sqrt((templates**2).mean(axis=(1, 2, 3), keepdims=True))
    templates = templates / rms * separation

    def sample(n: int):
        y = _balanced_labels(n, num_classes, rng)
        x = templates[y] + noise * rng.standard_normal((n, channels, h, w))  # (n, C, H, W)
        return x.astype(np.float32), y

    xtr, ytr = sample(n_train)
    xte, yte = sample(n_test)
    return Raw(xtr, ytr, xte, yte, num_classes=num_classes, kind="image")


@register_dataset("synthetic-sequences")
def _synthetic_sequences(
    *,
    seed: int,
    data_dir=None,
    n_train: int = 2000,
    n_test: int = 1000,
    seq_len: int = 32,
    dim: int = 16,
    num_classes: int = 4,
    min_len: int = 8,
    separation: float = 0.2,
    noise: float = 1.0,
    gain_spread: float = 0.5,
) -> Raw:
    """Variable-length sequences (seq_len, dim) with a padding mask; the class sets the token mean.

    Sample ``n`` has length ``L_n ~ Uniform{min_len, ..., seq_len}`` and
    tokens ``x[n, t] = g_n * (mu[y_n] + noise * N(0, I))`` for ``t < L_n``,
    where ``mu[k]`` is a random direction of root-mean-square ``separation``
    and ``g_n = exp(gain_spread * N(0, 1))`` a per-sequence gain (a nuisance
    that a per-sample norm removes and a per-feature norm does not).
    Positions ``t >= L_n`` are padding: zero, with ``mask[n, t] = False``.
    """
    _check_positive(n_train=n_train, n_test=n_test, seq_len=seq_len, dim=dim, num_classes=num_classes, min_len=min_len)
    if min_len > seq_len:
        raise ValueError(f"min_len={min_len} must be <= seq_len={seq_len}")
    rng = np.random.default_rng([int(seed), 0x5E0])
    mu = rng.standard_normal((num_classes, dim))
    mu = mu / np.sqrt((mu**2).mean(axis=1, keepdims=True)) * separation  # (K, D)

    def sample(n: int):
        y = _balanced_labels(n, num_classes, rng)
        lengths = rng.integers(min_len, seq_len + 1, size=n)
        mask = np.arange(seq_len)[None, :] < lengths[:, None]  # (n, S)
        gain = np.exp(gain_spread * rng.standard_normal((n, 1, 1)))
        x = gain * (mu[y][:, None, :] + noise * rng.standard_normal((n, seq_len, dim)))  # (n, S, D)
        x = x * mask[..., None]
        return x.astype(np.float32), y, mask

    xtr, ytr, mtr = sample(n_train)
    xte, yte, mte = sample(n_test)
    return Raw(xtr, ytr, xte, yte, num_classes=num_classes, kind="sequence", mask_train=mtr, mask_test=mte)
