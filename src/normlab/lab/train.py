"""One training loop for every experiment: ``train(TrainConfig(...)) -> RunResult``.

A run is fully described by a frozen, typed :class:`TrainConfig`; command-line
style ``key=value`` overrides are parsed into it, type-checked, by
:func:`parse_overrides`::

    from normlab.lab.config import TrainConfig, parse_overrides
    from normlab.lab.train import train
    cfg = parse_overrides(TrainConfig(), ["dataset=digits", "model=mlp", "norm=none", "lr=0.05"])
    result = train(cfg)
    result.final["test_acc"], result.diverged

Conventions
-----------
* The loss is the mean cross-entropy of a batch (nats). ``step_loss[t]`` is
  the training-mode loss of optimizer step ``t`` (0-based), computed *before*
  that step's update.
* Per epoch: ``train_loss`` / ``train_acc`` are the means over that epoch's
  training batches in train mode (weighted by batch size, as seen while
  training); ``test_loss`` / ``test_acc`` are measured in eval mode on the
  whole test set after the epoch. ``eval_train=True`` adds ``train_eval_loss``
  / ``train_eval_acc``: eval mode over the whole training set. Accuracies are
  fractions in [0, 1]; times are seconds.
* Divergence: a step whose loss is not finite or exceeds
  ``config.divergence_loss`` marks the run diverged at that step. The run then
  ends cleanly (a diverged run is a result, not an error): ``step_loss`` stops
  at the diverging step, the model is evaluated once more in whatever state it
  is, and ``diverged`` / ``diverged_step`` record what happened. Losses are
  copied to the host every ``sync_every`` steps (not every step), so up to
  ``sync_every - 1`` further updates may have been applied to the model
  before the loop notices; the recorded step is exact.
* Determinism: the same config (seed included) gives the same numbers on the
  same machine with the same thread count. ``seed`` drives the model's
  initialisation, the shuffling and dropout (``train`` seeds torch's global
  generator with it before building the model); ``data_seed`` the dataset
  itself (generation of synthetic sets, the ``n_train`` subset). On CUDA a
  few kernels are non-deterministic; nothing here forces deterministic ones.
* Models reach norms only through ``norm_layer=`` (a registered name, or
  ``functools.partial(make_norm, name, **norm_kwargs)``); sequence datasets
  pass their padding mask as ``model(x, mask=mask)``.
* Several processes: launched by ``torchrun`` or ``normlab ... --nproc N``,
  ``train`` trains one model with DistributedDataParallel. ``batch_size`` is
  then the global batch (each process takes its slice), BN layers become
  synchronized BN unless ``sync_bn=False``, and the recorded numbers are those
  of the global batch; see :mod:`normlab.lab.launch`.

Speed on a CPU
--------------
Batches are slices of tensors held in memory (:class:`normlab.lab.data.Batches`),
gradients are freed with ``zero_grad(set_to_none=True)``, and the loop copies
losses to the host only every ``sync_every`` steps. Before training,
:func:`tune_allocator` asks glibc's ``malloc`` to keep large blocks instead of
returning them to the kernel: otherwise every fresh activation tensor of a few
megabytes is ``mmap``-ed and page-faulted anew on each step, which costs as
much as the arithmetic (a 32 MB clone takes ~19 ms by default, ~2 ms tuned).
The setting is process-wide, changes no number, and is skipped when the
environment variable ``NORMLAB_TUNE_MALLOC=0`` is set or ``train(...,
tune_malloc=False)`` is passed.
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from normlab.lab.config import ConfigError, TrainConfig
from normlab.lab.runtime import resolve_device, tune_allocator

__all__ = [
    "RunResult",
    "TrainState",
    "train",
    "evaluate",
    "lr_at",
    "load_data",
]


# --------------------------------------------------------------------------- schedule


def lr_at(config: TrainConfig, step: int, steps_per_epoch: int, total_steps: int) -> float:
    """Learning rate at optimizer step ``step`` (0-based): linear warm-up, then the schedule.

    Warm-up: ``lr * (step + 1) / warmup_steps`` for the first
    ``warmup_steps = round(warmup_epochs * steps_per_epoch)`` steps. Then
    "constant" keeps ``lr``; "cosine" decays from ``lr`` to 0 over the
    remaining steps, ``lr * (1 + cos(pi * t / T)) / 2``; "step" multiplies by
    ``lr_decay`` at each epoch in ``lr_milestones`` (default: half and three
    quarters of ``epochs``).
    """
    warm = round(config.warmup_epochs * steps_per_epoch)
    if step < warm:
        return config.lr * (step + 1) / warm
    if config.schedule == "constant":
        return config.lr
    if config.schedule == "cosine":
        span = max(1, total_steps - warm)
        return config.lr * 0.5 * (1.0 + math.cos(math.pi * min(step - warm, span) / span))
    milestones = config.lr_milestones or (0.5 * config.epochs, 0.75 * config.epochs)
    epoch = step / steps_per_epoch
    return config.lr * config.lr_decay ** sum(epoch >= m for m in milestones)


# --------------------------------------------------------------------------- results


@dataclass
class TrainState:
    """What a ``callback`` sees.

    It is called after every optimizer step (``event="step"``) and every epoch's evaluation (``"epoch"``).

    ``loss`` is the step's loss as a 0-d tensor still on the device (reading it
    with ``.item()`` forces a host sync); ``metrics`` is the epoch record. A
    callback that returns ``True`` stops the run cleanly (``stopped_early``).
    """

    event: str  # "step" | "epoch"
    step: int  # optimizer steps taken so far
    epoch: int  # 0-based epoch index
    model: nn.Module
    optimizer: torch.optim.Optimizer
    config: TrainConfig
    loss: Tensor | None = None
    metrics: dict[str, Any] | None = None


@dataclass
class RunResult:
    """The outcome of :func:`train`: curves, final numbers and what happened.

    ``step_loss``: per optimizer step, nats. ``epochs``: one dict per epoch
    (also for a last partial epoch after divergence, ``max_steps`` or an early
    stop) with ``epoch``, ``steps``, ``lr``, ``train_loss``, ``train_acc``,
    ``test_loss``, ``test_acc`` (+ ``train_eval_*``), ``time`` (training
    seconds) and ``eval_time``. ``wall_time``: seconds for the whole call.
    ``model`` (the trained module) is kept for probes and not serialised.
    """

    config: TrainConfig
    step_loss: list[float]
    epochs: list[dict[str, Any]]
    wall_time: float
    diverged: bool
    diverged_step: int | None
    steps: int
    stopped_early: bool
    num_params: int
    device: str
    threads: int
    model: nn.Module | None = field(default=None, repr=False, compare=False)
    world_size: int = 1  # processes that trained the model together (torch.distributed)

    @property
    def final(self) -> dict[str, Any]:
        """The last epoch's record (empty if no epoch ran)."""
        return dict(self.epochs[-1]) if self.epochs else {}

    def summary(self) -> dict[str, Any]:
        """Scalar results: ``final_*`` from the last epoch, divergence, steps, times."""
        out: dict[str, Any] = {
            "diverged": self.diverged,
            "diverged_step": self.diverged_step,
            "steps": self.steps,
            "stopped_early": self.stopped_early,
            "epochs_run": len(self.epochs),
            "wall_time": self.wall_time,
            "num_params": self.num_params,
        }
        if self.world_size > 1:
            out["world_size"] = self.world_size
        for k, v in self.final.items():
            if k not in ("epoch", "steps"):
                out[f"final_{k}"] = v
        finite = [v for v in self.step_loss if math.isfinite(v)]
        out["min_step_loss"] = min(finite) if finite else None
        return out

    def to_metrics(self) -> dict[str, Any]:
        """Everything recorded: ``summary()`` plus ``step_loss`` and ``epochs``."""
        return {**self.summary(), "step_loss": list(self.step_loss), "epochs": [dict(e) for e in self.epochs]}


