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
  ``functools.partial(make_norm, name, **norm_kwargs)``, or the class an
  experiment passes as ``train(..., norm_layer=cls)`` for a layer it defines
  without registering it); sequence datasets pass their padding mask as
  ``model(x, mask=mask)``.
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

import dataclasses
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
from normlab.lab.progress import TRAIN_INTERVAL, Progress
from normlab.lab.runtime import check_cpus, resolve_device, tune_allocator

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

    ``step_loss``: per optimizer step, nats. ``per_epoch``: one dict per epoch
    (also for a last partial epoch after divergence, ``max_steps`` or an early
    stop) with ``epoch``, ``steps``, ``lr``, ``train_loss``, ``train_acc``,
    ``test_loss``, ``test_acc`` (+ ``train_eval_*``), ``time`` (training
    seconds) and ``eval_time``; ``epochs`` is the same list (the older name).
    ``wall_time``: seconds for the whole call. ``device``: the device used
    (``"cpu"``, ``"cuda:0"``, ...). ``model`` (the trained module) is kept for
    probes and not serialised. :meth:`to_metrics` is what the run store keeps
    as ``metrics.json`` (see :mod:`normlab.lab.store`).
    """

    config: TrainConfig
    step_loss: list[float]
    per_epoch: list[dict[str, Any]]
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
    def epochs(self) -> list[dict[str, Any]]:
        """The per-epoch records (:attr:`per_epoch`, under the name they had before)."""
        return self.per_epoch

    @property
    def final(self) -> dict[str, Any]:
        """The last epoch's record (empty if no epoch ran)."""
        return dict(self.per_epoch[-1]) if self.per_epoch else {}

    def summary(self) -> dict[str, Any]:
        """Scalar results: ``final_*`` from the last epoch, divergence, steps, times."""
        out: dict[str, Any] = {
            "diverged": self.diverged,
            "diverged_step": self.diverged_step,
            "steps": self.steps,
            "stopped_early": self.stopped_early,
            "epochs_run": len(self.per_epoch),
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
        """Everything recorded: ``summary()`` plus the curves ``step_loss`` and ``per_epoch``."""
        return {**self.summary(), "step_loss": list(self.step_loss), "per_epoch": [dict(e) for e in self.per_epoch]}


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
    except (TypeError, ValueError, KeyError, FileNotFoundError) as e:
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


def _build_model(config: TrainConfig, data: _Data, device: torch.device, layer: Any = None) -> nn.Module:
    """``build_model`` with the norm given only as ``norm_layer`` (a name, or a partial of ``make_norm``).

    ``layer`` (a class or callable) replaces the registered ``config.norm``.
    """
    from normlab.lab.models import build_model
    from normlab.registry import make_norm

    norm_layer: Any = config.norm if layer is None else layer
    if config.norm_kwargs:
        norm_layer = functools.partial(make_norm, norm_layer, **config.norm_kwargs)
    torch.manual_seed(config.seed)
    try:
        model = build_model(
            config.model,
            in_shape=data.input_shape,
            num_classes=data.num_classes,
            norm_layer=norm_layer,
            **config.model_kwargs,
        )
    except (TypeError, ValueError, KeyError, RuntimeError, MemoryError) as e:  # RuntimeError: e.g. cannot allocate
        raise ConfigError(f"model={config.model!r} with norm={config.norm!r}: {_message(e)[:300]}") from e
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


@dataclass
class _Setup:
    """What one run trains: the data, the model (and the module the steps call), the optimizer and the batches."""

    data: _Data
    model: nn.Module  # the module evaluated and returned
    forward: nn.Module  # what the training steps call: the model, wrapped in DDP and/or compiled
    optimizer: torch.optim.Optimizer
    batches: Any  # normlab.lab.data.Batches
    total_steps: int
    num_params: int


@dataclass
class _LoopState:
    """Where the loop is: the step log, the finished epochs' records, the step count, and whether to stop."""

    log: _StepLog
    per_epoch: list[dict[str, Any]] = field(default_factory=list)
    step: int = 0
    stopped: bool = False


def _check_config(config: TrainConfig, norm_layer: Any = None) -> None:
    """The config is a TrainConfig with registered names (its norm only if no layer is given) and threads we have."""
    if not isinstance(config, TrainConfig):
        raise TypeError(f"train() needs a TrainConfig, got {type(config).__name__}")
    if norm_layer is not None and (isinstance(norm_layer, str) or not callable(norm_layer)):
        raise TypeError(f"norm_layer must be a class or callable (a name goes in config.norm), got {norm_layer!r}")
    (config if norm_layer is None else dataclasses.replace(config, norm="none")).validate()
    check_cpus("threads", config.threads)


def _placement(config: TrainConfig):
    """``(distributed context or None, device)``: joins the process group when a launcher started several."""
    from normlab.lab import launch

    dctx = launch.setup(config.device)  # None unless several processes were launched
    device = dctx.device if dctx is not None else resolve_device(config.device)
    if dctx is not None and config.batch_size < dctx.world_size:
        raise ConfigError(
            f"batch_size={config.batch_size} is the global batch: it must be >= {dctx.world_size} processes"
        )
    return dctx, device


def _make_batches(config: TrainConfig, data: _Data, device: torch.device):
    from normlab.lab.data import Batches

    try:
        return Batches(
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


def _smallest_slice(config: TrainConfig, n: int, dctx) -> int:
    """The fewest examples a batch-statistics layer sees in one training step (the last batch, a rank's slice)."""
    sizes = [min(config.batch_size, n)]
    if not config.drop_last and n % config.batch_size:
        sizes.append(n % config.batch_size)
    if dctx is not None and not config.sync_bn:  # each process normalises its own slice
        sizes = [b // dctx.world_size for b in sizes]
    return min(sizes)


def _check_smallest_batch(config: TrainConfig, data: _Data, model: nn.Module, dctx) -> None:
    """Refuse, before training, a batch the model cannot train on (a last batch of one example under BatchNorm).

    The smallest batch is tried once in train mode on a copy of the model
    (random state restored), so the run itself is unchanged.
    """
    n = data.x_train.shape[0]
    k = _smallest_slice(config, n, dctx)
    if k >= 2:
        return
    where = f"{n} training examples and batch_size={config.batch_size}"
    if dctx is not None and not config.sync_bn:
        where += f" on {dctx.world_size} processes with sync_bn=false"
    if _smallest_slice(dataclasses.replace(config, drop_last=True), n, dctx) == k:  # the full batches are the issue
        fix = "use a larger batch_size" + (" (or sync_bn=true)" if dctx is not None and not config.sync_bn else "")
    else:  # the last, partial batch
        fix = "set drop_last=true or a batch_size that leaves no 1-example last batch"
    if k < 1:
        raise ConfigError(f"{where} leave a process with an empty batch; {fix}")
    import copy

    mask = data.mask_train
    with torch.random.fork_rng(devices=[data.x_train.device] if data.x_train.is_cuda else []):
        probe = copy.deepcopy(model).train()
        try:
            _forward(probe, data.x_train[:1], None if mask is None else mask[:1])
        except (ValueError, RuntimeError) as e:
            raise ConfigError(
                f"drop_last={str(config.drop_last).lower()} with {where} gives batches of 1 example, and the model "
                f"cannot train on them ({_message(e).split(';')[0][:200]}); {fix}"
            ) from None


def _prepare(config: TrainConfig, dctx, device: torch.device, norm_layer: Any = None) -> _Setup:
    """Load the data, build the model, its optimizer and the batches, check the smallest batch, wrap the model."""
    data = _load_data(config, device)
    model = _build_model(config, data, device, norm_layer)
    optimizer = _make_optimizer(config, model)
    batches = _make_batches(config, data, device)
    _check_smallest_batch(config, data, model, dctx)
    net = dctx.wrap(model, sync_bn=config.sync_bn) if dctx is not None else model
    total_steps = len(batches) * config.epochs
    if config.max_steps is not None:
        total_steps = min(total_steps, config.max_steps)
    return _Setup(
        data=data,
        model=model,
        forward=torch.compile(net) if config.compile else net,
        optimizer=optimizer,
        batches=batches,
        total_steps=total_steps,
        num_params=sum(p.numel() for p in model.parameters()),
    )


def _train_epoch(config: TrainConfig, setup: _Setup, state: _LoopState, epoch: int, dctx, callback, bar) -> float:
    """One pass over the batches (or up to the step limit, divergence or a stop); returns the last step's lr."""
    opt, log = setup.optimizer, state.log
    steps_per_epoch = len(setup.batches)
    lr = config.lr
    for batch in setup.batches:
        if state.step >= setup.total_steps:
            break
        x, y = batch[0], batch[1]
        mask = batch[2] if len(batch) > 2 else None
        n = y.shape[0]
        if dctx is not None:  # this process's slice of the global batch
            x, y, mask, n = dctx.shard(x, y, mask)
        lr = lr_at(config, state.step, steps_per_epoch, setup.total_steps)
        for group in opt.param_groups:
            group["lr"] = lr
        try:
            out = _forward(setup.forward, x, mask)  # (N, num_classes)
        except (TypeError, ValueError, RuntimeError) as e:
            if state.step > 0:
                raise
            raise ConfigError(  # the very first batch: the model, its norm and the data do not fit together
                f"model={config.model!r} with norm={config.norm!r} cannot run on {config.dataset!r} batches of shape "
                f"{tuple(x.shape)}: {_message(e).split(';')[0][:300]}"
            ) from e
        if dctx is None:
            loss = logged = F.cross_entropy(out, y)
        else:
            loss, logged = dctx.loss(out, y, n)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        state.step += 1
        log.add(logged, out, y, n)
        bar.update(1)
        if callback is not None:
            event = TrainState("step", state.step, epoch, setup.model, opt, config, loss=loss.detach())
            state.stopped = bool(callback(event))
        if (len(log.pending) >= config.sync_every and log.flush()) or state.stopped:
            break
    log.flush()
    return lr


def _evaluate_epoch(config: TrainConfig, setup: _Setup, state: _LoopState, epoch: int, lr: float, train_time: float):
    """The epoch's record: the train-mode means of its steps and the eval-mode test (and train) numbers."""
    data = setup.data
    t1 = time.perf_counter()
    test_loss, test_acc = evaluate(
        setup.model, data.x_test, data.y_test, mask=data.mask_test, batch_size=config.eval_batch_size
    )
    record: dict[str, Any] = {
        "epoch": epoch,
        "steps": len(state.log.step_loss),
        "lr": lr,
        **state.log.epoch_means(),
        "test_loss": test_loss,
        "test_acc": test_acc,
    }
    if config.eval_train:
        tl, ta = evaluate(
            setup.model, data.x_train, data.y_train, mask=data.mask_train, batch_size=config.eval_batch_size
        )
        record["train_eval_loss"], record["train_eval_acc"] = tl, ta
    record["time"] = train_time
    record["eval_time"] = time.perf_counter() - t1
    return record


def train(
    config: TrainConfig,
    *,
    progress: bool | str = False,
    callback: Callable[[TrainState], bool | None] | None = None,
    tune_malloc: bool = True,
    norm_layer: type | Callable[..., nn.Module] | None = None,
) -> RunResult:
    """Train ``config.model`` with ``config.norm`` on ``config.dataset``; return a :class:`RunResult`.

    See the module docstring for the conventions (losses, accuracies,
    divergence, determinism). ``progress`` shows a bar over the steps on a
    terminal, elsewhere a line whenever no progress line was printed for 30 s
    (see :mod:`normlab.lab.progress`). ``callback(state)`` is called after
    every step and every epoch (return ``True`` to stop). ``tune_malloc=False``
    leaves the C allocator alone (see :func:`tune_allocator`). A config this
    machine cannot run (more threads than CPUs, a batch the model cannot train
    on, ...) raises :class:`ConfigError` before any training. ``norm_layer`` (a
    class or callable, as :func:`normlab.make_norm` accepts) builds every norm
    layer in place of the registered ``config.norm``, which then only labels
    the run and is not looked up: for a layer an experiment defines without
    adding it to the registry.
    """
    _check_config(config, norm_layer)
    start = time.perf_counter()
    if tune_malloc:
        tune_allocator()
    dctx, device = _placement(config)
    old_threads = torch.get_num_threads()
    if config.threads is not None:
        torch.set_num_threads(config.threads)
    try:
        setup = _prepare(config, dctx, device, norm_layer)
        state = _LoopState(_StepLog(config.divergence_loss, reduce=dctx.all_reduce_sum if dctx is not None else None))
        bar = Progress(
            setup.total_steps,
            f"{config.model}/{config.norm} lr={config.lr:g}",
            unit="step",
            progress=progress,
            interval=TRAIN_INTERVAL,
            own=False,
            first=False,
            last=False,
            leave=False,
        )
        for epoch in range(config.epochs):
            if state.step >= setup.total_steps:
                break
            setup.model.train()
            state.log.start_epoch()
            t0 = time.perf_counter()
            lr = _train_epoch(config, setup, state, epoch, dctx, callback, bar)
            record = _evaluate_epoch(config, setup, state, epoch, lr, time.perf_counter() - t0)
            state.per_epoch.append(record)
            bar.set_postfix(
                epoch=f"{epoch + 1}/{config.epochs}",
                loss=f"{record['train_loss']:.3g}",
                test_acc=f"{record['test_acc']:.3f}",
            )
            if callback is not None and callback(
                TrainState("epoch", state.step, epoch, setup.model, setup.optimizer, config, metrics=record)
            ):
                state.stopped = True
            if state.stopped or state.log.diverged_step is not None:
                break
        bar.close()
        return RunResult(
            config=config,
            step_loss=state.log.step_loss,
            per_epoch=state.per_epoch,
            wall_time=time.perf_counter() - start,
            diverged=state.log.diverged_step is not None,
            diverged_step=state.log.diverged_step,
            steps=len(state.log.step_loss),
            stopped_early=state.stopped,
            num_params=setup.num_params,
            device=str(device),
            threads=torch.get_num_threads(),
            model=setup.model,
            world_size=dctx.world_size if dctx is not None else 1,
        )
    finally:
        torch.set_num_threads(old_threads)
