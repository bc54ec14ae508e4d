"""Plain-autograd reference implementations: the textbook formulas, differentiated by autograd.

Slow on purpose and short enough to check by eye; the tests compare the fast
path (``normlab.functional``) with these as well as with ``torch.nn.functional``,
and use them where PyTorch has no counterpart (masked or feature-last BatchNorm).
All return the normalised output; statistics are biased (``unbiased=False``).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["normalize", "batch_norm", "layer_norm", "rms_norm", "group_norm", "instance_norm"]


def normalize(x: Tensor, dims: Sequence[int], eps: float, centered: bool = True) -> Tensor:
    """``(x - mean) / sqrt(var + eps)`` over ``dims`` (or ``x / sqrt(mean(x^2) + eps)`` when not centred)."""
    dims = tuple(dims)
    if centered:
        mean = x.mean(dims, keepdim=True)
        var = x.var(dims, unbiased=False, keepdim=True)
        return (x - mean) / torch.sqrt(var + eps)
    return x / torch.sqrt(x.pow(2).mean(dims, keepdim=True) + eps)


def _affine(y: Tensor, weight: Tensor | None, bias: Tensor | None, shape: Sequence[int]) -> Tensor:
    if weight is not None:
        y = y * weight.view(shape)
    if bias is not None:
        y = y + bias.view(shape)
    return y


def batch_norm(
    x: Tensor, weight=None, bias=None, eps: float = 1e-5, feature_dim: int = 1, mask: Tensor | None = None
) -> Tensor:
    """Training-mode BatchNorm: statistics over every axis but ``feature_dim`` (only masked-in positions)."""
    dim = feature_dim % x.dim()
    dims = [d for d in range(x.dim()) if d != dim]
    shape = [1] * x.dim()
    shape[dim] = x.shape[dim]
    if mask is None:
        y = normalize(x, dims, eps)
    else:
        m = mask.unsqueeze(dim).to(x.dtype)
        n = m.sum()
        mean = (x * m).sum(dims, keepdim=True) / n
        var = (((x - mean) * m) ** 2).sum(dims, keepdim=True) / n
        y = (x - mean) / torch.sqrt(var + eps)
    return _affine(y, weight, bias, shape)


def layer_norm(x: Tensor, normalized_shape: Sequence[int], weight=None, bias=None, eps: float = 1e-5) -> Tensor:
    dims = range(x.dim() - len(normalized_shape), x.dim())
    return _affine(normalize(x, dims, eps), weight, bias, normalized_shape)


def rms_norm(x: Tensor, normalized_shape: Sequence[int], weight=None, eps: float = 1e-5) -> Tensor:
    dims = range(x.dim() - len(normalized_shape), x.dim())
    return _affine(normalize(x, dims, eps, centered=False), weight, None, normalized_shape)


def group_norm(x: Tensor, num_groups: int, weight=None, bias=None, eps: float = 1e-5) -> Tensor:
    n, c = x.shape[:2]
    y = normalize(x.reshape(n, num_groups, -1), [2], eps).view(x.shape)
    return _affine(y, weight, bias, [1, c] + [1] * (x.dim() - 2))


def instance_norm(x: Tensor, weight=None, bias=None, eps: float = 1e-5) -> Tensor:
    c = x.shape[1]
    return _affine(normalize(x, range(2, x.dim()), eps), weight, bias, [1, c] + [1] * (x.dim() - 2))