# --------------------------------------------------------------------------- the loop


def _message(e: BaseException) -> str:
    """An exception's message on one line (KeyError's repr quotes stripped)."""
    text = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
    return " ".join(str(text).split())


def _forward(model: nn.Module, x: Tensor, mask: Tensor | None) -> Tensor:
    return model(x) if mask is None else model(x, mask=mask)


def evaluate(
    model: nn.Module, x: Tensor, y: Tensor, *, mask: Tensor | None = None, batch_size: int = 1000
) -> tuple[float, float]:
    """Mean cross-entropy (nats) and accuracy (fraction) of ``model`` in eval mode over ``(x, y)``.

    The model's train/eval mode is restored afterwards. One host sync at the end.
    """
    was_training = model.training
    model.eval()
    n = x.shape[0]
    total = torch.zeros((), dtype=torch.float64, device=x.device)
    correct = torch.zeros((), dtype=torch.long, device=x.device)
    try:
        with torch.no_grad():
            for i in range(0, n, batch_size):
                out = _forward(model, x[i : i + batch_size], None if mask is None else mask[i : i + batch_size])
                total += F.cross_entropy(out.float(), y[i : i + batch_size], reduction="sum").double()
                correct += (out.argmax(-1) == y[i : i + batch_size]).sum()
    finally:
        model.train(was_training)
    return (total / max(n, 1)).item(), correct.item() / max(n, 1)


