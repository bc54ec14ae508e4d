"""SyncBatchNorm: two local gloo processes reproduce single-process BN on the concatenated batch.

Outputs, input gradients, parameter gradients (summed over processes, as DDP
would) and running statistics are compared with ``torch.nn`` BatchNorm (or
normlab's, for normlab-only conventions) run on the whole batch, with uneven
per-process batch sizes, including a process holding a single sample.
"""

import copy
import datetime
import socket

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

import normlab
from normlab.layers.sync import SyncBatchNorm, combine_moments, convert_sync_batchnorm, is_distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _build(name: str) -> tuple[nn.Module, tuple[int, ...]]:
    """A float64 model and the shape of one sample."""
    torch.manual_seed(0)
    if name == "conv2d":  # torch.nn layers, EMA and cumulative average
        model = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1),
            nn.BatchNorm2d(4),
            nn.ReLU(),
            nn.Conv2d(4, 4, 1),
            nn.BatchNorm2d(4, momentum=None),
        )
        shape = (3, 5, 5)
    elif name == "sequence":  # normlab conventions, features last
        bn = normlab.BatchNorm(4, feature_dim=-1, momentum=0.9, momentum_convention="decay", debias=True)
        model = nn.Sequential(nn.Linear(3, 4), bn)
        shape = (6, 3)
    else:  # "vector": (N, C) inputs
        model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, momentum=0.3))
        shape = (3,)
    with torch.no_grad():
        for m in model.modules():
            if getattr(m, "running_mean", None) is not None:
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return model.double().train(), shape


def _check_case(rank: int, world: int, name: str, sizes: tuple[int, ...]) -> None:
    ref, shape = _build(name)
    model = convert_sync_batchnorm(copy.deepcopy(ref))
    assert sum(isinstance(m, SyncBatchNorm) for m in model.modules()) >= 1 and is_distributed()
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    g = torch.Generator().manual_seed(1)
    for step in range(2):
        x_full = torch.randn(sum(sizes), *shape, generator=g, dtype=torch.float64) * (1 + step) + step
        if name == "conv2d" and step == 1:
            x_full = x_full.contiguous(memory_format=torch.channels_last)
        x = x_full[lo:hi].detach().clone().requires_grad_()
        y = model(x)
        w_out = torch.randn(y.shape[1:], generator=g, dtype=torch.float64)
        (y * w_out).sum().backward()
        parts = [None] * world
        dist.all_gather_object(parts, (y.detach(), x.grad))
        grads = [p.grad.clone() for p in model.parameters()]
        for t in grads:
            dist.all_reduce(t)  # DDP's job: the loss is the sum over all samples
        xr = x_full.detach().clone().requires_grad_()
        yr = ref(xr)
        (yr * w_out).sum().backward()
        tol = {"rtol": 1e-10, "atol": 1e-10}
        torch.testing.assert_close(torch.cat([p[0] for p in parts]), yr.detach(), **tol, msg=f"{name}: output")
        torch.testing.assert_close(torch.cat([p[1] for p in parts]), xr.grad, **tol, msg=f"{name}: input grad")
        for (pname, pr), gs in zip(ref.named_parameters(), grads):
            torch.testing.assert_close(gs, pr.grad, **tol, msg=f"{name}: grad of {pname}")
        sd, sdr = model.state_dict(), ref.state_dict()
        assert sd.keys() == sdr.keys()
        for k in sd:
            torch.testing.assert_close(sd[k], sdr[k], **tol, msg=f"{name}: {k} after step {step}")
        model.zero_grad()
        ref.zero_grad()


def _check_stats_tools(rank: int, sizes: tuple[int, ...]) -> None:
    """recalibrate and accumulate_stats on SyncBatchNorm use the statistics of the global batches."""
    torch.manual_seed(0)
    ref = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, momentum=0.3)).double()
    model = convert_sync_batchnorm(copy.deepcopy(ref))
    lo, hi = sum(sizes[:rank]), sum(sizes[: rank + 1])
    g = torch.Generator().manual_seed(2)
    full = [torch.randn(sum(sizes), 3, generator=g, dtype=torch.float64) * 2 + 1 for _ in range(3)]
    tol = {"rtol": 1e-10, "atol": 1e-12}
    normlab.recalibrate(model, [b[lo:hi] for b in full])
    normlab.recalibrate(ref, full)
    for k in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(model[1], k), getattr(ref[1], k), **tol, msg=f"recalibrate {k}")
    with normlab.accumulate_stats(model):
        for xb in torch.tensor_split(full[0][lo:hi], 2):  # the same number of micro-batches on every process
            model(xb)
    ref(full[0])
    for k in ("running_mean", "running_var", "num_batches_tracked"):
        torch.testing.assert_close(getattr(model[1], k), getattr(ref[1], k), **tol, msg=f"accumulate {k}")


