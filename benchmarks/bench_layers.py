"""Train-mode forward+backward time and peak memory: normlab vs torch.nn, side by side in one run.

    make bench                      # or: python benchmarks/bench_layers.py [--reps 15] [--quick]

For each case both implementations run on the same input and upstream
gradient, interleaved (ours, theirs, ours, ...) so drifts in machine load hit
both; the time is the median over the repetitions. "ratio" is normlab / torch:
below 1.0 normlab is faster. Peak memory is the largest amount of tensor memory
alive at once during one forward+backward beyond the input and upstream
gradient (allocations minus frees in time order, each op's counted at its end,
from PyTorch's profiler with profile_memory=True); "saved" is what each keeps for the backward beyond the
input itself.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch
import torch.nn as nn
from torch.profiler import ProfilerActivity, profile

import normlab
import normlab._native


def cases(quick: bool):
    cl = torch.channels_last
    cf = torch.contiguous_format
    bn2d = [(128, 64, 32, 32), (256, 256, 8, 8), (32, 16, 64, 64)]
    out = []
    for shape in bn2d[:1] if quick else bn2d:
        out.append(
            (
                "BatchNorm2d NCHW",
                shape,
                cf,
                lambda s=shape: nn.BatchNorm2d(s[1]),
                lambda s=shape: normlab.BatchNorm2d(s[1]),
            )
        )
        out.append(
            (
                "BatchNorm2d channels-last",
                shape,
                cl,
                lambda s=shape: nn.BatchNorm2d(s[1]),
                lambda s=shape: normlab.BatchNorm2d(s[1]),
            )
        )
    out.append(("BatchNorm1d (N, D)", (8192, 512), cf, lambda: nn.BatchNorm1d(512), lambda: normlab.BatchNorm1d(512)))
    out.append(("LayerNorm (N, S, D)", (32, 512, 768), cf, lambda: nn.LayerNorm(768), lambda: normlab.LayerNorm(768)))
    out.append(("RMSNorm (N, S, D)", (32, 512, 768), cf, lambda: nn.RMSNorm(768), lambda: normlab.RMSNorm(768)))
    out.append(
        ("GroupNorm(8) NCHW", (32, 64, 32, 32), cf, lambda: nn.GroupNorm(8, 64), lambda: normlab.GroupNorm(8, 64))
    )
    # a tiny batch: per-call overhead (Python, autograd.Function) dominates, not arithmetic
    out.append(("BatchNorm2d tiny", (2, 8, 8, 8), cf, lambda: nn.BatchNorm2d(8), lambda: normlab.BatchNorm2d(8)))
    out.append(
        (
            "InstanceNorm2d NCHW",
            (32, 64, 32, 32),
            cf,
            lambda: nn.InstanceNorm2d(64, affine=True),
            lambda: normlab.InstanceNorm2d(64, affine=True),
        )
    )
    return out


def _step(mod, x, g):
    x.grad = None
    for p in mod.parameters():
        p.grad = None
    mod(x).backward(g)


def _peak_and_saved(mod, x, g):
    saved = []

    def pack(t):
        saved.append(t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            _step(mod, x, g)
    # bytes allocated minus freed, in time order: its maximum is the peak. Each op's own (self)
    # allocations and frees are counted when it ends, so nested ops cannot hide a peak
    live = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.end):
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    x_bytes = x.untyped_storage().nbytes()
    # the input is saved by both; count only what is saved beyond it
    return peak / 2**20, max(0, sum(saved) - x_bytes) / 2**20


def measure(reps: int, quick: bool):
    rows = []
    for name, shape, fmt, make_ref, make_ours in cases(quick):
        torch.manual_seed(0)
        x = torch.randn(shape).contiguous(memory_format=fmt).requires_grad_()
        g = torch.randn(shape).contiguous(memory_format=fmt)
        ref, ours = make_ref(), make_ours()
        for _ in range(3):
            _step(ref, x, g), _step(ours, x, g)
        t_ref, t_ours = [], []
        for _ in range(reps if x.numel() > 1 << 16 else reps * 20):
            for mod, acc in ((ours, t_ours), (ref, t_ref)):
                t0 = time.perf_counter()
                _step(mod, x, g)
                acc.append(time.perf_counter() - t0)
        m_ours, m_ref = statistics.median(t_ours) * 1e3, statistics.median(t_ref) * 1e3
        p_ours, s_ours = _peak_and_saved(ours, x, g)
        p_ref, s_ref = _peak_and_saved(ref, x, g)
        rows.append((name, shape, m_ref, m_ours, m_ours / m_ref, p_ref, p_ours, s_ref, s_ours))
        print(f"  measured {name} {tuple(shape)}", flush=True)
    return rows


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=15, help="timed repetitions per implementation (median reported)")
    ap.add_argument("--quick", action="store_true", help="one BatchNorm2d shape only")
    ap.add_argument(
        "--tuned-malloc",
        action="store_true",
        help="first tell glibc to keep freed blocks (normlab.lab.runtime.tune_allocator), as normlab's training loop does: "
        "fresh outputs then cost no page faults, for both implementations, and the kernels' own speed shows",
    )
    args = ap.parse_args(argv)
    allocator = "default glibc allocator"
    if args.tuned_malloc:
        from normlab.lab.runtime import tune_allocator

        if not tune_allocator():
            raise SystemExit("--tuned-malloc: could not tune the allocator on this platform (glibc only)")
        allocator = "allocator tuned to keep freed blocks"
    native = "compiled kernels" if normlab._native.library() is not None else "tensor-op kernels (no C compiler)"
    print(
        f"normlab {normlab.__version__} ({native}) | torch {torch.__version__} | "
        f"{platform.processor() or platform.machine()} | threads {torch.get_num_threads()} | {allocator} | "
        "float32, train-mode forward+backward"
    )
    rows = measure(args.reps, args.quick)
    print()
    print(
        "| layer | shape | torch ms | normlab ms | ratio | torch peak MiB | normlab peak MiB | torch saved MiB | normlab saved MiB |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, shape, tr, to, ratio, pr, po, sr, so in rows:
        shp = "×".join(map(str, shape))
        print(f"| {name} | {shp} | {tr:.1f} | {to:.1f} | **{ratio:.2f}** | {pr:.0f} | {po:.0f} | {sr:.1f} | {so:.1f} |")
    ratios = sorted(r[4] for r in rows)
    print()
    print(
        f"median ratio {statistics.median(ratios):.2f}, worst {max(ratios):.2f} (normlab time / torch time; < 1 is faster)"
    )


if __name__ == "__main__":
    main()