def _to_device(t: Tensor | None, device: torch.device, channels_last: bool) -> Tensor | None:
    if t is None:
        return None
    t = t.to(device)
    if channels_last and t.dim() == 4:
        t = t.contiguous(memory_format=torch.channels_last)
    return t


@dataclass(frozen=True)
class _Data:
    """The dataset's tensors on the run's device (images in the requested memory format)."""

    x_train: Tensor
    y_train: Tensor
    x_test: Tensor
    y_test: Tensor
    mask_train: Tensor | None
    mask_test: Tensor | None
    input_shape: tuple[int, ...]
    num_classes: int


def load_data(config: TrainConfig):
    """The dataset :func:`train` trains on for ``config`` (in memory, on the CPU): a ``normlab.lab.data.Dataset``.

    Experiments that probe or evaluate beside training call this, so they see exactly the same data.
    """
    from normlab.lab.data import load_dataset

    kw = dict(config.data_kwargs)
    if config.n_train is not None:
        if kw.get("n_train", config.n_train) != config.n_train:
            raise ConfigError("n_train is set twice (n_train and data_kwargs.n_train); set it once")
        kw["n_train"] = config.n_train
    try:
        return load_dataset(config.dataset, seed=config.data_seed, **kw)
    except (TypeError, ValueError, KeyError) as e:
        raise ConfigError(f"dataset={config.dataset!r}: {_message(e)}") from e


def _load_data(config: TrainConfig, device: torch.device) -> _Data:
    ds = load_data(config)
    cl = config.channels_last
    return _Data(
        x_train=_to_device(ds.x_train, device, cl),
        y_train=ds.y_train.to(device),
        x_test=_to_device(ds.x_test, device, cl),
        y_test=ds.y_test.to(device),
        mask_train=_to_device(ds.mask_train, device, False),
        mask_test=_to_device(ds.mask_test, device, False),
        input_shape=tuple(ds.input_shape),
        num_classes=ds.num_classes,
    )


def _build_model(config: TrainConfig, data: _Data, device: torch.device) -> nn.Module:
    """``build_model`` with the norm given only as ``norm_layer`` (a name, or a partial of ``make_norm``)."""
    from normlab.lab.models import build_model
    from normlab.registry import make_norm

    norm_layer: Any = config.norm
    if config.norm_kwargs:
        norm_layer = functools.partial(make_norm, config.norm, **config.norm_kwargs)
    torch.manual_seed(config.seed)
    try:
        model = build_model(
            config.model,
            in_shape=data.input_shape,
            num_classes=data.num_classes,
            norm_layer=norm_layer,
            **config.model_kwargs,
        )
    except (TypeError, ValueError, KeyError) as e:
        raise ConfigError(f"model={config.model!r} with norm={config.norm!r}: {_message(e)}") from e
    model = model.to(device)
    if config.channels_last:
        model = model.to(memory_format=torch.channels_last)
    return model


