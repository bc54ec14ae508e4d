"""Mini-batches straight from in-memory tensors: seeded shuffles, whole-batch augmentation."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["Batches", "Augment", "ORDERS"]

ORDERS = ("shuffled", "class-sorted")  # how Batches composes an epoch's batches (see Batches)


@dataclass(frozen=True)
class Augment:
    """Light augmentation of a whole batch of images (N, C, H, W) or signals (N, C, L).

    ``flip``: each sample reversed along its last axis (horizontal flip) with
    probability 1/2. ``pad``: each sample shifted by a random crop of its
    zero-padded version (``pad`` zeros on each side of every spatial axis,
    offsets uniform in ``[0, 2 * pad]``); 0 disables, ``None`` picks
    ``max(1, round(size / 8))`` from the last axis (4 for 32-pixel images).
    Zero padding is the mean of standardised data. All randomness comes from
    the ``generator`` passed in; the work is a few tensor ops per batch.
    """

    flip: bool = True
    pad: int | None = None

    @classmethod
    def parse(cls, spec: str | Augment | Callable | None) -> Augment | Callable | None:
        """``None``, ``"flip"``, ``"crop"``, ``"flip+crop"`` (or ``"flip-crop"``), an :class:`Augment`,
        or any ``f(x, generator) -> x``."""
        if spec is None or isinstance(spec, Augment) or (callable(spec) and not isinstance(spec, str)):
            return spec
        named = {
            "flip": cls(flip=True, pad=0),
            "crop": cls(flip=False, pad=None),
            "flip+crop": cls(flip=True, pad=None),
        }
        key = spec.lower().replace("-", "+").replace("crop+flip", "flip+crop") if isinstance(spec, str) else None
        if key in named:
            return named[key]
        raise ValueError(
            f"augment must be None, one of {sorted(named)}, an Augment or a callable(x, generator); got {spec!r}"
        )

    def __call__(self, x: Tensor, generator: torch.Generator) -> Tensor:
        if x.dim() not in (3, 4):
            raise ValueError(f"Augment works on images (N, C, H, W) or signals (N, C, L), got shape {tuple(x.shape)}")
        n = x.shape[0]
        channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
        flip = (torch.rand(n, generator=generator) < 0.5) if self.flip else None
        pad = self.pad if self.pad is not None else max(1, round(x.shape[-1] / 8))
        if pad > 0:
            x = _crop_flip(x, pad, flip, generator)
        elif flip is not None:
            x = torch.where(flip.to(x.device).view(-1, *([1] * (x.dim() - 1))), x.flip(-1), x)
        return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _crop_flip(x: Tensor, pad: int, flip: Tensor | None, generator: torch.Generator) -> Tensor:
    """Random crop of the zero-padded batch back to the input size, flipping the chosen samples, by one gather.

    Sample ``n`` becomes ``xp[n, :, oy + i, ox + j]`` (``xp`` zero-padded by
    ``pad``), or ``xp[n, :, oy + i, ox + W - 1 - j]`` when flipped: a flip of
    the sample followed by a crop at the mirrored offset, which is as likely.
    """
    n, c = x.shape[:2]
    spatial = x.shape[2:]
    dev = x.device
    xp = F.pad(x, (pad, pad) * len(spatial))  # (N, C, *[s + 2 pad])
    offsets = torch.randint(0, 2 * pad + 1, (len(spatial), n), generator=generator)  # (ndim, N)
    w = spatial[-1]
    j = torch.arange(w)
    cols = offsets[-1][:, None] + (j if flip is None else torch.where(flip[:, None], w - 1 - j, j))  # (N, W)
    if len(spatial) == 1:
        index = cols  # (N, L)
    else:
        h, wp = spatial[0], w + 2 * pad
        rows = offsets[0][:, None] + torch.arange(h)  # (N, H)
        index = (rows[:, :, None] * wp + cols[:, None, :]).reshape(n, -1)  # (N, H * W) into the flat padded plane
    index = index.to(dev)[:, None, :].expand(n, c, index.shape[-1])
    out = xp.reshape(n, c, -1).gather(2, index)  # (N, C, prod(spatial))
    return out.view(x.shape)


class Batches:
    """Iterate over mini-batches of ``(x, y)`` — or ``(x, y, mask)`` when ``mask`` is given.

    The tensors are moved to ``device`` once; each batch is then one
    indexing op per tensor (keeping channels-last) (a slice, without copying, when
    ``shuffle=False``), never a per-sample Python loop.

    * Shuffling is seeded: epoch ``e`` uses a ``torch.Generator`` seeded from
      ``(seed, e)``, so the order of every epoch is reproducible and an
      interrupted run resumes with :meth:`set_epoch`. Each ``iter()`` runs
      the next epoch.
    * Every index appears exactly once per epoch; ``drop_last=True`` drops
      the final short batch (its samples are the ones skipped that epoch).
    * ``augment`` (``None``, ``"flip"``, ``"crop"``, ``"flip+crop"``, an
      :class:`Augment` or ``f(x, generator) -> x``) is applied to each whole
      batch with the epoch's generator. ``len()`` is the number of batches.
    * ``order="class-sorted"`` (with ``shuffle=True``) makes batches that do
      *not* represent the distribution: each epoch the samples are sorted by
      their label ``y`` (random order within a class), cut into batches, and the
      batches are visited in random order. Every batch then holds one class
      (two where a class ends), while the sequence of batches stays shuffled.
      ``"shuffled"`` (the default) is a uniform random permutation.

    Shapes: ``x`` (N, *input_shape), ``y`` (N,), ``mask`` (N, S).
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        batch_size: int,
        *,
        mask: Tensor | None = None,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        augment: str | Augment | Callable | None = None,
        device: torch.device | str | None = None,
        order: str = "shuffled",
    ) -> None:
        if not isinstance(x, Tensor) or not isinstance(y, Tensor):
            raise TypeError(f"Batches expects tensors x and y, got {type(x).__name__} and {type(y).__name__}")
        n = x.shape[0] if x.dim() else 0
        if y.shape[:1] != (n,) or (mask is not None and mask.shape[:1] != (n,)):
            got = f"x {tuple(x.shape)}, y {tuple(y.shape)}"
            got += f", mask {tuple(mask.shape)}" if mask is not None else ""
            raise ValueError(f"Batches: x, y (and mask) must have the same first dimension N; got {got}")
        if not isinstance(batch_size, (int, np.integer)) or isinstance(batch_size, bool) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        if n == 0:
            raise ValueError("Batches: the dataset is empty")
        if order not in ORDERS:
            raise ValueError(f"order={order!r} is not one of: {', '.join(map(repr, ORDERS))}")
        if order == "class-sorted" and (y.dim() != 1 or y.is_floating_point() or not shuffle):
            raise ValueError(
                f"order='class-sorted' needs integer class labels y of shape (N,) and shuffle=True; "
                f"got y {y.dtype} {tuple(y.shape)}, shuffle={shuffle}"
            )
        if drop_last and n < batch_size:
            raise ValueError(
                f"drop_last=True with {n} samples and batch_size={batch_size} leaves no batch; lower batch_size"
            )
        self.augment = Augment.parse(augment)
        if isinstance(self.augment, Augment) and x.dim() not in (3, 4):
            raise ValueError(
                f"augment={augment!r} applies to images (N, C, H, W) or signals (N, C, L); x is {tuple(x.shape)}"
            )
        self.device = torch.device(device) if device is not None else x.device
        self.x = x.to(self.device)
        self.y = y.to(self.device)
        self.mask = None if mask is None else mask.to(self.device)
        self.batch_size = int(batch_size)
        self.shuffle = shuffle
        self.seed = int(seed)
        self.drop_last = drop_last
        self.order = order
        self.epoch = 0

    def __len__(self) -> int:
        n = self.x.shape[0]
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    @property
    def num_samples(self) -> int:
        """Samples seen per epoch (all of them unless ``drop_last``)."""
        return len(self) * self.batch_size if self.drop_last else self.x.shape[0]

    def set_epoch(self, epoch: int) -> None:
        """Make the next ``iter()`` produce epoch ``epoch`` (0-based)."""
        self.epoch = int(epoch)

    def generator(self, epoch: int) -> torch.Generator:
        """The CPU generator that drives epoch ``epoch``'s shuffle and augmentation."""
        state = np.random.SeedSequence([self.seed, int(epoch)]).generate_state(1, dtype=np.uint64)[0]
        return torch.Generator().manual_seed(int(state) & 0x7FFF_FFFF_FFFF_FFFF)

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        g = self.generator(self.epoch)
        self.epoch += 1
        n, bs = self.x.shape[0], self.batch_size
        order = torch.randperm(n, generator=g) if self.shuffle else None
        visit = range(len(self))
        if order is not None and self.order == "class-sorted":
            order = order[torch.sort(self.y.cpu()[order], stable=True).indices]  # by class, random within a class
            visit = torch.randperm(len(self), generator=g).tolist()  # the batches in random order
        order = order.to(self.device) if order is not None else None
        for b in visit:
            if order is None:
                sl = slice(b * bs, (b + 1) * bs)
                xb, yb = self.x[sl], self.y[sl]
                mb = None if self.mask is None else self.mask[sl]
            else:
                idx = order[b * bs : (b + 1) * bs]
                xb, yb = self.x[idx], self.y[idx]  # (unlike index_select, keeps channels-last)
                mb = None if self.mask is None else self.mask[idx]
            if self.augment is not None:
                xb = self.augment(xb, g)
            yield (xb, yb) if mb is None else (xb, yb, mb)

    def __repr__(self) -> str:
        return (
            f"Batches(n={self.x.shape[0]}, batch_size={self.batch_size}, batches={len(self)}, shuffle={self.shuffle}, "
            f"seed={self.seed}, drop_last={self.drop_last}, augment={self.augment!r}, order={self.order!r}, "
            f"device={self.device})"
        )
