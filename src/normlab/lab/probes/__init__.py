"""Instruments that measure the quantities the claims are about; each leaves the model exactly as found.

Every probe that runs a model takes it with either a loss closure
(``probe(model, closure, mode=...)``, the closure runs ``model`` and returns a
scalar) or a loss function and a batch (``probe(model, loss_fn, (x, y),
mode=...)``, the objective ``loss_fn(model(x), y)``), and the train/eval mode as
a required argument (BN's mode changes the function being probed). Tensors
go to the model's device. No probe writes to the model: parameters, buffers
(BN running statistics and ``num_batches_tracked`` included), ``.grad``,
``requires_grad`` flags, every submodule's train/eval flag, the hooks and the
global RNG state are as before afterwards (see :mod:`normlab.lab.probes._common`).

=====================================  =======================================================  ==============
probe                                   measures                                                 source
=====================================  =======================================================  ==============
:func:`hessian_eigenvalues`             top-k Hessian eigenvalues (power iteration, deflation)   C4
:func:`hessian_trace`                   Hessian trace (Hutchinson, Rademacher)                   C4
:func:`gradient_landscape`              loss, gradient change, effective beta along -gradient    C4, Santurkar 2018
:func:`loss_slice_1d` / ``_2d``         loss on filter-normalised random directions              Li et al. 2018
:func:`layer_input_stats`               |E[xx^T]|_1 with/without centring, optimal shift         C5
:func:`residual_stats`                  skip/branch variance, signal propagation per block       C9, De & Smith 2020
:func:`bn_path_distribution` & co.      output variance over residual path lengths               C10, Veit et al. 2016
:func:`internal_covariate_shift`        |G - G'| and cos(G, G') per layer                        C15, Santurkar 2018
:func:`input_moments` / ``distribution_shift``  movement of layer-input mean/variance            C15
:func:`saturation`, :func:`gradient_norms`  saturated sigmoid/tanh units, per-layer |grad|       C14
:class:`NoisyBatchNorm`                 BN + injected time-varying noise ("noisybatchnorm")      C15
=====================================  =======================================================  ==============

``NoisyBatchNorm`` lives with the layers (:mod:`normlab.layers.noisy`,
registered as ``"noisybatchnorm"``) and is re-exported here.
"""

from normlab.lab.probes.activations import (
    BlockStats,
    ChannelStats,
    LayerInputStats,
    ShiftOptimum,
    blocks_as_arrays,
    distribution_shift,
    find_blocks,
    input_moments,
    layer_input_stats,
    minimize_shift_objective,
    residual_stats,
    shift_objective,
)
from normlab.lab.probes.hessian import (
    HessianEigen,
    HessianTrace,
    hessian_eigenvalues,
    hessian_trace,
    hessian_vector_product,
)
from normlab.lab.probes.ics import LayerICS, internal_covariate_shift
from normlab.lab.probes.landscape import (
    GradientLandscape,
    LossSlice,
    gradient_landscape,
    loss_slice_1d,
    loss_slice_2d,
    random_direction,
)
from normlab.lab.probes.paths import (
    PathSimulation,
    bn_path_distribution,
    branch_shares,
    brute_force_path_distribution,
    cumulative_share,
    mean_path_length,
    path_length_distribution,
    paths_needed,
    simulate_path_lengths,
    variance_recursion,
)
from normlab.lab.probes.saturation import SaturationStats, gradient_norms, relative_derivative, saturation
from normlab.layers.noisy import NoisyBatchNorm

__all__ = [
    # hessian
    "hessian_eigenvalues",
    "hessian_trace",
    "hessian_vector_product",
    "HessianEigen",
    "HessianTrace",
    # landscape
    "gradient_landscape",
    "GradientLandscape",
    "random_direction",
    "loss_slice_1d",
    "loss_slice_2d",
    "LossSlice",
    # activations
    "layer_input_stats",
    "LayerInputStats",
    "ShiftOptimum",
    "shift_objective",
    "minimize_shift_objective",
    "residual_stats",
    "find_blocks",
    "blocks_as_arrays",
    "BlockStats",
    "ChannelStats",
    "input_moments",
    "distribution_shift",
    # paths
    "branch_shares",
    "variance_recursion",
    "path_length_distribution",
    "bn_path_distribution",
    "cumulative_share",
    "paths_needed",
    "mean_path_length",
    "simulate_path_lengths",
    "PathSimulation",
    "brute_force_path_distribution",
    # issue 9
    "internal_covariate_shift",
    "LayerICS",
    "saturation",
    "SaturationStats",
    "relative_derivative",
    "gradient_norms",
    "NoisyBatchNorm",
]