def _make_optimizer(config: TrainConfig, model: nn.Module) -> torch.optim.Optimizer:
    if config.optimizer == "sgd":
        return torch.optim.SGD(
            model.parameters(),
            lr=config.lr,
            momentum=config.momentum,
            nesterov=config.nesterov,
            weight_decay=config.weight_decay,
        )
    return torch.optim.Adam(
        model.parameters(), lr=config.lr, betas=tuple(config.betas), weight_decay=config.weight_decay
    )


class _StepLog:
    """Per-step losses and correct counts, kept on the device and copied to the host in blocks.

    ``add`` costs no host sync; ``flush`` copies the pending steps at once and
    scans them for divergence: it records the first step whose loss is
    non-finite or above ``bound``, drops whatever came after it, and returns
    True once the run has diverged.
    """

    def __init__(self, bound: float, reduce: Callable[[Tensor], Tensor] | None = None) -> None:
        self.bound = bound
        self.reduce = reduce  # several processes: sums the stacked per-step pairs over them at each flush
        self.step_loss: list[float] = []
        self.diverged_step: int | None = None
        self.pending: list[Tensor] = []  # per step: (loss, correct), 0-d pairs on the device
        self.sizes: list[int] = []
        self.start_epoch()

    def start_epoch(self) -> None:
        self.loss_sum, self.correct, self.seen = 0.0, 0.0, 0

    def add(self, loss: Tensor, out: Tensor, y: Tensor, n: int | None = None) -> None:
        with torch.no_grad():
            self.pending.append(torch.stack((loss.detach().float(), (out.argmax(-1) == y).sum().float())))
        self.sizes.append(y.shape[0] if n is None else n)

    def flush(self) -> bool:
        if self.pending and self.diverged_step is None:
            table = torch.stack(self.pending)
            if self.reduce is not None:
                table = self.reduce(table)
            for (loss, correct), n in zip(table.tolist(), self.sizes):
                self.step_loss.append(loss)
                self.loss_sum += loss * n
                self.correct += correct
                self.seen += n
                if not math.isfinite(loss) or loss > self.bound:
                    self.diverged_step = len(self.step_loss) - 1
                    break
        self.pending.clear()
        self.sizes.clear()
        return self.diverged_step is not None

    def epoch_means(self) -> dict[str, float]:
        """Size-weighted mean loss and accuracy of this epoch's recorded steps (train mode)."""
        return {"train_loss": self.loss_sum / max(self.seen, 1), "train_acc": self.correct / max(self.seen, 1)}


