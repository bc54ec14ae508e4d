"""A tiny pre-norm Transformer that classifies (S, D) sequences, with padding masks throughout."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normlab.lab.models._common import build_norm, make_activation, register_model, takes_mask
from normlab.registry import NormSpec

__all__ = ["TransformerClassifier", "TransformerBlock", "SelfAttention"]


class SelfAttention(nn.Module):
    """Multi-head self-attention; padded keys (``mask`` False) get no attention.

    Input (N, S, d_model), ``mask`` (N, S) bool with True at real positions;
    output (N, S, d_model). Queries at padded positions still produce outputs
    (attending to the real keys); the classifier's pooling ignores them.
    """

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        if d_model % heads:
            raise ValueError(f"d_model={d_model} must be divisible by heads={heads}")
        self.heads = heads
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.proj = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        n, s, d = x.shape
        q, k, v = self.qkv(x).view(n, s, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # 3 x (N, h, S, dh)
        attn_mask = None if mask is None else mask[:, None, None, :]  # (N, 1, 1, S): True = may attend
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)  # (N, h, S, dh)
        return self.proj(y.transpose(1, 2).reshape(n, s, d))


class TransformerBlock(nn.Module):
    """Pre-norm block: ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``; norms get ``mask`` if they take one."""

    def __init__(
        self,
        d_model: int,
        heads: int,
        mlp_ratio: float,
        norm_layer: NormSpec,
        activation: str,
        dropout: float,
        mask_norm_stats: bool,
    ) -> None:
        super().__init__()
        self.norm1 = build_norm(norm_layer, d_model, -1)
        self.attn = SelfAttention(d_model, heads)
        self.norm2 = build_norm(norm_layer, d_model, -1)
        hidden = max(1, round(mlp_ratio * d_model))
        self.mlp = nn.Sequential(nn.Linear(d_model, hidden), make_activation(activation), nn.Linear(hidden, d_model))
        self.dropout = nn.Dropout(dropout)
        self.mask_norm_stats = mask_norm_stats

    def _norm(self, layer: nn.Module, x: Tensor, mask: Tensor | None) -> Tensor:
        if mask is not None and self.mask_norm_stats and takes_mask(layer):
            return layer(x, mask=mask)
        return layer(x)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        x = x + self.dropout(self.attn(self._norm(self.norm1, x, mask), mask))
        return x + self.dropout(self.mlp(self._norm(self.norm2, x, mask)))


@register_model("transformer")
class TransformerClassifier(nn.Module):
    """Linear embedding + learned positions -> ``depth`` pre-norm blocks -> norm -> masked mean -> Linear.

    Input ``x`` (N, S, D) with ``in_shape=(S, D)`` (shorter sequences are
    fine; ``max_len`` defaults to S), optional ``mask`` (N, S) bool, True at
    real positions. Output logits (N, num_classes). Norms are
    ``make_norm(norm_layer, d_model, feature_dim=-1)``: "layernorm" and
    "rmsnorm" normalise each token over its features; "batchnorm" each
    feature over the (N, S) positions, and receives ``mask`` so padding stays
    out of its statistics (``mask_norm_stats=False`` lets padding in, to
    measure what that does). Attention never looks at padded keys and the
    mean pooling averages real positions only.
    """

    def __init__(
        self,
        *,
        in_shape: tuple[int, ...],
        num_classes: int,
        norm_layer: NormSpec = "layernorm",
        d_model: int = 64,
        depth: int = 2,
        heads: int = 4,
        mlp_ratio: float = 2.0,
        activation: str = "gelu",
        dropout: float = 0.0,
        max_len: int | None = None,
        mask_norm_stats: bool = True,
    ) -> None:
        super().__init__()
        if len(in_shape) != 2:
            raise ValueError(f"transformer needs in_shape (S, D) for sequences, got {in_shape}")
        if depth < 0 or d_model < 1:
            raise ValueError(f"transformer needs depth >= 0 and d_model >= 1, got depth={depth}, d_model={d_model}")
        seq_len, d_in = in_shape
        self.max_len = max_len or seq_len
        self.embed = nn.Linear(d_in, d_model)
        self.pos = nn.Parameter(torch.randn(1, self.max_len, d_model) * 0.02)
        self.blocks = nn.ModuleList(
            TransformerBlock(d_model, heads, mlp_ratio, norm_layer, activation, dropout, mask_norm_stats)
            for _ in range(depth)
        )
        self.norm = build_norm(norm_layer, d_model, -1)
        self.head = nn.Linear(d_model, num_classes)
        self.mask_norm_stats = mask_norm_stats

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        n, s, _ = x.shape
        if s > self.max_len:
            raise ValueError(f"sequence length {s} exceeds max_len={self.max_len}; build the model with max_len >= {s}")
        if mask is not None and (mask.shape != (n, s) or mask.dtype != torch.bool):
            raise ValueError(
                f"mask must be a bool tensor of shape (N, S) = {(n, s)}, got {mask.dtype} {tuple(mask.shape)}"
            )
        h = self.embed(x) + self.pos[:, :s]  # (N, S, d_model)
        for block in self.blocks:
            h = block(h, mask)
        if mask is not None and self.mask_norm_stats and takes_mask(self.norm):
            h = self.norm(h, mask=mask)
        else:
            h = self.norm(h)
        if mask is None:
            pooled = h.mean(1)
        else:
            w = mask.to(h.dtype).unsqueeze(-1)  # (N, S, 1)
            pooled = (h * w).sum(1) / w.sum(1).clamp(min=1.0)  # (N, d_model)
        return self.head(pooled)
