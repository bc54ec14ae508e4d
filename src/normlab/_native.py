"""The CPU kernels of ``csrc/norm_kernels.c``: built once per machine, loaded with ctypes.

Tensor-op kernels (``normlab._kernels``) run everywhere; on the CPU, for
contiguous float32/float64 tensors, these C loops do the same maths in one
fused pass each, which is what it takes to match PyTorch's own kernels.

The library is compiled on first use with the system C compiler (``$CC``,
else ``cc``/``gcc``) into ``$NORMLAB_CACHE`` (default ``~/.cache/normlab``),
keyed by the source, the flags and the machine. The build goes to a fresh
private folder, the result is loaded there to verify it, then copied into the
cache with :func:`normlab._io.atomic_write` (so concurrent processes never see
half a library) beside a ``.sha256`` file with its checksum. Every later load
first checks the library against that checksum and rebuilds it on a mismatch
(a truncated or corrupted file would otherwise crash the process when loaded);
leftovers of a compile killed midway are removed. If no compiler is found or
the build fails, normlab warns once and uses the tensor-op path.
``NORMLAB_NATIVE=0`` turns the native path off.

The same kernels are also linked, with ``csrc/eager_ops.cpp``, into a second library: the
C++ eager operators (:func:`eager_ops`), built with the system C++ compiler against the
running PyTorch's headers and loaded with ``torch.ops.load_library``. It is built, cached
and checked the same way; when it cannot be built, normlab warns once and the layers run
the kernels through Python instead.

OpenMP: the library links the ``libgomp.so.1`` that PyTorch's CPU build has
already loaded, so both share one thread pool; the thread count is
``torch.get_num_threads()``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import time
import warnings
from pathlib import Path

import torch
from torch import Tensor

from normlab._io import atomic_write

__all__: list[str] = []  # private module

_CSRC = Path(__file__).with_name("csrc")
_SOURCE = _CSRC / "norm_kernels.c"
_SOURCES = (_SOURCE, _CSRC / "norm_kernels.inc")  # the .c includes the .inc: both key the build
_FLAGS = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-std=c11"]
_MIN_PARALLEL = 1 << 15  # elements below which one thread is faster
_STRAY_AGE = 600.0  # seconds after which a build leftover is taken as abandoned (a concurrent build is younger)
_lock = threading.RLock()  # eager_ops() builds under it and calls library()
_lib: ctypes.CDLL | None = None
_tried = False

_i64, _dbl, _int, _ptr = ctypes.c_int64, ctypes.c_double, ctypes.c_int, ctypes.c_void_p

# argument types of each kernel (the same for _f32 and _f64); all but col_affine and row_fwd return a status
_SIGNATURES = {
    "col_stats": [_ptr, _i64, _i64, _i64, _ptr, _ptr, _int],
    "col_bwd_sums": [_ptr, _ptr, _i64, _i64, _i64, _ptr, _ptr, _ptr, _int],
    "col_affine": [_ptr, _ptr, _ptr, _i64, _i64, _i64, _ptr, _ptr, _ptr, _ptr, _ptr, _int],
    "col_forward": [_ptr, _ptr, _i64, _i64, _i64, _ptr, _ptr, _dbl, _ptr, _ptr, _ptr, _int],
    "col_backward": [_ptr, _ptr, _ptr, _i64, _i64, _i64, _ptr, _ptr, _ptr, _ptr, _ptr, _int],
    "ema_update": [_ptr, _ptr, _ptr, _ptr, _i64, _dbl, _dbl],
    "row_fwd": [_ptr, _ptr, _i64, _i64, _i64, _i64, _ptr, _ptr, _dbl, _int, _ptr, _ptr, _ptr, _int],
    "row_bwd": [_ptr, _ptr, _ptr, _i64, _i64, _i64, _i64, _ptr, _ptr, _ptr, _int, _ptr, _ptr, _int],
}
_VOID = ("col_affine", "row_fwd")
NL_ENOMEM = 1  # the kernels' status for a failed allocation (csrc/norm_kernels.c)
EMA_UPDATED, EMA_NONFINITE, EMA_OVERFLOW = 1, 0, 2  # ema_update's results


def _cache_dir() -> Path:
    return Path(os.environ.get("NORMLAB_CACHE", Path.home() / ".cache" / "normlab")) / "native"


def _cpu_key() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        flags = ""
    return platform.machine() + flags


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc"):
        if cc and shutil.which(cc):
            return cc
    return None


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _checksum_path(lib: Path) -> Path:
    return lib.with_name(lib.name + ".sha256")


def _verified(lib: Path) -> bool:
    """True when ``lib`` exists and matches the checksum recorded beside it when it was built."""
    try:
        return _checksum_path(lib).read_text().strip() == _digest(lib.read_bytes())
    except OSError:
        return False


def _remove_strays(folder: Path) -> None:
    """Delete what a compile killed midway leaves: build folders and temporary files older than ``_STRAY_AGE``."""
    now = time.time()
    for p in folder.iterdir():
        stray = p.name.startswith((".build-", "tmp")) or (p.name.startswith(".norm_kernels-") and p.suffix == ".tmp")
        try:
            if stray and now - p.lstat().st_mtime > _STRAY_AGE:
                shutil.rmtree(p) if p.is_dir() else p.unlink()
        except OSError:
            pass  # another process removed it first


def _load_symbols(path: Path) -> ctypes.CDLL:
    lib = ctypes.CDLL(str(path))
    for name, argtypes in _SIGNATURES.items():
        for sfx in ("f32", "f64"):
            fn = getattr(lib, f"{name}_{sfx}")
            fn.argtypes = argtypes
            fn.restype = None if name in _VOID else _int
    return lib


def _build_and_publish(out: Path, commands, verify=None) -> None:
    """Build ``out`` in a private folder, verify it, then publish it atomically beside its checksum.

    ``commands(build, tmp)`` gives the compiler command lines, run in order, that write ``tmp``
    (``build / out.name``); ``verify(tmp)`` (if given) raises for a result that must not be published.
    """
    build = Path(tempfile.mkdtemp(prefix=".build-", dir=out.parent))
    try:
        tmp = build / out.name
        for cmd in commands(build, tmp):
            try:
                subprocess.run(cmd, check=True, capture_output=True, text=True)
            except subprocess.CalledProcessError as e:
                raise RuntimeError(f"{cmd[0]} failed: {e.stderr.strip()[:500]}") from None
        if verify is not None:
            verify(tmp)
        data = tmp.read_bytes()
        atomic_write(out, data)
        atomic_write(_checksum_path(out), _digest(data) + "\n")
    finally:
        shutil.rmtree(build, ignore_errors=True)


def _compile(cc: str, out: Path) -> None:
    """Compile the C kernels; the result is loaded in the private folder first (a library that does not load or
    lacks a kernel is never published)."""
    _build_and_publish(out, lambda build, tmp: [[cc, *_FLAGS, "-o", str(tmp), str(_SOURCE), "-lm"]], _load_symbols)


def _build() -> ctypes.CDLL:
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set $CC or install gcc)")
    src = b"".join(p.read_bytes() for p in _SOURCES)
    key = hashlib.sha256(src + " ".join([cc, *_FLAGS]).encode() + _cpu_key().encode()).hexdigest()[:16]
    out = _cache_dir() / f"norm_kernels-{key}.so"
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_strays(out.parent)
    if not _verified(out):  # missing, truncated, corrupted, or built by a version that kept no checksum
        _compile(cc, out)
    try:
        return _load_symbols(out)
    except (OSError, AttributeError) as e:
        raise RuntimeError(
            f"could not load the compiled kernels {out} ({e}); delete {out} and {_checksum_path(out)} "
            "and normlab rebuilds them"
        ) from None


# --------------------------------------------------------------------------- the C++ eager operators

_EAGER_SOURCE = _CSRC / "eager_ops.cpp"
_CXX_FLAGS = ["-O2", "-std=c++20", "-shared", "-fPIC", "-fopenmp", "-w"]
_eager_state: dict[str, object] = {}  # "loaded": bool once tried


def _cxx_compiler() -> str | None:
    for cxx in (os.environ.get("CXX"), "c++", "g++"):
        if cxx and shutil.which(cxx):
            return cxx
    return None


def _torch_build_args() -> list[str]:
    """Include and link arguments for PyTorch's own headers and libraries (those of the running torch)."""
    root = Path(torch.__file__).parent
    return [
        f"-I{root / 'include'}",
        f"-I{root / 'include' / 'torch' / 'csrc' / 'api' / 'include'}",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        f"-L{root / 'lib'}",
        f"-Wl,-rpath,{root / 'lib'}",
    ]


