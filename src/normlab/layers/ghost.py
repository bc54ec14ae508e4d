"""Ghost BatchNorm (Hoffer, Hubara & Soudry, 2017): BatchNorm over virtual batches inside a batch.

In training the batch (axis 0) is split into consecutive *virtual* ("ghost")
batches of ``virtual_batch_size`` samples (the last one may be smaller, as
with :meth:`torch.Tensor.split`), and each is normalised with its own mean
and biased variance — exactly ``torch.cat([F.batch_norm(c, ..., training=True)
for c in x.split(virtual_batch_size)])``. The running statistics are updated
once per virtual batch, in order, by the layer's momentum convention (so
``num_batches_tracked`` counts virtual batches); feeding the batch whole or in
micro-batches that hold whole virtual batches gives the same running
statistics. Eval mode (and ``frozen``) use the running statistics, as BatchNorm.

Built on :func:`normlab.functional.batch_norm_train`, hence twice differentiable.

Shape: input (N, C, *) for ``feature_dim=1`` or (N, ..., C) for
``feature_dim=-1``; the batch axis is always 0; output as input.
"""

from __future__ import annotations

import torch
from torch import Tensor

from normlab.layers.batchnorm import BatchNorm

__all__ = ["GhostBatchNorm"]


class GhostBatchNorm(BatchNorm):
    """BatchNorm whose training statistics are those of each virtual batch of ``virtual_batch_size`` samples.

    Arguments as :class:`normlab.BatchNorm`, plus keyword-only ``virtual_batch_size``
    (default 32; a batch no larger than it is ordinary BatchNorm). ``state_dict``
    keys equal those of ``torch.nn.BatchNorm*d``.
    """

    def __init__(self, num_features: int, *args, virtual_batch_size: int = 32, **kwargs) -> None:
        super().__init__(num_features, *args, **kwargs)
        if not isinstance(virtual_batch_size, int) or virtual_batch_size < 1:
            raise ValueError(f"GhostBatchNorm: virtual_batch_size must be a positive int, got {virtual_batch_size!r}")
        self.virtual_batch_size = virtual_batch_size

    def extra_repr(self) -> str:
        return super().extra_repr() + f", virtual_batch_size={self.virtual_batch_size}"

    def _train_forward(self, input: Tensor, dim: int, mask: Tensor | None):
        if dim == 0:
            raise ValueError(
                "GhostBatchNorm: the batch axis 0 is split into virtual batches, so it cannot be the feature axis; "
                "pass feature_dim=1 for (N, C, *) or feature_dim=-1 for (N, ..., C)"
            )
        vbs = self.virtual_batch_size
        if input.shape[0] <= vbs:  # one virtual batch: ordinary BatchNorm
            return super()._train_forward(input, dim, mask)
        per_sample = input[:1].numel() // self.num_features
        last = input.shape[0] % vbs or vbs
        if last * per_sample <= 1:
            raise ValueError(
                f"GhostBatchNorm: a batch of {input.shape[0]} samples leaves a last virtual batch of {last} sample(s) "
                f"with one value per feature (virtual_batch_size={vbs}); use a batch size that is not 1 more than a "
                f"multiple of {vbs}, or another virtual_batch_size"
            )
        chunks = input.split(vbs, 0)
        masks = mask.split(vbs, 0) if mask is not None else (None,) * len(chunks)
        out, stats = [], []
        for xc, mc in zip(chunks, masks):  # each (n_v, ...) with n_v <= vbs
            y, chunk_stats = super()._train_forward(xc, dim, mc)
            out.append(y)
            stats += chunk_stats
        return torch.cat(out, 0), stats  # cat keeps a channels-last layout