def _worker(rank: int, world: int, port: int, cases) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=datetime.timedelta(seconds=60),
    )
    try:
        for name, sizes in cases:
            _check_case(rank, world, name, sizes)
        _check_stats_tools(rank, (2, 5))
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_equal_single_process_bn_on_the_concatenated_batch():
    # also runs recalibrate and accumulate_stats on SyncBatchNorm (global-batch statistics)
    cases = [("conv2d", (3, 5)), ("sequence", (1, 6)), ("vector", (1, 4)), ("vector", (4, 4))]
    mp.spawn(_worker, args=(2, _free_port(), cases), nprocs=2, join=True)


# --------------------------------------------------------------------------- single process


def test_without_a_process_group_sync_bn_is_plain_bn():
    assert not is_distributed()
    sbn = SyncBatchNorm(4, momentum=0.2).double()
    bn = nn.BatchNorm2d(4, momentum=0.2).double()
    x = torch.randn(5, 4, 3, 3, dtype=torch.float64, requires_grad=True)
    xr = x.detach().clone().requires_grad_()
    y, yr = sbn(x), bn(xr)
    torch.testing.assert_close(y, yr, rtol=1e-12, atol=1e-12)
    y.sum().backward()
    yr.sum().backward()
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(sbn.running_var, bn.running_var, rtol=1e-12, atol=1e-12)
    sbn.eval()
    torch.testing.assert_close(sbn(x), F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False))


def test_convert_sync_batchnorm_shares_tensors_and_keeps_options():
    renorm = normlab.BatchRenorm(4)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 1),
        nn.BatchNorm2d(4, momentum=None),
        normlab.BatchNorm(4, feature_dim=1, debias=True),
        renorm,
        normlab.GhostBatchNorm(4),
    )
    model[2].eval()
    params = list(model.parameters())
    model = convert_sync_batchnorm(model)
    assert isinstance(model[1], SyncBatchNorm) and isinstance(model[2], SyncBatchNorm)
    assert model[3] is renorm and type(model[4]) is normlab.GhostBatchNorm  # other semantics: left alone
    assert all(a is b for a, b in zip(model.parameters(), params))
    assert model[1].momentum is None and model[2].debias and not model[2].training and model[1].training
    single = convert_sync_batchnorm(normlab.BatchNorm1d(3, momentum=0.99, momentum_convention="decay"))
    assert isinstance(single, SyncBatchNorm) and single.momentum_convention == "decay"
    nn.BatchNorm2d(4).load_state_dict(model[1].state_dict())


def test_combine_moments_is_the_parallel_variance_formula():
    rng = np.random.default_rng(0)
    parts = [rng.normal(5.0, 2.0, size=(n, 3)) for n in (1, 7, 0, 4)]  # uneven, one empty
    counts = torch.tensor([float(len(p)) for p in parts], dtype=torch.float64)
    means = torch.tensor(np.stack([p.mean(0) if len(p) else np.zeros(3) for p in parts]))
    m2 = torch.tensor(np.stack([((p - p.mean(0)) ** 2).sum(0) if len(p) else np.zeros(3) for p in parts]))
    n, mean, var = combine_moments(counts, means, m2)
    whole = np.concatenate(parts)
    assert float(n) == len(whole)
    np.testing.assert_allclose(mean.numpy(), whole.mean(0), rtol=1e-13)
    np.testing.assert_allclose(var.numpy(), whole.var(0), rtol=1e-12)


def test_sync_bn_refuses_masks_and_double_backward_only_when_distributed():
    sbn = SyncBatchNorm(3, feature_dim=-1).double()
    x = torch.randn(2, 4, 3, dtype=torch.float64)
    mask = torch.ones(2, 4, dtype=torch.bool)
    torch.testing.assert_close(sbn(x, mask=mask), normlab.BatchNorm(3, feature_dim=-1).double()(x))
    with pytest.raises(ValueError, match="more than 1 value per feature"):
        SyncBatchNorm(3)(torch.randn(1, 3))