def _compile_eager(cc: str, cxx: str, out: Path) -> None:
    """Compile the C kernels and the C++ operators into one library (loaded only once published: loading
    registers the operators, which can happen once per process)."""

    def commands(build: Path, tmp: Path) -> list[list[str]]:
        obj = build / "norm_kernels.o"
        return [
            [cc, *[f for f in _FLAGS if f != "-shared"], "-c", "-o", str(obj), str(_SOURCE)],
            [cxx, *_CXX_FLAGS, "-o", str(tmp), str(_EAGER_SOURCE), str(obj), *_torch_build_args()]
            + ["-lc10", "-ltorch_cpu", "-ltorch", "-lm"],
        ]

    _build_and_publish(out, commands)


def _build_eager() -> None:
    cc, cxx = _compiler(), _cxx_compiler()
    if cc is None or cxx is None:
        raise RuntimeError("no C and C++ compiler found (set $CC and $CXX, or install gcc and g++)")
    src = b"".join(p.read_bytes() for p in (*_SOURCES, _EAGER_SOURCE))
    salt = " ".join([cc, cxx, *_FLAGS, *_CXX_FLAGS, torch.__version__, str(Path(torch.__file__).parent)])
    key = hashlib.sha256(src + salt.encode() + _cpu_key().encode()).hexdigest()[:16]
    out = _cache_dir() / f"eager_ops-{key}.so"
    out.parent.mkdir(parents=True, exist_ok=True)
    _remove_strays(out.parent)
    if not _verified(out):
        _compile_eager(cc, cxx, out)
    try:
        torch.ops.load_library(str(out))  # loaded once: loading registers the operators
    except OSError as e:
        raise RuntimeError(
            f"could not load the compiled operators {out} ({e}); delete {out} and {_checksum_path(out)} "
            "and normlab rebuilds them"
        ) from None


