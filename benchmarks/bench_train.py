"""Seconds per training epoch: normlab's loop vs a straightforward PyTorch loop, side by side.

The workload: the small CNN (``build_model("cnn", ...)``, BatchNorm, default
channels (32, 64, 128)) on CIFAR-shaped synthetic data (3×32×32, 10 classes,
``--n`` images), batch 128, SGD with momentum, float32, the same thread count.

Variants, each in a fresh process (so one's allocator settings cannot leak
into another's), in this order:

* ``torch``       the straightforward loop: ``DataLoader(TensorDataset(x, y),
                  batch_size, shuffle=True, drop_last=True)``, ``zero_grad()``,
                  forward, ``backward``, ``step``, ``loss.item()`` every step;
                  the process's default glibc allocator;
* ``torch+malloc`` the same loop after :func:`normlab.lab.runtime.tune_allocator`
                  (to show how much of the gap is the allocator alone);
* ``normlab``     :func:`normlab.lab.train.train` (in-memory ``Batches``, losses
                  synced every 32 steps, tuned allocator), NCHW;
* ``normlab-cl``  the same with ``channels_last=True``.

Both loops use the same model, optimizer, data and threads; only the data
path, the host syncs, the allocator and (last row) the memory layout differ.
Each variant trains ``--epochs`` epochs; the first is a warm-up, a round's
figure is the median of the others (training only, no evaluation); variants
run interleaved for ``--rounds`` rounds and the table shows each one's best
round (the machine is shared; the best round is the least disturbed). Run with
``OMP_NUM_THREADS=2 python benchmarks/bench_train.py``; ``--quick`` for a
short check (n=2000, 2 epochs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

VARIANTS = ("torch", "torch+malloc", "normlab", "normlab-cl")


def _dataset(n: int):
    from normlab.lab.data import load_dataset

    return load_dataset("synthetic-images", seed=0, n_train=n, n_test=256, channels=3, size=32, num_classes=10)


def _torch_loop(args, tune: bool) -> list[float]:
    import torch
    import torch.nn.functional as F
    from torch.utils.data import DataLoader, TensorDataset

    from normlab.lab.models import build_model
    from normlab.lab.runtime import tune_allocator

    if tune:
        assert tune_allocator(), "could not tune the allocator on this platform"
    torch.set_num_threads(args.threads)
    ds = _dataset(args.n)
    torch.manual_seed(0)
    model = build_model("cnn", in_shape=ds.input_shape, num_classes=ds.num_classes, norm_layer="batchnorm")
    opt = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    loader = DataLoader(TensorDataset(ds.x_train, ds.y_train), batch_size=args.batch, shuffle=True, drop_last=True)
    times = []
    for _ in range(args.epochs):
        model.train()
        t0 = time.perf_counter()
        total = 0.0
        for x, y in loader:
            opt.zero_grad()
            loss = F.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            total += loss.item()
        times.append(time.perf_counter() - t0)
    return times


def _normlab_loop(args, channels_last: bool) -> list[float]:
    from normlab.lab.config import TrainConfig
    from normlab.lab.train import train

    cfg = TrainConfig(
        dataset="synthetic-images",
        data_kwargs={"n_test": 256, "channels": 3, "size": 32, "num_classes": 10},
        n_train=args.n,
        model="cnn",
        norm="batchnorm",
        optimizer="sgd",
        lr=args.lr,
        momentum=0.9,
        epochs=args.epochs,
        batch_size=args.batch,
        drop_last=True,
        device="cpu",
        threads=args.threads,
        channels_last=channels_last,
    )
    result = train(cfg)
    return [e["time"] for e in result.epochs]


def worker(args) -> None:
    if args.worker == "torch":
        times = _torch_loop(args, tune=False)
    elif args.worker == "torch+malloc":
        times = _torch_loop(args, tune=True)
    elif args.worker == "normlab":
        times = _normlab_loop(args, channels_last=False)
    else:
        times = _normlab_loop(args, channels_last=True)
    print(json.dumps({"variant": args.worker, "times": times}))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=10_000, help="training images (default 10000)")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--epochs", type=int, default=3, help="epochs per variant, the first a warm-up (default 3)")
    p.add_argument("--threads", type=int, default=int(os.environ.get("OMP_NUM_THREADS", "2")))
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument(
        "--rounds", type=int, default=2, help="interleaved repetitions; the table shows the best (default 2)"
    )
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma-separated subset of {','.join(VARIANTS)}")
    p.add_argument("--quick", action="store_true", help="n=2000, 2 epochs")
    p.add_argument("--json", metavar="PATH", help="also write the measurements to PATH (for the README's table)")
    p.add_argument("--worker", choices=VARIANTS, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.n, args.epochs = 2000, 2
    if args.worker:
        worker(args)
        return
    if args.epochs < 2:
        p.error("--epochs must be >= 2 (the first epoch is a warm-up)")
    variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        p.error(f"unknown variant(s) {bad}; choose from {', '.join(VARIANTS)}")

    import torch

    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    env.pop("NORMLAB_TUNE_MALLOC", None)
    per_round: dict[str, list[float]] = {v: [] for v in variants}
    for r in range(args.rounds):
        for v in variants:  # interleaved, so a busy spell on the machine hits every variant alike
            cmd = [sys.executable, __file__, "--worker", v, "--n", str(args.n), "--batch", str(args.batch),
                   "--epochs", str(args.epochs), "--threads", str(args.threads), "--lr", str(args.lr)]  # fmt: skip
            out = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
            if out.returncode != 0:
                sys.exit(f"variant {v} failed:\n{out.stderr}")
            times = json.loads(out.stdout.strip().splitlines()[-1])["times"]
            per_round[v].append(statistics.median(times[1:]))
            print(f"  round {r + 1} {v:<13} epochs: {', '.join(f'{t:.2f}' for t in times)} s", file=sys.stderr)
    results = {
        "meta": {
            "header": (
                f"Training epoch, small CNN (BatchNorm) on {args.n} synthetic 3x32x32 images, batch {args.batch}, "
                f"SGD, float32, {args.threads} threads; torch {torch.__version__}, "
                f"{platform.processor() or platform.machine()}, "
                f"median of epochs 2..{args.epochs}, best of {args.rounds} interleaved rounds"
            ),
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        },
        "loops": [{"loop": v, "best": min(ts), "rounds": ts} for v, ts in per_round.items()],
    }
    print()
    print(table(results), end="")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


def table(results: dict) -> str:
    """The results as a Markdown table (what the script prints, and what the README shows)."""
    base = next((r["best"] for r in results["loops"] if r["loop"] == "torch"), None)
    out = [results["meta"]["header"], "", "| loop | s / epoch (best) | all rounds | speed-up vs torch loop |"]
    out.append("|---|---:|---|---:|")
    for r in results["loops"]:
        ratio = f"{base / r['best']:.2f}x" if base else "-"
        out.append(f"| {r['loop']} | {r['best']:.2f} | {', '.join(f'{x:.2f}' for x in r['rounds'])} | {ratio} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    main()
