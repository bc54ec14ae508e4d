"""Synchronised BatchNorm on ``torch.distributed``: statistics of the global batch.

Under data parallelism each process sees ``n_k`` samples of a global batch of
``N = sum(n_k)``. :class:`SyncBatchNorm` normalises every process's samples with
the statistics of the *global* batch, exactly as a single process holding the
concatenated batch would:

* forward: each process computes its per-channel count ``n_k``, mean ``m_k``
  and sum of squared deviations ``M2_k``; the triples are exchanged (one
  ``all_gather``) and combined by the parallel-variance formula (Chan et al.)

      N = sum n_k,   mean = sum n_k m_k / N,
      M2 = sum M2_k + sum n_k (m_k - mean)^2,   var = M2 / N (biased)

  which is exact for uneven per-process batches and needs no ``E[x^2] - E[x]^2``
  cancellation;
* backward: the two per-channel sums of the analytic BN backward,
  ``sum(g)`` and ``sum(g * (x - mean))``, are all-reduced, so each process gets
  its rows of the global input gradient
  ``dx = weight * invstd * (g - sum(g)/N - (x - mean) * invstd^2 * sum(g (x - mean))/N)``;
  ``weight``/``bias`` gradients stay per process (the sums over the local
  samples), to be summed or averaged by DDP like every other parameter;
* running statistics are updated once per step with the global mean and
  variance (count ``N``), identically on every process, in the layer's
  momentum convention.

Without an initialised process group (or with one process) the layer is plain
:class:`normlab.BatchNorm`. Masks are not synchronised (use them single-process
or pad consistently), and second derivatives across processes are not
supported (the backward's collectives are not recorded by autograd).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from normlab import _kernels as K
from normlab.functional import _column_view
from normlab.layers.base import replace_modules, swap
from normlab.layers.batchnorm import BatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d

__all__ = ["SyncBatchNorm", "convert_sync_batchnorm", "combine_moments", "gather_moments", "is_distributed"]


def is_distributed(group=None) -> bool:
    """True when a ``torch.distributed`` process group with more than one process is active."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


def combine_moments(counts: Tensor, means: Tensor, m2s: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Combine per-part statistics into those of the union (parallel-variance formula).

    ``counts`` (K,), ``means`` (K, C), ``m2s`` (K, C) — ``m2`` is the sum of
    squared deviations from the part's own mean. Returns ``(N, mean (C,),
    biased var (C,))``. Parts with count 0 are ignored.
    """
    n = counts.sum()
    w = (counts / n.clamp(min=1)).unsqueeze(1)  # (K, 1)
    mean = (w * means).sum(0)
    dev = means - mean
    m2 = m2s.sum(0) + (counts.unsqueeze(1) * dev * dev).sum(0)
    return n, mean, m2 / n.clamp(min=1)


def _local_moments(x3: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(count, mean, M2)`` per channel of an (A, C, B) view; zeros for an empty part."""
    a, c, b = x3.shape
    n = a * b
    sdt = K.stat_dtype(x3.dtype)
    if n == 0:
        z = torch.zeros(c, dtype=sdt, device=x3.device)
        return torch.zeros((), dtype=sdt, device=x3.device), z, z.clone()
    mean, var = K.column_mean_var(x3)
    return torch.tensor(float(n), dtype=sdt, device=x3.device), mean, var * n


def gather_moments(count: Tensor, mean: Tensor, m2: Tensor, group=None) -> tuple[Tensor, Tensor, Tensor]:
    """All-gather every process's ``(count, mean, M2)`` and combine them: ``(N, mean, biased var)``.

    A collective: every process of ``group`` must call it, with tensors of the
    same shape. Exchanged and combined in float64 (exact counts, no
    cancellation); returned in ``mean``'s dtype.
    """
    packed = torch.cat([count.reshape(1), mean, m2]).double()  # (2C + 1,)
    parts = [torch.empty_like(packed) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, packed, group=group)
    table = torch.stack(parts)  # (world, 2C + 1)
    c = mean.numel()
    n, mean_all, var_all = combine_moments(table[:, 0], table[:, 1 : c + 1], table[:, c + 1 :])
    return n.to(mean.dtype), mean_all.to(mean.dtype), var_all.to(mean.dtype)


