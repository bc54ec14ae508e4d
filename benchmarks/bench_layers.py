"""Train-mode forward+backward time and peak memory: normlab vs torch.nn, side by side in one run.

    make bench                      # or: python benchmarks/bench_layers.py [--reps 15] [--quick]

Four tables: layers on float32 tensors of realistic size (time and memory);
tiny tensors, where the per-call cost decides (microseconds per step); a
bfloat16 block; and whole training steps — a lab-style model (a deep stack of
small Conv -> norm -> ReLU blocks, batch 32) with BatchNorm, GroupNorm and
LayerNorm, and the small CNN under ``torch.compile`` — each with normlab's
norms against the same model with torch.nn's.

For each case both implementations run on the same input and upstream
gradient, interleaved (ours, theirs, ours, ...) so drifts in machine load hit
both; the time is the median over the repetitions. "ratio" is normlab / torch:
below 1.0 normlab is faster. Peak memory is the largest amount of tensor memory
alive at once during one forward+backward (from zero: the previous step's
gradients are freed before it) beyond the input and upstream
gradient (allocations minus frees in time order, each op's counted at its end,
from PyTorch's profiler with profile_memory=True); "saved" is what each keeps for the backward beyond the
input itself.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import time
from functools import partial

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


def tiny_cases():
    """Tensors small enough that the per-call cost (Python, autograd) is what is measured."""
    return [
        ("BatchNorm2d", (2, 8, 8, 8), lambda: nn.BatchNorm2d(8), lambda: normlab.BatchNorm2d(8)),
        ("BatchNorm2d", (4, 16, 6, 6), lambda: nn.BatchNorm2d(16), lambda: normlab.BatchNorm2d(16)),
        ("BatchNorm1d", (16, 32), lambda: nn.BatchNorm1d(32), lambda: normlab.BatchNorm1d(32)),
        ("LayerNorm", (8, 10, 24), lambda: nn.LayerNorm(24), lambda: normlab.LayerNorm(24)),
        ("RMSNorm", (8, 10, 24), lambda: nn.RMSNorm(24), lambda: normlab.RMSNorm(24)),
        ("GroupNorm(4)", (4, 16, 6, 6), lambda: nn.GroupNorm(4, 16), lambda: normlab.GroupNorm(4, 16)),
        ("InstanceNorm2d", (4, 16, 6, 6), lambda: nn.InstanceNorm2d(16), lambda: normlab.InstanceNorm2d(16)),
    ]


def bf16_cases(quick: bool):
    cl, cf = torch.channels_last, torch.contiguous_format
    out = [
        ("BatchNorm2d NCHW", (32, 64, 32, 32), cf, lambda: nn.BatchNorm2d(64), lambda: normlab.BatchNorm2d(64)),
        (
            "BatchNorm2d channels-last",
            (32, 64, 32, 32),
            cl,
            lambda: nn.BatchNorm2d(64),
            lambda: normlab.BatchNorm2d(64),
        ),
        ("LayerNorm (N, S, D)", (16, 256, 768), cf, lambda: nn.LayerNorm(768), lambda: normlab.LayerNorm(768)),
        ("RMSNorm (N, S, D)", (16, 256, 768), cf, lambda: nn.RMSNorm(768), lambda: normlab.RMSNorm(768)),
        ("GroupNorm(8) NCHW", (32, 64, 32, 32), cf, lambda: nn.GroupNorm(8, 64), lambda: normlab.GroupNorm(8, 64)),
    ]
    return out[:1] if quick else out


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

    x.grad = None  # freed before the profile: a previous step's gradient must not count as a free inside it
    for p in mod.parameters():
        p.grad = None
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        with _native_stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            mod(x).backward(g)
    # bytes allocated minus freed, in time order: its maximum is the peak. Each op's own (self)
    # allocations and frees are counted when it ends, so nested ops cannot hide a peak
    live = peak = 0
    for e in sorted(prof.events(), key=lambda e: e.time_range.end):
        live += e.self_cpu_memory_usage
        peak = max(peak, live)
    x_bytes = x.untyped_storage().nbytes()
    # the input is saved by both; count only what is saved beyond it
    return peak / 2**20, max(0, sum(saved) - x_bytes) / 2**20


@contextlib.contextmanager
def _native_stderr_silenced():
    """Send the C++ side's stderr (file descriptor 2) to /dev/null for a moment.

    The profiler's native library announces every start and stop on stderr
    ("USDT: ... profiler_start"), one pair per case, and no environment
    variable turns it off; Python's own ``sys.stderr`` object is left alone.
    """
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


def _interleaved(fns, reps: int) -> list[float]:
    """Median seconds of each function, run interleaved (a, b, a, b, ...) so drifts in load hit all alike."""
    times = [[] for _ in fns]
    for _ in range(reps):
        for f, acc in zip(fns, times):
            t0 = time.perf_counter()
            f()
            acc.append(time.perf_counter() - t0)
    return [statistics.median(t) for t in times]


def measure(reps: int, quick: bool, case_list=None, dtype=torch.float32, memory: bool = True):
    rows = []
    for name, shape, fmt, make_ref, make_ours in case_list if case_list is not None else cases(quick):
        torch.manual_seed(0)
        x = torch.randn(shape).to(dtype).contiguous(memory_format=fmt).requires_grad_()
        g = torch.randn(shape).to(dtype).contiguous(memory_format=fmt)
        ref, ours = make_ref().to(dtype), make_ours().to(dtype)
        for _ in range(3):
            _step(ref, x, g), _step(ours, x, g)
        n = reps if x.numel() > 1 << 16 else reps * 20
        t_ours, t_ref = _interleaved([partial(_step, ours, x, g), partial(_step, ref, x, g)], n)
        m_ours, m_ref = t_ours * 1e3, t_ref * 1e3
        p_ours, s_ours = _peak_and_saved(ours, x, g) if memory else (0.0, 0.0)
        p_ref, s_ref = _peak_and_saved(ref, x, g) if memory else (0.0, 0.0)
        rows.append((name, shape, m_ref, m_ours, m_ours / m_ref, p_ref, p_ours, s_ref, s_ours))
        print(f"  measured {name} {tuple(shape)} {dtype}", flush=True)
    return rows


def measure_tiny(reps: int):
    rows = []
    for name, shape, make_ref, make_ours in tiny_cases():
        torch.manual_seed(0)
        x = torch.randn(shape, requires_grad=True)
        g = torch.randn(shape)
        ref, ours = make_ref(), make_ours()
        for _ in range(50):
            _step(ref, x, g), _step(ours, x, g)
        t_ours, t_ref = _interleaved([partial(_step, ours, x, g), partial(_step, ref, x, g)], reps * 40)
        rows.append((name, shape, t_ref * 1e6, t_ours * 1e6, t_ours / t_ref))
        print(f"  measured tiny {name} {tuple(shape)}", flush=True)
    return rows


def _deep_stack(norm, depth: int = 21, width: int = 16) -> nn.Module:
    """A lab-style model: Conv(3 -> width) then depth - 1 Conv(width -> width), each -> norm -> ReLU; 10 classes."""
    layers, c_in = [], 3
    for _ in range(depth):
        layers += [nn.Conv2d(c_in, width, 3, padding=1, bias=False), norm(width), nn.ReLU()]
        c_in = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, 10))


def _train_step(model, opt, x, y):
    opt.zero_grad(set_to_none=True)
    nn.functional.cross_entropy(model(x), y).backward()
    opt.step()


def _pair_of_models(make):
    torch.manual_seed(0)
    ref, ours = make(nn), make(normlab)
    ours.load_state_dict(ref.state_dict())
    return ref, ours


def measure_steps(reps: int, quick: bool, compiled: bool, eager: bool = True):
    """Training-step time of whole models: normlab's norms against torch.nn's in the same model.

    ``eager=False`` skips the lab-style (eager) rows, ``compiled=False`` the torch.compile row.
    """
    norms = {
        "BatchNorm2d": lambda lib: lib.BatchNorm2d,
        "GroupNorm(4)": lambda lib: lambda c: lib.GroupNorm(4, c),
        "LayerNorm (GroupNorm(1))": lambda lib: lambda c: lib.GroupNorm(1, c),
    }
    rows = []
    x, y = torch.randn(32, 3, 8, 8), torch.randint(0, 10, (32,))
    for label, norm in list(norms.items())[: 1 if quick else 3] if eager else []:
        ref, ours = _pair_of_models(lambda lib, norm=norm: _deep_stack(norm(lib)))
        opts = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in (ref, ours)]
        for _ in range(5):
            _train_step(ref, opts[0], x, y), _train_step(ours, opts[1], x, y)
        t_ours, t_ref = _interleaved(
            [partial(_train_step, ours, opts[1], x, y), partial(_train_step, ref, opts[0], x, y)], reps * 2
        )
        rows.append((f"lab-style: 21 x (Conv16 -> {label} -> ReLU), batch 32, 8x8", t_ref * 1e3, t_ours * 1e3))
        print(f"  measured lab-style step {label}", flush=True)
    if compiled:
        from normlab.lab.models import build_model

        def cnn(lib):
            return build_model("cnn", in_shape=(3, 32, 32), num_classes=10, norm_layer=lib.BatchNorm2d)

        ref, ours = _pair_of_models(cnn)
        ref, ours = torch.compile(ref), torch.compile(ours)
        x, y = torch.randn(64, 3, 32, 32), torch.randint(0, 10, (64,))
        opts = [torch.optim.SGD(m.parameters(), lr=0.01, momentum=0.9) for m in (ref, ours)]
        for _ in range(3):  # compiles, then warms up
            _train_step(ref, opts[0], x, y), _train_step(ours, opts[1], x, y)
        breaks = dict(torch._dynamo.utils.counters["graph_break"])
        if breaks:  # both models share their code objects: a break can leave either one running eagerly
            raise SystemExit(
                f"the compiled models have graph breaks, so the row would not time compiled code: {breaks}"
            )
        t_ours, t_ref = _interleaved(
            [partial(_train_step, ours, opts[1], x, y), partial(_train_step, ref, opts[0], x, y)], reps * 2
        )
        rows.append(("torch.compile: small CNN (BatchNorm2d), batch 64, 32x32", t_ref * 1e3, t_ours * 1e3))
        print("  measured compiled small CNN", flush=True)
    return rows


def _time_table(title: str, unit: str, digits: int, rows: list[dict]) -> list[str]:
    """Markdown lines of a time-only table: layer, shape, both times in ``unit`` and the ratio normlab / torch."""
    out = [title, "", f"| layer | shape | torch {unit} | normlab {unit} | ratio |", "|---|---|---:|---:|---:|"]
    out += [
        f"| {r['name']} | {'×'.join(map(str, r['shape']))} | {r['torch']:.{digits}f} | {r['normlab']:.{digits}f} "
        f"| **{r['normlab'] / r['torch']:.2f}** |"
        for r in rows
    ]
    return [*out, ""]


def tables(results: dict) -> str:
    """The results as Markdown tables (what the script prints, and what the README's benchmark block shows)."""
    out = [f"{results['meta']['header']}", ""]
    layers = results.get("layers") or []
    if layers:
        out += [
            "| layer | shape | torch ms | normlab ms | ratio | torch peak MiB | normlab peak MiB | torch saved MiB "
            "| normlab saved MiB |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|",
        ]
        out += [
            f"| {r['name']} | {'×'.join(map(str, r['shape']))} | {r['torch']:.1f} | {r['normlab']:.1f} "
            f"| **{r['normlab'] / r['torch']:.2f}** | {r['torch_peak']:.0f} | {r['normlab_peak']:.0f} "
            f"| {r['torch_saved']:.1f} | {r['normlab_saved']:.1f} |"
            for r in layers
        ]
        ratios = sorted(r["normlab"] / r["torch"] for r in layers)
        out += ["", f"median ratio {statistics.median(ratios):.2f}, worst {max(ratios):.2f} (normlab / torch)", ""]
    if results.get("tiny"):
        out += _time_table("Tiny tensors (per-call cost), train-mode forward+backward:", "µs", 0, results["tiny"])
    if results.get("bf16"):
        out += _time_table("bfloat16, train-mode forward+backward:", "ms", 2, results["bf16"])
    if results.get("steps"):
        out += [
            "Training steps (forward, loss, backward, SGD step), the same model with torch.nn's or normlab's norms:"
        ]
        out += ["", "| model | torch.nn norms ms | normlab norms ms | ratio |", "|---|---:|---:|---:|"]
        out += [
            f"| {r['name']} | {r['torch']:.2f} | {r['normlab']:.2f} | **{r['normlab'] / r['torch']:.2f}** |"
            for r in results["steps"]
        ]
    return "\n".join(out).rstrip() + "\n"


def _layer_rows(rows) -> list[dict]:
    keys = ("name", "shape", "torch", "normlab", "ratio", "torch_peak", "normlab_peak", "torch_saved", "normlab_saved")
    return [{k: (list(v) if k == "shape" else v) for k, v in zip(keys, r)} for r in rows]


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=15, help="timed repetitions per implementation (median reported)")
    ap.add_argument("--quick", action="store_true", help="one BatchNorm2d shape only")
    ap.add_argument(
        "--tuned-malloc",
        action="store_true",
        help="first tell glibc to keep freed blocks (normlab.lab.runtime.tune_allocator), as normlab's training loop "
        "does: fresh outputs then cost no page faults, for both implementations, and the kernels' own speed shows",
    )
    ap.add_argument("--no-compile", action="store_true", help="skip the torch.compile row (it compiles two models)")
    ap.add_argument(
        "--compiled-only",
        action="store_true",
        help="only the torch.compile row (to compare it before and after a change without the other tables)",
    )
    ap.add_argument("--json", metavar="PATH", help="also write the measurements to PATH (for the README's tables)")
    args = ap.parse_args(argv)
    allocator = "default glibc allocator"
    if args.tuned_malloc:
        from normlab.lab.runtime import tune_allocator

        if not tune_allocator():
            raise SystemExit("--tuned-malloc: could not tune the allocator on this platform (glibc only)")
        allocator = "allocator tuned to keep freed blocks"
    native = "compiled kernels" if normlab._native.library() is not None else "tensor-op kernels (no C compiler)"
    header = (
        f"normlab {normlab.__version__} ({native}) | torch {torch.__version__} | "
        f"{platform.processor() or platform.machine()} | threads {torch.get_num_threads()} | {allocator} | "
        "float32 unless stated, train-mode forward+backward"
    )
    print(header)
    results: dict = {
        "meta": {
            "header": header,
            "allocator": allocator,
            "threads": torch.get_num_threads(),
            "reps": args.reps,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        }
    }
    steps_only = [("name", "torch", "normlab")]
    if args.compiled_only:
        results["steps"] = [dict(zip(steps_only[0], r)) for r in measure_steps(args.reps, args.quick, True, False)]
    else:
        results["layers"] = _layer_rows(measure(args.reps, args.quick))
        results["tiny"] = [
            dict(zip(("name", "shape", "torch", "normlab"), (n, list(s), tr, to)))
            for n, s, tr, to, _ in measure_tiny(args.reps)
        ]
        bf16 = measure(args.reps, args.quick, bf16_cases(args.quick), dtype=torch.bfloat16, memory=False)
        results["bf16"] = _layer_rows(bf16)
        steps = measure_steps(args.reps, args.quick, compiled=not args.no_compile)
        results["steps"] = [dict(zip(steps_only[0], r)) for r in steps]
    print()
    print(tables(results), end="")
    if args.json:
        from pathlib import Path

        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
