""" "Noisy" BatchNorm: BN followed by deliberately injected, time-varying distributional shift.

Santurkar et al. 2018 (§2.1, Fig. 2) test whether BN helps *because* it keeps
layer-input distributions stable: they inject noise with non-zero mean and
non-unit variance after every BN layer, redrawn at every step, and find the
network still trains about as well as with plain BN (CLAIMS.md C15). This
layer does that. In training, per call (one call per layer per step):

1. standardise with the batch statistics, exactly as :class:`normlab.BatchNorm`
   (the running statistics are updated as usual, from the clean batch);
2. draw, per channel ``c``, a shift mean ``mu_c ~ U(0, 2 k m)`` and a noise
   scale ``sigma_c ~ U(0, 2 k s)`` (``m = noise_mean``, ``s = noise_std``,
   ``k = strength``): the noise *distribution* changes every step;
3. per element, with ``xi, zeta ~ N(0, 1)`` independent:
   ``z = xhat * (1 + sigma_c xi) + mu_c + sigma_c zeta`` (multiplicative noise
   of mean 1 and variance ``sigma_c^2``, additive noise of mean ``mu_c`` and
   variance ``sigma_c^2``);
4. apply the affine ``y = weight * z + bias`` (or, with ``after_affine=True``,
   apply the affine first and the noise to its output: noise "after the BN layer").

For a standardised channel (mean 0, variance 1) the noise gives, over
elements and steps, ``E[z] = k m`` and ``Var[z] = 1 + (8/3) k^2 s^2 + (1/3) k^2 m^2``
(within one step the channel's mean is ``mu_c`` and its variance
``1 + 2 sigma_c^2``; ``E[sigma_c^2] = (4/3) k^2 s^2``, ``Var[mu_c] = (1/3) k^2 m^2``).

In eval mode (and when ``frozen``), or with ``strength=0``, it is exactly
BatchNorm. The noise comes from the global torch RNG, like dropout, so
seeding torch seeds it. The layer is random by design: sweeps that
gradcheck every registered norm in train mode must skip it (``stochastic = True``).

Registered as ``"noisybatchnorm"`` (with ``import normlab``). Lives with the
layers; the C15 experiment and the probes use it by name.
"""

from __future__ import annotations

import torch
from torch import Tensor

from normlab import functional as NF
from normlab.layers.batchnorm import BatchNorm

__all__ = ["NoisyBatchNorm"]


class NoisyBatchNorm(BatchNorm):
    """BatchNorm with per-step noise after standardising (Santurkar et al. 2018's "noisy BatchNorm").

    Arguments as :class:`normlab.BatchNorm`, plus keyword-only ``noise_mean``
    (``m``, default 0.5), ``noise_std`` (``s``, default 0.5), ``strength`` (``k``,
    default 1.0, scales both) and ``after_affine`` (default False). See the
    module docstring for the exact noise. ``state_dict`` keys equal
    ``torch.nn.BatchNorm*d``'s.
    """

    stochastic = True

    def __init__(
        self,
        num_features: int,
        *args,
        noise_mean: float = 0.5,
        noise_std: float = 0.5,
        strength: float = 1.0,
        after_affine: bool = False,
        **kwargs,
    ) -> None:
        super().__init__(num_features, *args, **kwargs)
        for name, v in (("noise_mean", noise_mean), ("noise_std", noise_std), ("strength", strength)):
            if not isinstance(v, (int, float)) or v < 0:
                raise ValueError(f"NoisyBatchNorm: {name} must be a non-negative number, got {v!r}")
        self.noise_mean = float(noise_mean)
        self.noise_std = float(noise_std)
        self.strength = float(strength)
        self.after_affine = bool(after_affine)

    def extra_repr(self) -> str:
        return super().extra_repr() + (
            f", noise_mean={self.noise_mean}, noise_std={self.noise_std}, strength={self.strength}"
            + (", after_affine=True" if self.after_affine else "")
        )

    def _noise(self, z: Tensor, dim: int) -> Tensor:
        c = z.shape[dim]
        shape = [1] * z.dim()
        shape[dim] = c
        k = self.strength
        opts = {"device": z.device, "dtype": z.dtype}
        mu = (torch.rand(c, **opts) * (2 * k * self.noise_mean)).view(shape)  # (1, C, 1, ...) per channel, this step
        sigma = (torch.rand(c, **opts) * (2 * k * self.noise_std)).view(shape)
        xi = torch.randn_like(z)  # per element
        zeta = torch.randn_like(z)
        return z * (1 + sigma * xi) + mu + sigma * zeta

    def _train_forward(self, input: Tensor, dim: int, mask: Tensor | None):
        if not self.training or self.strength == 0:  # batch statistics outside training, or no noise: BatchNorm
            return super()._train_forward(input, dim, mask)
        w, b = (self.weight, self.bias) if self.after_affine else (None, None)
        y, mean, var, count = NF.batch_norm_train(input, w, b, self.eps, feature_dim=dim, mask=mask)
        y = self._noise(y, dim)  # the running statistics come from the clean batch
        if not self.after_affine:
            shape = [1] * input.dim()
            shape[dim] = self.num_features
            if self.weight is not None:
                y = y * self.weight.view(shape)
            if self.bias is not None:
                y = y + self.bias.view(shape)
        return y, [(mean, var, count)]
