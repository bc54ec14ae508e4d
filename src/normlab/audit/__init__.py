"""Find the normalisation pitfalls in any PyTorch model: ``normlab.audit(model, batches) -> AuditReport``.

Works on any ``torch.nn.Module``: ``torch.nn``'s norm layers, normlab's, and
third-party ("timm-style") classes recognised by name and attributes (a class
whose name contains ``BatchNorm`` and that has ``running_mean``/``num_features``,
``InstanceNorm``, ``GroupNorm`` with ``num_groups``, ``LayerNorm``, ``RMSNorm``;
a class with ``Frozen`` in its name, or normlab's ``frozen=True``, is a frozen
BN that always uses its running statistics). The behavioural checks also take
any module without submodules that has ``running_*`` buffers or a ``momentum``
attribute, whatever its class is called.

Three kinds of checks:

* **Static** — from the modules, their attributes and the module graph. The
  graph is traced with :mod:`torch.fx` (norm, dropout, conv and linear layers
  as leaves); when the model cannot be traced it is recorded with forward hooks
  on the first batch (then only direct module-to-module connections are seen:
  a tensor passing through a plain function such as ``torch.relu`` breaks the
  link, so the hook graph can miss findings; and a second use of a conv's
  output by a plain function, as in ``bn(y) + y``, is invisible to it, so there
  ``bias-before-norm`` can be reported although the bias is not redundant).
* **Dynamic** — from the inputs the norm layers receive on a few ``batches``,
  measured by forward hooks while the model runs in the modes it is in.
* **Behavioural** — what a norm layer *does*, not what its attributes say: at
  its first call on the first batch, a deep copy of the layer is run on the
  same input in training mode (in float64 when it allows) from known running
  statistics, and then in eval mode (:mod:`~normlab.audit.behaviour`). Nothing
  about a hand-written or third-party layer is trusted.

Nothing in the model changes: during the forward passes every buffer of every
module is swapped for a copy (so train-mode BN, or any layer that updates a
buffer, updates the copy) and the originals are put back afterwards; the
passes run under ``torch.no_grad()`` with the RNG state forked (dropout draws
no numbers from the caller's generator); hooks are removed; no mode, flag,
parameter or gradient is touched — also when the model raises. The
behavioural checks run on deep copies (made without copying the model's hooks
or autograd graphs), with their own forked RNG.

What the model is audited *for* (``expect``) is the mode of the root module
unless given: a model in ``eval()`` is checked as a model about to be
evaluated, one in ``train()`` as a model about to be trained.

Checks (id — severity — what is computed, threshold and why):

===========================  ========  ================================================================
``bias-before-norm``         info      a conv/linear with a bias whose output goes only into a BN or
                                       InstanceNorm (or GroupNorm with one channel per group) with as
                                       many features: the norm subtracts the per-channel mean, so the
                                       bias is removed (its gradient is 0; β does its job).
``dropout-before-bn``        warning   a dropout (module or ``F.dropout``, p > 0) from which a path
                                       reaches a BN's input without passing another norm layer:
                                       dropout scales the variance of what BN sees in training by up
                                       to 1/(1-p) relative to eval, so the running variance is wrong
                                       at eval ("variance shift", Li et al., CVPR 2019).
``dropout-always-on``        error     ``F.dropout`` called with ``training=True`` in a model traced in
                                       eval mode (``F.dropout``'s default; pass ``training=self.training``).
``momentum-convention``      error     BN whose weight of the new batch is >= 0.9 (0.9/0.99/0.999 are
                                       Keras/Flax/TF *decay* defaults), or a decay-convention layer with
                                       decay <= 0.1 (a PyTorch momentum read as a decay): the running
                                       statistics are >= 90 % the last (micro-)batch.
``momentum-range``           warning   weight of the new batch in (0.5, 0.9) (the last two batches
                                       carry > 75 %), or in (0, 1e-3) (3/w > 3000 batches to forget
                                       95 % of the start); error when it is 0 (statistics never move).
``momentum-cumulative``      info      ``momentum=None``: a cumulative average over every batch since
                                       the last reset, early training included.
``no-running-stats``         warning   eval expected, BN without running statistics
                                       (``track_running_stats=False``): it normalises with the statistics
                                       of each eval batch, so outputs depend on what else is in the batch.
``untrained-running-stats``  error     eval expected, running statistics still exactly their initial
                                       values (mean 0, variance 1, ``num_batches_tracked == 0``), and no
                                       batches to compare them with.
``frozen-affine-live-stats`` warning   train expected, a train-mode BN whose γ/β are all frozen
                                       (``requires_grad=False``; with ``affine=False``, the conv/linear
                                       feeding it) but which still updates and normalises with batch
                                       statistics: the classic frozen backbone whose BN keeps moving.
``mode-mismatch``            error/    eval expected: a norm layer using batch statistics because it is
                             warning   in train mode, or a dropout in train mode (error: eval outputs
                                       depend on the batch / are random). Train expected: a BN in eval
                                       mode whose γ/β still train (warning: trained against statistics
                                       that never move; say so with ``normlab.freeze`` if meant).
``groupnorm-groups``         error/    GroupNorm whose groups do not divide the channels (error), or with
                             warning   fewer than ``min_channels_per_group`` (2) channels per group, i.e.
                                       InstanceNorm (warning: the weakest variant against GN's 32 groups
                                       in Wu & He 2018, Table 1, ResNet-50 on ImageNet).
``nonfinite-buffers``        error     NaN/inf in running statistics, γ or β, or a negative running variance.
``dead-channels``            warning   channels with |γ| < 1e-3 x the layer's median |γ| (their output is
                                       the constant β), or a running variance below the layer's eps (the
                                       input was constant in training; eval divides any deviation by
                                       ~sqrt(eps)).
``zero-gamma``               info      every γ of a layer exactly 0 (a zero-initialised residual branch:
                                       fine at initialisation, a dead branch after training).
``exploding-channels``       warning   running variance > 1e6 (std > 1000): activations upstream have
                                       blown up, and values that large overflow float16 (max 65504).
``running-stats-mismatch``   warning/  (batches) the running statistics against the statistics of the
                             error     layer's inputs on the batches: per channel the standardised mean
                                       difference ``(mean_data - running_mean) / sqrt(running_var + eps)``
                                       (the mean of the eval-normalised activation; 0 when they agree)
                                       and the variance ratio ``(var_data + eps) / (running_var + eps)``
                                       (1 when they agree). Warning when the root-mean-square SMD over
                                       channels exceeds 0.5 or the rms |ln ratio| exceeds ln 2; error
                                       beyond 2 and ln 10. Needs >= 16 samples: a channel mean from n
                                       independent samples has a standard error of 1/sqrt(n) standard
                                       deviations, so with 16 the rms SMD of perfect running statistics is
                                       about 0.25 at most, half the threshold. Audited for training, only
                                       layers that normalise with their running statistics (frozen or in
                                       eval mode) are compared: the others do not use them yet.
``small-batch``              error/    (batches) a BN normalising with batch statistics on batches of
                             warning   <= 2 samples (error) or < 8 (warning): ResNet-50 with BN on
                                       ImageNet goes from 23.6 % error at 32 images per batch to 34.7 %
                                       at 2 (GN: 24.1 % at both; Wu & He 2018). The line at 8 is a
                                       judgement between those endpoints, not a measured optimum.
``nonfinite-activations``    error     (batches) the first norm layer (in call order) whose input holds NaN/inf.
``single-value-groups``      error     (batches) a GroupNorm/InstanceNorm group holding one value per sample:
                                       it normalises to 0 and the output is β, whatever the input.
``momentum-mismatch``        error     (batches) the measured weight of the new batch in ``running_mean``
                                       (one training forward of a copy from known statistics) differs from
                                       what the declared ``momentum`` means in PyTorch's convention (or the
                                       layer's own ``momentum_convention``/``debias``; 0 if frozen) by more
                                       than 1e-3 + 1 %; the likely cause is named (a decay-convention update
                                       under a PyTorch-style attribute, an overwrite, no update, several).
``buffer-autograd``          error     a floating buffer that requires grad or has a ``grad_fn``: in the
                                       model as it is, or (batches) in a copy after a training forward whose
                                       input requires grad. The update runs outside ``torch.no_grad()``: the
                                       graph grows with each step, deepcopy fails, eval backward breaks.
``running-var-biased``       info      (batches) ``running_var`` received the biased batch variance (/n),
                                       PyTorch's name for the unbiased one (/(n-1)); decided when one of the
                                       two is within a tenth of their distance.
``affine-per-sample``        error     (batches) a parameter of a norm whose first axis has the batch's size
                                       and whose entry 0 changes sample 0's output only: per sample, not per
                                       normalised feature.
``eval-per-position``        error     (batches) a layer with running statistics whose eval output does not
                                       move with its input when the samples are shuffled and the other
                                       non-feature axes rolled (relative change > 1e-9 in float64): the
                                       statistics are broadcast against the wrong axis.
``eval-batch-dependent``     error     (batches) a layer with running statistics whose eval output for the
                                       first half of a batch changes when the other half is left out.
===========================  ========  ================================================================

Not detected: statistics from the last micro-batch only. Under gradient
accumulation each micro-batch makes its own running-statistics update, so the
statistics weigh the last micro-batch most; nothing in a model's state says
whether that happened, and the batches an audit sees need not be the ones the
statistics came from. What *is* reported is the consequence for a large
momentum (``momentum-convention``: the statistics are essentially the last
(micro-)batch's), the small normalisation batch (``small-batch``, when the
audit is given micro-batches in train mode) and any gap the statistics leave
(``running-stats-mismatch``). The fix is :func:`normlab.accumulate_stats`.

The package: :mod:`~normlab.audit.run` (``audit()``: the steps of one audit),
:mod:`~normlab.audit.report` (check ids, thresholds, findings, the report),
:mod:`~normlab.audit.kinds` (what a layer is), :mod:`~normlab.audit.graph`
(the module graph), :mod:`~normlab.audit.recording` (what is recorded while
the model runs), :mod:`~normlab.audit.static` and :mod:`~normlab.audit.dynamic`
(the checks), :mod:`~normlab.audit.behaviour` (the probes of copies and
their checks), :mod:`~normlab.audit.cli` (``normlab audit``). ``normlab.audit``
is the function; import the rest from here, e.g.
``from normlab.audit import Thresholds``.
"""

from __future__ import annotations

from normlab.audit.cli import audit_main
from normlab.audit.report import CHECKS, SEVERITIES, AuditReport, Finding, Thresholds
from normlab.audit.run import audit

__all__ = ["audit", "AuditReport", "Finding", "Thresholds", "CHECKS", "SEVERITIES", "audit_main"]
