"""Nothing crashes the process and nothing is silently wrong: empty inputs, the kernel cache, bad arguments.

Oracles: torch.nn (shapes, buffers, its own errors), a float64 recomputation,
and subprocesses (a crash there is an exit status, not a dead test run).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import normlab
from normlab import _native, _ops
from normlab import functional as NF

# --------------------------------------------------------------------------- zero-size inputs

CHANNEL_FIRST_EMPTY = [(0, 4), (0, 4, 3), (2, 4, 0), (0, 4, 3, 3), (2, 4, 0, 3), (2, 4, 3, 0)]
FEATURES_LAST_EMPTY = [(0, 4), (0, 5, 4), (2, 0, 4)]


def _empty_cases():
    cases = []
    for name in normlab.norm_names():
        for shape in CHANNEL_FIRST_EMPTY:
            if name == "instancenorm" and len(shape) < 3:
                continue  # instance norm needs a spatial axis
            cases.append((name, 1, shape))
        for shape in FEATURES_LAST_EMPTY:
            if name not in ("groupnorm", "instancenorm"):  # channel-first only
                cases.append((name, -1, shape))
    return cases


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize("name, feature_dim, shape", _empty_cases())
def test_every_registered_norm_takes_empty_inputs(name, feature_dim, shape, mode):
    """An empty output of the input's shape, gradients of the right shapes, running statistics untouched."""
    layer = normlab.make_norm(name, 4, feature_dim=feature_dim)
    layer.train(mode == "train")
    before = {k: v.clone() for k, v in layer.named_buffers() if k in ("running_mean", "running_var")}
    x = torch.randn(shape, requires_grad=True)
    y = layer(x)
    assert y.shape == x.shape
    y.sum().backward()
    assert x.grad.shape == x.shape
    for p in layer.parameters():
        assert p.grad is not None and torch.equal(p.grad, torch.zeros_like(p))  # sums over nothing
    for k, v in before.items():
        assert torch.equal(getattr(layer, k), v), k


@pytest.mark.parametrize("mode", ["train", "eval"])
@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda m: m.BatchNorm1d(4), (0, 4)),
        (lambda m: m.BatchNorm2d(4), (0, 4, 3, 3)),
        (lambda m: m.BatchNorm2d(4), (2, 4, 0, 3)),
        (lambda m: m.GroupNorm(2, 4), (2, 4, 0, 3)),
        (lambda m: m.LayerNorm(4), (2, 0, 4)),
        (lambda m: m.RMSNorm(4), (0, 4)),
        (lambda m: m.InstanceNorm2d(4, affine=True, track_running_stats=True), (2, 4, 0, 3)),
    ],
)
def test_empty_inputs_behave_as_torch_nn(make, shape, mode):
    ours, theirs = make(normlab), make(nn)
    for m in (ours, theirs):
        m.train(mode == "train")
    x = torch.randn(shape)
    assert ours(x).shape == theirs(x).shape
    for (name, b_ours), b_theirs in zip(ours.named_buffers(), theirs.buffers()):
        assert torch.equal(b_ours, b_theirs), name  # num_batches_tracked counted as torch.nn counts it


@pytest.mark.parametrize("shape", [(0, 4), (2, 4, 0, 3), (0, 4, 3, 3)])
def test_groupnorm_on_empty_input_does_not_kill_the_process(shape):
    """The issue's reproduction (SIGFPE in the row kernel), in a subprocess whose exit status is the verdict."""
    code = f"import torch, normlab; y = normlab.GroupNorm(1, 4)(torch.randn{shape}); print(tuple(y.shape))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == str(shape)


# --------------------------------------------------------------------------- the compiled-kernel cache


def _run_layer(cache: Path) -> subprocess.CompletedProcess:
    """A fresh process that uses the native kernels from ``cache`` and checks a BatchNorm against torch.nn."""
    code = (
        "import torch, normlab, normlab._native as N\n"
        "x = torch.randn(8, 3, 4, 4, dtype=torch.float64)\n"
        "ours, ref = normlab.BatchNorm2d(3).double(), torch.nn.BatchNorm2d(3).double()\n"
        "torch.testing.assert_close(ours(x), ref(x))\n"
        "assert N.library() is not None, 'native kernels not loaded'\n"
        "assert N.eager_ops() or N._cxx_compiler() is None, 'C++ operators not loaded'\n"
    )
    env = {**os.environ, "NORMLAB_CACHE": str(cache), "NORMLAB_NATIVE": "1"}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env)


def _library(cache: Path, stem: str = "norm_kernels") -> Path:
    libs = list((cache / "native").glob(f"{stem}-*.so"))
    if not libs:
        pytest.skip(f"no {stem} library was built here (no compiler for it)")
    (lib,) = libs
    return lib