def eager_ops() -> bool:
    """True when ``normlab::batch_norm_eager``/``row_norm_eager`` (csrc/eager_ops.cpp) are loaded.

    Built on first use beside the C kernels (same cache, checksums and atomic publication), with the system
    C++ compiler and the running PyTorch's headers; a failed build warns once and leaves the Python path.
    """
    loaded = _eager_state.get("loaded")
    if loaded is not None:
        return loaded  # type: ignore[return-value]
    with _lock:
        if "loaded" not in _eager_state:
            ok = False
            if library() is not None:  # NORMLAB_NATIVE=0 or no C kernels: no operators either
                try:
                    _build_eager()
                    ok = True
                except Exception as e:  # no C++ compiler, no headers, failed build or load
                    warnings.warn(
                        f"normlab: the C++ eager operators are unavailable ({e}); the layers use the Python path, "
                        "which is correct but costs more per call on small tensors. Install a C++ compiler "
                        "(g++), or set NORMLAB_NATIVE=0 to silence this.",
                        RuntimeWarning,
                        stacklevel=3,
                    )
            _eager_state["loaded"] = ok
    return _eager_state["loaded"]  # type: ignore[return-value]


def library() -> ctypes.CDLL | None:
    """The loaded kernels, building them on first use; ``None`` when unavailable or turned off."""
    global _lib, _tried
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            if os.environ.get("NORMLAB_NATIVE", "1") != "0":
                try:
                    _lib = _build()
                except Exception as e:  # no compiler, failed build, unloadable library
                    warnings.warn(
                        f"normlab: native CPU kernels unavailable ({e}); using the tensor-op path, which is correct "
                        "but slower. Install a C compiler, or set NORMLAB_NATIVE=0 to silence this.",
                        RuntimeWarning,
                        stacklevel=3,
                    )
            _tried = True
    return _lib


_DTYPES = (torch.float32, torch.float64)