class _SyncColumnNorm(torch.autograd.Function):
    """BatchNorm of an (A, C, B) view with statistics and backward sums reduced across processes.

    ``forward(x3, weight, bias, eps, group) -> (y3, mean, var, count)``; only
    ``y3`` is differentiable.
    """

    @staticmethod
    def forward(ctx, x3: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, group):
        c = x3.shape[1]
        n, mean, var = gather_moments(*_local_moments(x3), group=group)
        if float(n) <= 1:
            raise ValueError(
                f"SyncBatchNorm: expected more than 1 value per feature over all processes in training, got {int(n)}; "
                "use larger per-process batches or switch the layer to eval()"
            )
        invstd = torch.rsqrt(var + eps)
        scale = invstd if weight is None else invstd * weight
        y3 = (x3 - mean.view(1, c, 1).to(x3.dtype)).mul_(scale.view(1, c, 1).to(x3.dtype))  # (A, C, B)
        if bias is not None:
            y3.add_(bias.view(1, c, 1).to(x3.dtype))
        ctx.save_for_backward(x3, weight, bias, mean, invstd)
        ctx.count, ctx.group = float(n), group
        ctx.mark_non_differentiable(mean, var, n)
        return y3, mean, var, n

    @staticmethod
    def backward(ctx, gy3: Tensor, _gmean, _gvar, _gn):
        if torch.is_grad_enabled():
            raise RuntimeError(
                "SyncBatchNorm: second derivatives across processes are not supported; compute Hessian-vector "
                "products single-process (the layer is plain BatchNorm without a process group)"
            )
        x3, weight, bias, mean, invstd = ctx.saved_tensors
        c = x3.shape[1]
        gy3 = gy3.contiguous()
        if x3.numel():
            sum_g, sum_gc = K.column_sums_for_backward(gy3, x3, mean)  # local (C,), (C,)
        else:
            sum_g = sum_gc = torch.zeros(c, dtype=mean.dtype, device=x3.device)
        dw = (sum_gc * invstd).to(weight.dtype) if weight is not None and ctx.needs_input_grad[1] else None
        db = sum_g.to(bias.dtype) if bias is not None and ctx.needs_input_grad[2] else None
        dx = None
        if ctx.needs_input_grad[0]:
            sums = torch.cat([sum_g, sum_gc])
            dist.all_reduce(sums, group=ctx.group)
            n = ctx.count
            g_sum, gc_sum = sums[:c], sums[c:]
            a = invstd if weight is None else invstd * weight
            k = gc_sum * invstd * invstd / n
            # dx = a * (g - sum(g)/N) - a * k * (x - mean)
            dx = (x3 - mean.view(1, c, 1).to(x3.dtype)).mul_((-a * k).view(1, c, 1).to(x3.dtype))
            dx.add_(gy3 * a.view(1, c, 1).to(x3.dtype)).sub_((a * g_sum / n).view(1, c, 1).to(x3.dtype))
        return dx, dw, db, None, None


class SyncBatchNorm(BatchNorm):
    """BatchNorm whose training statistics are those of the batch across all processes.

    Signature as :class:`torch.nn.SyncBatchNorm` plus normlab's keyword-only
    options (``feature_dim``, ``momentum_convention``,
    ``debias``, ``frozen``, ``unbiased_running_var``). Input (N, C, *) for
    ``feature_dim=1``, any layout with the features on ``feature_dim``
    otherwise; output as input. Synchronises only in training mode with an
    active process group of more than one process (any device, gloo included);
    otherwise it is :class:`normlab.BatchNorm`.

    An instance of ``torch.nn.modules.batchnorm._BatchNorm`` but deliberately not
    of ``torch.nn.SyncBatchNorm``: ``DistributedDataParallel`` refuses every
    ``nn.SyncBatchNorm`` on the CPU ("SyncBatchNorm layers only work with GPU
    modules"), and working there is what this layer is for.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group=None,
        device=None,
        dtype=None,
        **kwargs,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device, dtype, **kwargs)
        self.process_group = process_group

    def _train_forward(self, input: Tensor, dim: int, mask: Tensor | None):
        if not (self.training and is_distributed(self.process_group)):
            return super()._train_forward(input, dim, mask)
        if mask is not None:
            raise NotImplementedError(
                "SyncBatchNorm: masked statistics are not synchronised across processes; "
                "drop the mask (pad consistently) or normalise the masked input with normlab.BatchNorm"
            )
        x, weight, bias = input, self.weight, self.bias
        if x.dtype in (torch.float16, torch.bfloat16):  # statistics and arithmetic in float32
            x = x.float()
            weight = None if weight is None else weight.float()
            bias = None if bias is None else bias.float()
        x3, back = _column_view(x, dim)
        y3, mean, var, n = _SyncColumnNorm.apply(x3, weight, bias, self.eps, self.process_group)
        return back(y3).to(input.dtype), [(mean, var, n)]


# torch.nn and normlab classes that become SyncBatchNorm (subclasses with other semantics, such as
# BatchRenorm and GhostBatchNorm, are left alone)
_CONVERTIBLE = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    BatchNorm,
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
)
_OPTIONS = ("momentum_convention", "debias", "frozen", "unbiased_running_var")


def _to_sync(module: nn.Module, process_group) -> SyncBatchNorm:
    kw = {k: getattr(module, k) for k in _OPTIONS if hasattr(module, k)}
    return swap(
        module,
        SyncBatchNorm,
        num_features=module.num_features,
        eps=module.eps,
        momentum=module.momentum,
        affine=module.affine,
        track_running_stats=module.track_running_stats,
        process_group=process_group,
        feature_dim=getattr(module, "feature_dim", 1),
        **kw,
    )


def convert_sync_batchnorm(model: nn.Module, process_group=None) -> nn.Module:
    """Replace every BatchNorm layer of ``model`` by :class:`SyncBatchNorm`, in place; returns the model.

    normlab's counterpart of ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``
    (which also works on normlab's layers, and gives ``torch.nn.SyncBatchNorm``,
    whose synchronised path needs a GPU): this one synchronises on any device
    and backend (gloo on the CPU). Converts ``torch.nn.BatchNorm{1,2,3}d``,
    ``torch.nn.SyncBatchNorm`` and normlab's ``BatchNorm``/``BatchNorm{1,2,3}d``
    (exact types). The new layers take over the very same ``Parameter`` and
    buffer tensors (an optimizer built before still works) and keep the
    train/eval mode and normlab's convention options. A model that *is* a BN
    layer is returned converted (use the return value). Call it before
    wrapping the model in DDP.
    """
    return replace_modules(model, lambda m: _to_sync(m, process_group) if type(m) in _CONVERTIBLE else None)