def train(
    config: TrainConfig,
    *,
    progress: bool = False,
    callback: Callable[[TrainState], bool | None] | None = None,
    tune_malloc: bool = True,
) -> RunResult:
    """Train ``config.model`` with ``config.norm`` on ``config.dataset``; return a :class:`RunResult`.

    See the module docstring for the conventions (losses, accuracies,
    divergence, determinism). ``progress`` shows a tqdm bar over the steps;
    ``callback(state)`` is called after every step and every epoch (return
    ``True`` to stop). ``tune_malloc=False`` leaves the C allocator alone (see
    :func:`tune_allocator`).
    """
    from normlab.lab import launch
    from normlab.lab.data import Batches

    if not isinstance(config, TrainConfig):
        raise TypeError(f"train() needs a TrainConfig, got {type(config).__name__}")
    config.validate()
    start = time.perf_counter()
    if tune_malloc:
        tune_allocator()
    dctx = launch.setup(config.device)  # None unless several processes were launched
    device = dctx.device if dctx is not None else resolve_device(config.device)
    if dctx is not None and config.batch_size < dctx.world_size:
        raise ConfigError(
            f"batch_size={config.batch_size} is the global batch: it must be >= {dctx.world_size} processes"
        )
    old_threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        data = _load_data(config, device)
        model = _build_model(config, data, device)
        num_params = sum(p.numel() for p in model.parameters())
        opt = _make_optimizer(config, model)
        net = dctx.wrap(model, sync_bn=config.sync_bn) if dctx is not None else model
        fwd = torch.compile(net) if config.compile else net
        try:
            batches = Batches(
                data.x_train,
                data.y_train,
                config.batch_size,
                mask=data.mask_train,
                shuffle=True,
                seed=config.seed,
                drop_last=config.drop_last,
                augment=config.augment,
                device=device,
                order=config.batch_order,
            )
        except (TypeError, ValueError) as e:
            raise ConfigError(f"batches: {_message(e)}") from e
        steps_per_epoch = len(batches)
        total_steps = steps_per_epoch * config.epochs
        if config.max_steps is not None:
            total_steps = min(total_steps, config.max_steps)

        log = _StepLog(config.divergence_loss, reduce=dctx.all_reduce_sum if dctx is not None else None)
        epochs: list[dict[str, Any]] = []
        stopped = False
        step = 0
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(
                total=total_steps, desc=f"{config.model}/{config.norm} lr={config.lr:g}", unit="step", leave=False
            )

        for epoch in range(config.epochs):
            if step >= total_steps:
                break
            model.train()
            log.start_epoch()
            t0 = time.perf_counter()
            lr = config.lr
            for batch in batches:
                if step >= total_steps:
                    break
                x, y = batch[0], batch[1]
                mask = batch[2] if len(batch) > 2 else None
                n = y.shape[0]
                if dctx is not None:  # this process's slice of the global batch
                    x, y, mask, n = dctx.shard(x, y, mask)
                lr = lr_at(config, step, steps_per_epoch, total_steps)
                for group in opt.param_groups:
                    group["lr"] = lr
                out = _forward(fwd, x, mask)  # (N, num_classes)
                if dctx is None:
                    loss = logged = F.cross_entropy(out, y)
                else:
                    loss, logged = dctx.loss(out, y, n)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                step += 1
                log.add(logged, out, y, n)
                if bar is not None:
                    bar.update(1)
                if callback is not None:
                    stopped = bool(callback(TrainState("step", step, epoch, model, opt, config, loss=loss.detach())))
                if (len(log.pending) >= config.sync_every and log.flush()) or stopped:
                    break
            log.flush()
            train_time = time.perf_counter() - t0

            t1 = time.perf_counter()
            test_loss, test_acc = evaluate(
                model, data.x_test, data.y_test, mask=data.mask_test, batch_size=config.eval_batch_size
            )
            record: dict[str, Any] = {
                "epoch": epoch,
                "steps": len(log.step_loss),
                "lr": lr,
                **log.epoch_means(),
                "test_loss": test_loss,
                "test_acc": test_acc,
            }
            if config.eval_train:
                tl, ta = evaluate(
                    model, data.x_train, data.y_train, mask=data.mask_train, batch_size=config.eval_batch_size
                )
                record["train_eval_loss"], record["train_eval_acc"] = tl, ta
            record["time"] = train_time
            record["eval_time"] = time.perf_counter() - t1
            epochs.append(record)
            if bar is not None:
                bar.set_postfix(loss=f"{record['train_loss']:.3g}", test_acc=f"{test_acc:.3f}")
            if callback is not None and callback(TrainState("epoch", step, epoch, model, opt, config, metrics=record)):
                stopped = True
            if stopped or log.diverged_step is not None:
                break
        if bar is not None:
            bar.close()
        return RunResult(
            config=config,
            step_loss=log.step_loss,
            epochs=epochs,
            wall_time=time.perf_counter() - start,
            diverged=log.diverged_step is not None,
            diverged_step=log.diverged_step,
            steps=len(log.step_loss),
            stopped_early=stopped,
            num_params=num_params,
            device=str(device),
            threads=torch.get_num_threads(),
            model=model,
            world_size=dctx.world_size if dctx is not None else 1,
        )
    finally:
        torch.set_num_threads(old_threads)
