"""The training loop: it learns, records divergence without raising, is deterministic; typed overrides."""

from __future__ import annotations

import functools
import math

import pytest
import torch
from torch import nn

import normlab
import normlab.lab.data
from normlab.lab import train as T
from normlab.lab.config import ConfigError, TrainConfig, parse_overrides
from normlab.lab.runtime import tune_allocator
from normlab.lab.train import lr_at, train

SMALL = TrainConfig(
    dataset="digits", model="mlp", model_kwargs={"width": 32, "depth": 2}, norm="batchnorm",
    lr=0.05, epochs=2, batch_size=64, device="cpu",
)  # fmt: skip


def _numbers(r: T.RunResult):
    """Everything numeric a run recorded, without the wall-clock times."""
    drop = ("time", "eval_time")
    return r.step_loss, [{k: v for k, v in e.items() if k not in drop} for e in r.epochs], r.diverged_step


# --------------------------------------------------------------------------- training


def test_smoke_run_on_digits_learns():
    r = train(SMALL)
    assert not r.diverged and r.steps == 2 * (1437 // 64) == len(r.step_loss)
    first, last = sum(r.step_loss[:5]) / 5, sum(r.step_loss[-5:]) / 5
    assert first > 2.0  # ~ln(10) = 2.30 at initialisation
    assert last < 0.5 * first  # the loss falls
    assert r.final["test_acc"] > 0.8  # chance is 0.1 on 10 balanced classes
    assert [e["epoch"] for e in r.epochs] == [0, 1] and r.epochs[1]["steps"] == r.steps
    # per-epoch train loss is the size-weighted mean of that epoch's step losses (equal batches here)
    per_epoch = len(r.step_loss) // 2
    assert r.epochs[1]["train_loss"] == pytest.approx(sum(r.step_loss[per_epoch:]) / per_epoch, rel=1e-12)


def test_evaluation_matches_an_independent_pass():
    r = train(SMALL)
    ds = normlab.lab.data.load_dataset("digits", seed=0)
    model = r.model.eval()
    with torch.no_grad():
        out = model(ds.x_test)
    assert r.final["test_acc"] == pytest.approx((out.argmax(1) == ds.y_test).double().mean().item(), abs=1e-12)
    assert r.final["test_loss"] == pytest.approx(nn.functional.cross_entropy(out, ds.y_test).item(), rel=1e-5)
    assert model.training is False  # we set it; train() leaves the model in train mode itself


def test_same_config_and_seed_give_identical_numbers():
    a, b = train(SMALL), train(SMALL)
    assert _numbers(a) == _numbers(b)
    for pa, pb in zip(a.model.state_dict().values(), b.model.state_dict().values()):
        assert torch.equal(pa, pb)
    c = train(parse_overrides(SMALL, ["seed=1"]))
    assert c.step_loss != a.step_loss  # the seed matters: the test above could fail


def test_divergence_is_recorded_with_its_step_and_does_not_raise():
    cfg = parse_overrides(SMALL, ["norm=none", "lr=50", "momentum=0.9"])
    r = train(cfg)
    assert r.diverged and isinstance(r.diverged_step, int)
    k = r.diverged_step
    bad = r.step_loss[k]
    assert not math.isfinite(bad) or bad > cfg.divergence_loss
    assert all(math.isfinite(v) and v <= cfg.divergence_loss for v in r.step_loss[:k])  # the first bad step
    assert len(r.step_loss) == k + 1 and r.steps == k + 1
    assert len(r.epochs) == 1 and r.summary()["diverged_step"] == k
    # the step found does not depend on how often the loop copies losses to the host
    r1 = train(parse_overrides(cfg, ["sync_every=1"]))
    assert r1.diverged_step == k and r1.step_loss == r.step_loss


def test_loss_bound_counts_as_divergence():
    r = train(parse_overrides(SMALL, ["divergence_loss=2.0"]))  # the first loss is ~2.3 nats
    assert r.diverged and r.diverged_step == 0 and r.step_loss[0] > 2.0


def test_max_steps_and_callback_stop_cleanly():
    r = train(parse_overrides(SMALL, ["max_steps=7"]))
    assert r.steps == 7 and len(r.epochs) == 1 and not r.diverged

    seen = []

    def cb(state: T.TrainState):
        seen.append((state.event, state.step))
        return state.event == "step" and state.step == 25

    r = train(SMALL, callback=cb)
    assert r.stopped_early and r.steps == 25 and len(r.epochs) == 2
    assert ("epoch", 22) in seen and seen[-2:] == [("step", 25), ("epoch", 25)]  # the partial epoch is recorded too


def test_norm_reaches_the_model_only_through_norm_layer(monkeypatch):
    import normlab.lab.models

    got = {}
    real = normlab.lab.models.build_model

    def spy(name, **kw):
        got.update(kw)
        return real(name, **kw)

    monkeypatch.setattr(normlab.lab.models, "build_model", spy)
    r = train(parse_overrides(SMALL, ["norm_kwargs.momentum=0.5", "max_steps=2"]))
    spec = got["norm_layer"]
    assert isinstance(spec, functools.partial) and spec.args == ("batchnorm",) and spec.keywords == {"momentum": 0.5}
    norms = [m for m in r.model.modules() if isinstance(m, normlab.BatchNorm)]
    assert norms and all(m.momentum == 0.5 for m in norms)
    train(parse_overrides(SMALL, ["max_steps=1"]))
    assert got["norm_layer"] == "batchnorm"


class _Halve(nn.Module):
    """Not a registered norm: multiplies by 0.5 (a layer an experiment might define for itself)."""

    def __init__(self, num_features: int, momentum: float = 0.1) -> None:
        super().__init__()
        self.num_features, self.momentum = num_features, momentum

    def forward(self, x):
        return 0.5 * x


def test_a_norm_class_passed_to_train_builds_every_norm_layer_without_registering_it():
    cfg = parse_overrides(SMALL, ["norm=halve", "max_steps=3"])  # "halve" is a label: nobody registered it
    with pytest.raises(ConfigError, match="norm='halve' is not one of"):
        train(cfg)
    r = train(cfg, norm_layer=_Halve)
    layers = [m for m in r.model.modules() if isinstance(m, _Halve)]
    assert len(layers) == 2 and [m.num_features for m in layers] == [32, 32]
    assert not any(isinstance(m, normlab.BatchNorm) for m in r.model.modules())
    assert "halve" not in normlab.norm_names()
    # the layer really is in the forward pass: 0.5 x before each ReLU is the network without norm, halved
    plain = train(parse_overrides(cfg, ["norm=none"]))
    assert r.step_loss[0] != plain.step_loss[0]
    r2 = train(parse_overrides(cfg, ["norm_kwargs.momentum=0.5"]), norm_layer=_Halve)
    assert all(m.momentum == 0.5 for m in r2.model.modules() if isinstance(m, _Halve))
    assert r2.step_loss == r.step_loss  # momentum is unused by the layer: the run is the same
    with pytest.raises(TypeError, match="norm_layer must be a class or callable"):
        train(cfg, norm_layer="batchnorm")


class _MaskedMean(nn.Module):
    """Mean over the real positions of (N, S, D) sequences, then a linear layer; records the masks it saw."""

    def __init__(self, d: int, k: int) -> None:
        super().__init__()
        self.head = nn.Linear(d, k)
        self.masks: list[torch.Tensor] = []

    def forward(self, x, mask=None):
        assert mask is not None, "sequence data must come with its padding mask"
        self.masks.append(mask)
        w = mask.unsqueeze(-1).to(x.dtype)  # (N, S, 1)
        return self.head((x * w).sum(1) / w.sum(1))


def test_sequence_data_passes_masks(monkeypatch):
    import normlab.lab.models

    built = []

    def fake_build(name, *, in_shape, num_classes, norm_layer, **kw):
        built.append(_MaskedMean(in_shape[-1], num_classes))
        return built[-1]

    monkeypatch.setattr(normlab.lab.models, "build_model", fake_build)
    cfg = TrainConfig(dataset="synthetic-sequences", data_kwargs={"n_train": 256, "n_test": 128}, model="mlp",
                      epochs=1, batch_size=32, device="cpu", lr=0.1)  # fmt: skip
    r = train(cfg)
    ds = normlab.lab.data.load_dataset("synthetic-sequences", n_train=256, n_test=128)
    masks = built[0].masks
    assert len(masks) == 8 + 1  # 8 training batches + 1 evaluation pass
    assert masks[0].shape == (32, ds.input_shape[0]) and masks[0].dtype == torch.bool
    assert sum(int(m.sum()) for m in masks[:8]) == int(ds.mask_train.sum())  # every real position, once
    assert torch.equal(masks[-1], ds.mask_test)
    assert not r.diverged


def test_batch_order_reaches_the_batches(monkeypatch):
    seen: list[torch.Tensor] = []
    real = normlab.lab.data.Batches

    class Recording(real):
        def __iter__(self):
            for batch in super().__iter__():
                seen.append(batch[1].clone())
                yield batch

    monkeypatch.setattr(normlab.lab.data, "Batches", Recording)
    cfg = TrainConfig(**{**SMALL.__dict__, "epochs": 1, "batch_size": 32})
    train(cfg)
    assert sum(len(torch.unique(y)) == 1 for y in seen) < len(seen) / 2  # shuffled: batches mix classes
    seen.clear()
    r = train(TrainConfig(**{**cfg.__dict__, "batch_order": "class-sorted"}))
    assert r.steps == len(seen) == 1437 // 32
    assert all(len(torch.unique(y)) <= 2 for y in seen)  # one class per batch, two where a class ends
    assert sum(len(torch.unique(y)) == 1 for y in seen) >= len(seen) - 10
    with pytest.raises(ConfigError, match="batch_order='sorted' is not one of: 'shuffled', 'class-sorted'"):
        TrainConfig(batch_order="sorted")


def test_threads_are_set_for_the_run_and_restored():
    before = torch.get_num_threads()
    r = train(parse_overrides(SMALL, ["threads=1", "max_steps=1"]))
    assert r.threads == 1 and torch.get_num_threads() == before


def test_channels_last_gives_the_same_run_as_contiguous():
    data = {"n_train": 256, "n_test": 64, "size": 8}
    cfg = TrainConfig(dataset="synthetic-images", data_kwargs=data, model="cnn", model_kwargs={"channels": [4, 8]},
                      epochs=1, batch_size=32, device="cpu")  # fmt: skip
    a = train(cfg)
    b = train(parse_overrides(cfg, ["channels_last=true"]))
    assert len(a.step_loss) == len(b.step_loss) == 8
    assert b.step_loss == pytest.approx(a.step_loss, rel=1e-4)  # same maths, another memory layout


# --------------------------------------------------------------------------- schedule


def test_lr_schedules_against_hand_computed_values():
    c = TrainConfig(lr=1.0, epochs=4, schedule="cosine", warmup_epochs=1)
    # 10 steps/epoch, 40 steps: warm-up over steps 0..9, then cosine over the remaining 30
    assert lr_at(c, 0, 10, 40) == pytest.approx(0.1) and lr_at(c, 9, 10, 40) == pytest.approx(1.0)
    assert lr_at(c, 10, 10, 40) == pytest.approx(1.0)
    assert lr_at(c, 25, 10, 40) == pytest.approx(0.5 * (1 + math.cos(math.pi * 15 / 30)))
    s = TrainConfig(lr=1.0, epochs=4, schedule="step")  # default milestones: epochs 2 and 3
    assert [lr_at(s, t, 10, 40) for t in (19, 20, 29, 30)] == pytest.approx([1.0, 0.1, 0.1, 0.01])
    s = TrainConfig(lr=2.0, epochs=4, schedule="step", lr_milestones=(1.0,), lr_decay=0.5)
    assert [lr_at(s, t, 10, 40) for t in (9, 10, 39)] == pytest.approx([2.0, 1.0, 1.0])
    assert lr_at(TrainConfig(lr=0.3), 123, 10, 40) == 0.3


# --------------------------------------------------------------------------- overrides


def test_parse_overrides_types_values():
    c = parse_overrides(
        TrainConfig(),
        ["lr=1e-3", "epochs=3", "nesterov=true", "optimizer=adam", "n_train=none", "max_steps=10",
         "betas=0.8,0.99", "model_kwargs.width=16", "model_kwargs.channels=[8, 16]", 'norm_kwargs={"eps": 0.001}',
         "augment=flip"],
    )  # fmt: skip
    assert (c.lr, c.epochs, c.nesterov, c.optimizer, c.n_train, c.max_steps) == (1e-3, 3, True, "adam", None, 10)
    assert c.betas == (0.8, 0.99) and c.model_kwargs == {"width": 16, "channels": [8, 16]}
    assert c.norm_kwargs == {"eps": 0.001} and c.augment == "flip"
    assert isinstance(c.epochs, int) and isinstance(c.lr, float)
    assert parse_overrides(c, {"lr": 0.5}).lr == 0.5
    assert TrainConfig().model_kwargs == {}  # the default was not mutated


@pytest.mark.parametrize(
    "item, pattern",
    [
        ("lrr=0.1", r"unknown key 'lrr' for TrainConfig \(did you mean 'lr'\?\); valid keys: dataset, .*, lr, "),
        ("optimizer=adamw", r"optimizer='adamw' is not one of: 'sgd', 'adam'"),
        ("epochs=two", r"epochs='two' is not a valid int"),
        ("epochs=2.5", r"epochs='2.5' is not a valid int"),
        ("lr=fast", r"lr='fast' is not a valid float"),
        ("nesterov=maybe", r"nesterov='maybe' is not a valid bool"),
        ("epochs=0", r"epochs must be in \[1, 1000000\], got 0"),
        ("device=gpu", r"device='gpu' is not one of: 'auto', 'cpu', 'cuda'"),
        ("lr", r"override 'lr' must look like key=value"),
        ("model_kwargs=[1]", r"not a valid JSON object"),
        ("lr.x=1", r"only dict fields take dotted keys"),
        ("schedule=linear", r"schedule='linear' is not one of: 'constant', 'step', 'cosine'"),
    ],
)
def test_parse_overrides_errors_are_one_line_and_name_the_choices(item, pattern):
    with pytest.raises(ConfigError, match=pattern) as e:
        parse_overrides(TrainConfig(), [item])
    assert "\n" not in str(e.value)


def test_unknown_names_are_checked_against_the_registries():
    with pytest.raises(ConfigError, match=r"norm='bn' is not one of: .*batchnorm"):
        TrainConfig(norm="bn").validate()
    with pytest.raises(ConfigError, match=r"dataset='mnist' is not one of: .*digits"):
        train(TrainConfig(dataset="mnist"))
    with pytest.raises(ConfigError, match=r"dataset='digits': .*unknown option"):
        train(TrainConfig(data_kwargs={"size": 3}))


def test_tune_allocator_opt_out(monkeypatch):
    monkeypatch.setenv("NORMLAB_TUNE_MALLOC", "0")
    assert tune_allocator() is False
    monkeypatch.delenv("NORMLAB_TUNE_MALLOC")
    import sys

    if sys.platform.startswith("linux"):
        assert tune_allocator() is True