def usable(*tensors: Tensor | None) -> bool:
    """True when the native kernels can take these tensors (CPU, float32/float64, contiguous, one dtype).

    Called on every forward and backward: kept to plain attribute checks.
    """
    if _tried and _lib is None:
        return False
    dt = tensors[0].dtype
    if dt not in _DTYPES:
        return False
    for t in tensors:
        if t is not None and (not t.is_cpu or t.dtype != dt or not t.is_contiguous()):
            return False
    return library() is not None


def _fn(name: str, t: Tensor):
    """The kernel ``name`` for ``t``'s dtype (float32 or float64)."""
    return getattr(_lib, f"{name}_{'f32' if t.dtype == torch.float32 else 'f64'}")


def _check(status: int, name: str, *tensors: Tensor) -> None:
    if status == NL_ENOMEM:
        size = sum(t.numel() * t.element_size() for t in tensors if t is not None)
        raise MemoryError(
            f"normlab: the native kernel {name} could not allocate its scratch memory (working on {size} bytes of "
            "tensors); free memory, use smaller batches, or set NORMLAB_NATIVE=0 to use the tensor-op path"
        )


def _nt(n: int) -> int:
    return 1 if n < _MIN_PARALLEL else max(1, torch.get_num_threads())


def _p(t: Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def column_mean_var(x3: Tensor) -> tuple[Tensor, Tensor]:
    a, c, b = x3.shape
    mean = torch.empty(c, dtype=torch.float64)
    var = torch.empty(c, dtype=torch.float64)
    _check(_fn("col_stats", x3)(_p(x3), a, c, b, _p(mean), _p(var), _nt(x3.numel())), "col_stats", x3)
    return mean, var


def column_sums_for_backward(g3: Tensor, x3: Tensor, mean: Tensor) -> tuple[Tensor, Tensor]:
    a, c, b = x3.shape
    m = mean.to(torch.float64).contiguous()
    sg = torch.empty(c, dtype=torch.float64)
    sgc = torch.empty(c, dtype=torch.float64)
    status = _fn("col_bwd_sums", x3)(_p(g3), _p(x3), a, c, b, _p(m), _p(sg), _p(sgc), _nt(x3.numel()))
    _check(status, "col_bwd_sums", g3, x3)
    return sg, sgc


def column_affine(
    x3: Tensor, centre: Tensor, kx: Tensor, shift: Tensor, g3: Tensor | None = None, kg: Tensor | None = None
) -> Tensor:
    """``(x - centre) * kx + g * kg + shift`` with per-channel (C,) coefficients."""
    a, c, b = x3.shape
    dt = x3.dtype
    vec = [t.to(dt).contiguous() for t in (centre, kx, shift)] + [None if kg is None else kg.to(dt).contiguous()]
    out = torch.empty_like(x3)
    _fn("col_affine", x3)(
        _p(x3), _p(g3), _p(out), a, c, b, _p(vec[0]), None, _p(vec[1]), _p(vec[3]), _p(vec[2]), _nt(x3.numel())
    )
    return out


def row_layout(x: Tensor, red: int, weight: Tensor | None) -> tuple[int, int, int, int] | None:
    """(R, K, G, L) for the row kernels, or None when the affine's layout does not fit them.

    ``x`` is (*lead, *red_shape); ``weight`` broadcasts against it with size 1 on
    dim 0. G counts the distinct affine groups along ``lead[1:]``; L is the run
    of trailing normalised elements that share one affine value.
    """
    lead, red_shape = x.shape[: x.dim() - red], x.shape[x.dim() - red :]
    r = 1
    for d in lead:
        r *= d
    k = 1
    for d in red_shape:
        k *= d
    if weight is None:
        return r, k, 1, max(k, 1)
    ws = weight.shape
    wl, wr = ws[1 : len(lead)], ws[len(lead) :]
    if any(d not in (1, full) for d, full in zip(ws, x.shape)):
        return None
    if all(d == 1 for d in wl):
        g = 1
    elif tuple(wl) == tuple(lead[1:]):
        g = 1
        for d in lead[1:]:
            g *= d
    else:
        return None
    # wr must be (varying..., 1, ..., 1): L is the product of the trailing size-1 run
    n_one = 0
    for d in reversed(wr):
        if d != 1:
            break
        n_one += 1
    varying = wr[: len(wr) - n_one]
    if any(d == 1 and full != 1 for d, full in zip(varying, red_shape)):
        return None
    l = 1
    for d in red_shape[len(red_shape) - n_one :]:
        l *= d
    return r, k, g, l


def ema_update(running_mean, running_var, mean: Tensor, var: Tensor, weight: float, var_scale: float) -> int:
    """Blend batch statistics into running buffers in place.

    Returns ``EMA_UPDATED``, or changes nothing and returns ``EMA_NONFINITE`` (a batch mean is not
    finite: the input had a NaN or an infinity) or ``EMA_OVERFLOW`` (finite input whose variance
    does not fit the dtype).
    """
    return _fn("ema_update", mean)(
        _p(running_mean), _p(running_var), _p(mean), _p(var), mean.numel(), float(weight), float(var_scale)
    )


def column_forward(x3: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float):
    """BatchNorm forward on (A, C, B): ``(y3, mean, var, invstd)``, statistics in ``x3``'s dtype."""
    a, c, b = x3.shape
    stats = [torch.empty(c, dtype=x3.dtype) for _ in range(3)]  # separate tensors: operator outputs never alias
    y3 = torch.empty_like(x3)
    status = _fn("col_forward", x3)(
        _p(x3),
        _p(y3),
        a,
        c,
        b,
        _p(weight),
        _p(bias),
        float(eps),
        _p(stats[0]),
        _p(stats[1]),
        _p(stats[2]),
        _nt(x3.numel()),
    )
    _check(status, "col_forward", x3)
    return y3, stats[0], stats[1], stats[2]


def column_backward(
    g3: Tensor, x3: Tensor, mean: Tensor, invstd: Tensor, weight: Tensor | None, need: tuple[bool, bool, bool]
):
    """BatchNorm backward on (A, C, B): ``(dx, dweight, dbias)``, each ``None`` when not needed."""
    a, c, b = x3.shape
    dx = torch.empty_like(x3) if need[0] else None
    dw = torch.empty(c, dtype=x3.dtype) if need[1] else None
    db = torch.empty(c, dtype=x3.dtype) if need[2] else None
    status = _fn("col_backward", x3)(
        _p(g3), _p(x3), _p(dx), a, c, b, _p(mean), _p(invstd), _p(weight), _p(dw), _p(db), _nt(x3.numel())
    )
    _check(status, "col_backward", g3, x3)
    return dx, dw, db


def row_forward(x: Tensor, layout, centered: bool, eps: float, weight: Tensor | None, bias: Tensor | None):
    """Row norm forward: ``(y, mean, var, rstd)``, per-row statistics (R,) in ``x``'s dtype."""
    r, k, g, l = layout
    stats = [torch.empty(r, dtype=x.dtype) for _ in range(3)]  # separate tensors: operator outputs never alias
    y = torch.empty_like(x)
    _fn("row_fwd", x)(
        _p(x),
        _p(y),
        r,
        k,
        g,
        l,
        _p(weight),
        _p(bias),
        float(eps),
        int(centered),
        _p(stats[0]),
        _p(stats[1]),
        _p(stats[2]),
        _nt(x.numel()),
    )
    return y, stats[0], stats[1], stats[2]


def row_backward(
    g_: Tensor,
    x: Tensor,
    layout,
    weight: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    centered: bool,
    need_dx: bool,
    need_params: bool,
):
    """Row norm backward: ``dx`` and flat ``dweight``/``dbias`` (G * S,) in ``x``'s dtype."""
    r, k, g, l = layout
    dx = torch.empty_like(x) if need_dx else None
    p = g * (k // l) if l else 0
    dw = torch.empty(p, dtype=x.dtype) if need_params else None
    db = torch.empty(p, dtype=x.dtype) if need_params else None
    status = _fn("row_bwd", x)(
        _p(g_),
        _p(x),
        _p(dx),
        r,
        k,
        g,
        l,
        _p(weight),
        _p(mean.contiguous()),
        _p(rstd.contiguous()),
        int(centered),
        _p(dw),
        _p(db),
        _nt(x.numel()),
    )
    _check(status, "row_bwd", g_, x)
    return dx, dw, db