@pytest.fixture(scope="module")
def built_cache(tmp_path_factory) -> Path:
    if _native._compiler() is None:
        pytest.skip("no C compiler: the native kernels are never built")
    cache = tmp_path_factory.mktemp("normlab-cache")
    out = _run_layer(cache)
    assert out.returncode == 0, out.stderr[-2000:]
    return cache


def _corrupt_truncate(lib: Path) -> None:
    lib.write_bytes(lib.read_bytes()[: lib.stat().st_size // 3])


def _corrupt_flip_bits(lib: Path) -> None:
    data = bytearray(lib.read_bytes())
    for i in range(len(data) // 4, len(data) // 2, 97):  # a spread of flipped bytes in code and data
        data[i] ^= 0xFF
    lib.write_bytes(bytes(data))


@pytest.mark.parametrize("stem", ["norm_kernels", "eager_ops"], ids=["C-kernels", "C++-operators"])
@pytest.mark.parametrize("corrupt", [_corrupt_truncate, _corrupt_flip_bits], ids=["truncated", "bit-flipped"])
def test_a_corrupted_cached_library_is_detected_and_rebuilt(built_cache, corrupt, stem):
    lib = _library(built_cache, stem)
    good = lib.read_bytes()
    corrupt(lib)
    assert lib.read_bytes() != good
    out = _run_layer(built_cache)  # would die of SIGBUS/SIGSEGV/SIGILL if the corrupt file were loaded
    assert out.returncode == 0, out.stderr[-2000:]
    assert _native._verified(lib)
    assert len(lib.read_bytes()) == len(good)


def test_leftovers_of_a_killed_compile_are_removed(built_cache):
    folder = built_cache / "native"
    old, young = time.time() - 3600, time.time()
    stray_file, stray_dir = folder / "tmpab12cd.so", folder / ".build-xyz"
    fresh = folder / "tmpfresh.so"  # a concurrent compile's file: too young to touch
    stray_file.write_bytes(b"half a library")
    stray_dir.mkdir()
    (stray_dir / "norm_kernels.so").write_bytes(b"half")
    fresh.write_bytes(b"in progress")
    for p in (stray_file, stray_dir):
        os.utime(p, (old, old))
    os.utime(fresh, (young, young))
    out = _run_layer(built_cache)
    assert out.returncode == 0, out.stderr[-2000:]
    assert not stray_file.exists() and not stray_dir.exists()
    assert fresh.exists()


def test_a_library_that_fails_to_load_names_the_files_to_delete(tmp_path, monkeypatch):
    """A file that matches its checksum but is no library: a clear message naming it, then the tensor-op path."""
    monkeypatch.setenv("NORMLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(_native, "_compile", lambda cc, out: None)  # never rebuild it here
    built = {}

    def fake_build():
        out = _native._cache_dir() / "norm_kernels-0000000000000000.so"
        out.parent.mkdir(parents=True)
        out.write_bytes(b"not an ELF file")
        _native._checksum_path(out).write_text(_native._digest(out.read_bytes()))
        built["path"] = out
        try:
            return _native._load_symbols(out)
        except OSError as e:
            raise RuntimeError(
                f"could not load the compiled kernels {out} ({e}); delete {out} and {_native._checksum_path(out)} "
                "and normlab rebuilds them"
            ) from None

    # the real _build's last step, on a file that passes the checksum but cannot be loaded
    monkeypatch.setattr(_native, "_build", fake_build)
    monkeypatch.setattr(_native, "_tried", False)
    monkeypatch.setattr(_native, "_lib", None)
    with pytest.warns(RuntimeWarning, match="delete .*norm_kernels-0000000000000000.so"):
        assert _native.library() is None
    x = torch.randn(6, 3, dtype=torch.float64)
    torch.testing.assert_close(normlab.BatchNorm1d(3).double()(x), nn.BatchNorm1d(3).double()(x))


def test_build_loads_and_reports_a_corrupt_but_checksummed_library(tmp_path, monkeypatch):
    """_build itself: the load failure message names the library and its checksum file."""
    if _native._compiler() is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("NORMLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(_native, "_verified", lambda lib: True)  # as if the checksum matched
    src = b"".join(p.read_bytes() for p in _native._SOURCES)
    key = (
        __import__("hashlib")
        .sha256(src + " ".join([_native._compiler(), *_native._FLAGS]).encode() + _native._cpu_key().encode())
        .hexdigest()[:16]
    )
    lib = tmp_path / "native" / f"norm_kernels-{key}.so"
    lib.parent.mkdir(parents=True)
    lib.write_bytes(b"not an ELF file")
    with pytest.raises(RuntimeError, match=f"delete {lib}"):
        _native._build()


def test_without_a_cxx_compiler_the_layers_warn_once_and_run_the_kernels_through_python(monkeypatch):
    """No C++ compiler (or no PyTorch headers): one warning that says what to install, then the Python path."""
    if _native.library() is None:
        pytest.skip("native kernels unavailable")
    monkeypatch.setattr(_native, "_eager_state", {})  # as if never tried in this process
    monkeypatch.setattr(_native, "_cxx_compiler", lambda: None)
    with pytest.warns(RuntimeWarning, match=r"C\+\+ eager operators are unavailable .*no C and C\+\+ compiler"):
        assert _native.eager_ops() is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once: later calls are silent
        assert _native.eager_ops() is False
        x = torch.randn(6, 3, 4, 4, dtype=torch.float64, requires_grad=True)
        ours, ref = normlab.BatchNorm2d(3).double(), nn.BatchNorm2d(3).double()
        torch.testing.assert_close(ours(x), ref(x))
        torch.testing.assert_close(ours.running_var, ref.running_var)
        ln, ln_ref = normlab.LayerNorm(4).double(), nn.LayerNorm(4).double()
        torch.testing.assert_close(ln(x), ln_ref(x))


def test_cxx_operators_that_fail_to_load_are_named_with_the_files_to_delete(tmp_path, monkeypatch):
    """A cached operator library that matches its checksum but does not load: named, then the Python path."""
    if _native.library() is None or _native._cxx_compiler() is None:
        pytest.skip("no compilers")
    monkeypatch.setenv("NORMLAB_CACHE", str(tmp_path))
    monkeypatch.setattr(_native, "_eager_state", {})

    def junk(cc, cxx, out):  # a "build" whose result passes the checksum but is no library
        out.write_bytes(b"not an ELF file")
        _native._checksum_path(out).write_text(_native._digest(out.read_bytes()))

    monkeypatch.setattr(_native, "_compile_eager", junk)
    with pytest.warns(RuntimeWarning, match=r"could not load the compiled operators .*eager_ops-.*\.so.*delete"):
        assert _native.eager_ops() is False
    x = torch.randn(6, 3, dtype=torch.float64)
    torch.testing.assert_close(normlab.BatchNorm1d(3).double()(x), nn.BatchNorm1d(3).double()(x))


def test_allocation_failure_is_a_python_error_not_a_crash():
    if _native.library() is None:
        pytest.skip("native kernels unavailable")
    x = torch.zeros(1, dtype=torch.float64)
    mean = torch.zeros(1, dtype=torch.float64)
    huge = 1 << 44  # channels: the per-thread scratch (3 doubles per channel) cannot be allocated
    status = _native._fn("col_stats", x)(x.data_ptr(), 0, huge, 1, mean.data_ptr(), mean.data_ptr(), 1)
    assert status == _native.NL_ENOMEM
    with pytest.raises(MemoryError, match="could not allocate"):
        _native._check(status, "col_stats", x)


# --------------------------------------------------------------------------- bad arguments


@pytest.mark.parametrize("eps", [0.0, -1e-5, math.nan, math.inf])
@pytest.mark.parametrize(
    "make",
    [
        lambda e: normlab.BatchNorm2d(4, eps=e),
        lambda e: normlab.BatchNorm(4, eps=e),
        lambda e: normlab.GroupNorm(2, 4, eps=e),
        lambda e: normlab.LayerNorm(4, eps=e),
        lambda e: normlab.RMSNorm(4, eps=e),
        lambda e: normlab.InstanceNorm2d(4, eps=e),
        lambda e: normlab.BatchRenorm(4, eps=e),
    ],
)
def test_eps_must_be_positive_and_finite(make, eps):
    with pytest.raises(ValueError, match="eps must be a positive finite number"):
        make(eps)


def test_eps_is_checked_by_the_functions_too():
    x = torch.randn(4, 3, 2)
    with pytest.raises(ValueError, match="eps"):
        NF.batch_norm(x, None, None, training=True, eps=0.0)
    with pytest.raises(ValueError, match="eps"):
        NF.layer_norm(x, (2,), eps=-1.0)
    with pytest.raises(ValueError, match="eps"):
        NF.group_norm(x, 3, eps=0.0)
    # torch.nn refuses it as well (at the first training forward)
    with pytest.raises(ValueError):
        nn.functional.batch_norm(x, None, None, training=True, eps=0.0)


@pytest.mark.parametrize(
    "mask",
    [
        torch.tensor([[1.0, 2.0, 1.0, 0.0]] * 3),
        torch.tensor([[1.0, -1.0, 1.0, 0.0]] * 3),
        torch.tensor([[1, 2, 0, 1]] * 3),
        torch.tensor([[0.5, 1.0, 1.0, 0.0]] * 3),
    ],
    ids=["float-2", "float-minus-1", "int-2", "float-half"],
)
def test_a_mask_that_is_not_boolean_like_is_refused(mask):
    layer = normlab.BatchNorm(5, feature_dim=-1)
    with pytest.raises(ValueError, match="mask must be boolean"):
        layer(torch.randn(3, 4, 5), mask=mask)


@pytest.mark.parametrize("dtype", [torch.int64, torch.uint8, torch.float32])
def test_a_zero_one_mask_of_numbers_equals_the_boolean_mask(dtype):
    x = torch.randn(3, 4, 5, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 0, 1], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    a, b = normlab.BatchNorm(5, feature_dim=-1).double(), normlab.BatchNorm(5, feature_dim=-1).double()
    torch.testing.assert_close(a(x, mask=mask.to(dtype)), b(x, mask=mask))
    torch.testing.assert_close(a.running_var, b.running_var)


def test_a_mask_of_the_wrong_shape_is_refused():
    with pytest.raises(ValueError, match="mask has shape"):
        normlab.BatchNorm(5, feature_dim=-1)(torch.randn(3, 4, 5), mask=torch.ones(3, 5, dtype=torch.bool))


# --------------------------------------------------------------------------- skipped batches, with the right words


def test_a_float32_batch_of_huge_values_is_reported_as_an_overflow_not_as_nonfinite(monkeypatch):
    monkeypatch.setattr(_ops, "_warned", set())
    torch.manual_seed(0)
    x = torch.randn(16, 3, dtype=torch.float64) * 1e20  # finite; the variance (~1e40) exceeds float32's range
    layer = normlab.BatchNorm1d(3)
    with pytest.warns(RuntimeWarning) as record:
        y = layer(x.float())
    (message,) = [str(w.message) for w in record]
    assert "overflows torch.float32" in message and "non-finite" not in message
    assert int(layer.num_nonfinite_batches) == 1 and int(layer.num_batches_tracked) == 0
    assert torch.equal(layer.running_mean, torch.zeros(3)) and torch.equal(layer.running_var, torch.ones(3))
    # the output itself is right: statistics in double, output in float32
    exact = (x - x.mean(0)) / torch.sqrt(x.var(0, unbiased=False) + 1e-5)
    torch.testing.assert_close(y.double(), exact, rtol=1e-5, atol=1e-5)


def test_a_nan_batch_is_reported_as_nonfinite(monkeypatch):
    monkeypatch.setattr(_ops, "_warned", set())
    x = torch.randn(16, 3)
    x[3, 1] = math.nan
    with pytest.warns(RuntimeWarning, match=r"non-finite values \(NaN or infinity\)"):
        normlab.BatchNorm1d(3)(x)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_instancenorm_with_running_stats_counts_and_warns_a_skipped_batch(monkeypatch, bad):
    monkeypatch.setattr(_ops, "_warned", set())
    layer = normlab.InstanceNorm1d(3, track_running_stats=True)
    layer(torch.randn(4, 3, 6))
    before = layer.running_mean.clone(), layer.running_var.clone()
    x = torch.randn(4, 3, 6)
    x[0, 2, 1] = bad
    with pytest.warns(RuntimeWarning, match="InstanceNorm1d"):
        layer(x)
    assert int(layer.num_nonfinite_batches) == 1
    assert torch.equal(layer.running_mean, before[0]) and torch.equal(layer.running_var, before[1])
    assert int(layer.num_batches_tracked) == 0  # torch.nn's InstanceNorm never counts batches
    assert "num_nonfinite_batches" not in layer.state_dict()


def test_accumulate_stats_does_not_count_a_skipped_nan_micro_batch_for_torch_nn_bn(monkeypatch):
    monkeypatch.setattr(_ops, "_warned", set())
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3))
    x = torch.randn(12, 4)
    x[7, 0] = math.nan
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        with normlab.accumulate_stats(model):
            for xb in x.chunk(3):
                model(xb)
    bn = model[1]
    assert int(bn.num_batches_tracked) == 0
    assert torch.equal(bn.running_mean, torch.zeros(3)) and torch.equal(bn.running_var, torch.ones(3))
    with normlab.accumulate_stats(model):  # a finite accumulation afterwards is counted once, as usual
        for xb in torch.randn(12, 4).chunk(3):
            model(xb)
    assert int(bn.num_batches_tracked) == 1
