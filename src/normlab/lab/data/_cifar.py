"""CIFAR-10 / CIFAR-100 from the standard python-pickle batches in a local folder.

The files are those of the official "python version" tarballs: each data file
is a pickled dict with ``data`` — a (n, 3072) uint8 array, one image per row
as three 32x32 planes (R, G, B), row-major — and the labels (``labels`` for
CIFAR-10; ``fine_labels`` and ``coarse_labels`` for CIFAR-100); the meta file
holds the class names. Keys may be bytes (as written by Python 2) or str.

Nothing is ever downloaded implicitly: :func:`download_cifar` (or
``load_dataset(..., download=True)``) does it when asked, and verifies the
tarball's MD5 checksum before extracting.

Safety: the files are pickles, and an ordinary ``pickle.load`` runs whatever
code a file asks for. They are read with an unpickler restricted to what the
format holds (dicts, lists, bytes and str, numbers, numpy arrays of a numeric
dtype); a file that asks for anything else (a ``__reduce__`` calling
``os.system``, say) is refused with one :class:`ValueError` naming it, before
anything it asks for runs. Each file's MD5 is compared with the published one
(the checksums torchvision also uses); a file that differs still loads when it
has the right format, with a :class:`RuntimeWarning` saying it is not the
official data.
"""

from __future__ import annotations

import codecs
import hashlib
import io
import os
import pickle
import shutil
import tarfile
import tempfile
import urllib.request
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from normlab.lab.data._core import Raw, register_dataset

__all__ = ["download_cifar", "read_cifar", "find_cifar_folder", "safe_unpickle", "CIFAR_SPECS"]

CIFAR_SPECS = {
    "cifar10": {
        "title": "CIFAR-10",
        "folder": "cifar-10-batches-py",
        "train": [f"data_batch_{i}" for i in range(1, 6)],
        "test": ["test_batch"],
        "meta": "batches.meta",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        "md5": "c58f30108f718f92721af3b95e74349a",
        "file_md5": {  # the extracted files, as published
            "data_batch_1": "c99cafc152244af753f735de768cd75f",
            "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
            "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
            "data_batch_4": "634d18415352ddfa80567beed471001a",
            "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
            "test_batch": "40351d587109b95175f43aff81a1287e",
            "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
        },
    },
    "cifar100": {
        "title": "CIFAR-100",
        "folder": "cifar-100-python",
        "train": ["train"],
        "test": ["test"],
        "meta": "meta",
        "url": "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        "md5": "eb9058c3a382ffc7106e4002c42a8d85",
        "file_md5": {
            "train": "16019d7e3df5f24257cddd939b257f8d",
            "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
            "meta": "7973b15100ade9c7d40fb424638fde48",
        },
    },
}


def _spec(name: str) -> dict:
    key = str(name).lower().replace("-", "")
    if key not in CIFAR_SPECS:
        raise KeyError(f"unknown CIFAR set {name!r}; choose 'cifar10' or 'cifar100'")
    return CIFAR_SPECS[key]


def _expected(spec: dict) -> list[str]:
    return spec["train"] + spec["test"] + [spec["meta"]]


def _how_to_get(name: str, spec: dict, data_dir) -> str:
    where = data_dir if data_dir is not None else "DATA_DIR"
    return (
        f"get them with normlab.lab.data.download_cifar({name!r}, {str(where)!r}) "
        f"(or load_dataset({name!r}, data_dir=..., download=True)) where a network is available, "
        f"or download {spec['url']} yourself and extract it into {str(where)!r}"
    )


def find_cifar_folder(name: str, data_dir) -> Path:
    """The folder holding the batches: ``data_dir/<standard folder>`` or ``data_dir`` itself.

    Raises :class:`FileNotFoundError` naming the expected files and how to get them.
    """
    spec = _spec(name)
    if data_dir is None:
        raise FileNotFoundError(
            f"{spec['title']} is read from local files, but no data_dir was given; pass data_dir= "
            f"(CLI: --set data_kwargs.data_dir=PATH) pointing at a folder that contains {spec['folder']}/ with "
            f"{', '.join(_expected(spec))}; " + _how_to_get(name, spec, None)
        )
    root = Path(data_dir).expanduser()
    for candidate in (root / spec["folder"], root):
        if candidate.is_dir() and all((candidate / f).is_file() for f in _expected(spec)):
            return candidate
    look = root / spec["folder"] if (root / spec["folder"]).is_dir() else root
    missing = [f for f in _expected(spec) if not (look / f).is_file()] if look.is_dir() else _expected(spec)
    raise FileNotFoundError(
        f"{spec['title']} not found: expected the folder {root / spec['folder']} (or {root} itself) to contain "
        f"{', '.join(_expected(spec))}; missing in {look}: {', '.join(missing)}. " + _how_to_get(name, spec, data_dir)
    )


def _get(d: dict, key: str):
    for k in (key, key.encode()):
        if k in d:
            return d[k]
    raise KeyError(key)


class UnsafePickleError(pickle.UnpicklingError):
    """A pickle asks for something a CIFAR batch never holds; nothing it asked for was run."""


def _reconstruct(subtype, shape, dtype):
    """numpy's array constructor for pickles, for plain ndarrays only."""
    if subtype is not np.ndarray:
        raise UnsafePickleError(f"an array of type {subtype!r}, not numpy.ndarray")
    return np.ndarray.__new__(np.ndarray, shape, dtype)


def _frombuffer(buffer, dtype, shape, order):
    """numpy's pickle-protocol-5 array constructor (a copy, so the array owns its memory)."""
    return np.frombuffer(buffer, dtype=dtype).reshape(shape, order=order).copy()


def _latin1(text, encoding="latin1"):
    """How pickle protocol 2 writes bytes from Python 3: ``_codecs.encode(text, "latin1")``, and nothing else."""
    if encoding != "latin1" or not isinstance(text, str):
        raise UnsafePickleError(f"_codecs.encode with {encoding!r}")
    return codecs.encode(text, "latin1")


# (module, name) -> what it may resolve to: numpy arrays and dtypes (numpy 1 and 2 module names), protocol-2 bytes
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): _reconstruct,
    ("numpy.core.numeric", "_frombuffer"): _frombuffer,
    ("numpy._core.numeric", "_frombuffer"): _frombuffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1,
}


class _CifarUnpickler(pickle.Unpickler):
    """An unpickler that knows only the few globals a CIFAR batch needs; anything else is refused unrun."""

    def find_class(self, module: str, name: str):
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise UnsafePickleError(f"it asks for {module}.{name}, which a CIFAR batch never holds") from None

    def persistent_load(self, pid):
        raise UnsafePickleError("it holds a persistent reference, which a CIFAR batch never holds")


def _check_plain(obj: Any, depth: int = 0) -> None:
    """Refuse anything but dicts, lists, tuples, bytes, str, numbers and numeric numpy arrays."""
    if depth > 20:
        raise UnsafePickleError("it is nested deeper than a CIFAR batch")
    if isinstance(obj, dict):
        for k, v in obj.items():
            _check_plain(k, depth + 1)
            _check_plain(v, depth + 1)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            _check_plain(v, depth + 1)
    elif isinstance(obj, np.ndarray):
        if obj.dtype.hasobject:
            raise UnsafePickleError("it holds a numpy array of Python objects")
    elif not (obj is None or isinstance(obj, (bytes, str, bool, int, float))):
        raise UnsafePickleError(f"it holds a {type(obj).__name__}")


def safe_unpickle(data: bytes) -> Any:
    """Unpickle ``data`` allowing only what CIFAR batches hold; :class:`UnsafePickleError` for anything else.

    Nothing the pickle asks for outside numpy's array constructors is ever
    called, so a malicious file cannot run code.
    """
    obj = _CifarUnpickler(io.BytesIO(data), encoding="bytes").load()
    _check_plain(obj)
    return obj


def _read_pickle(path: Path, name: str, spec: dict, data_dir) -> tuple[dict, str]:
    """The dict in the CIFAR pickle ``path`` (read with :func:`safe_unpickle`) and the file's MD5."""
    data = path.read_bytes()
    md5 = hashlib.md5(data).hexdigest()
    try:
        obj = safe_unpickle(data)
    except UnsafePickleError as e:
        raise ValueError(
            f"refusing to load {spec['title']} file {path}: {e}, so it is not a CIFAR python-pickle batch "
            f"(MD5 {md5}); nothing in it was run. Delete the folder and " + _how_to_get(name, spec, data_dir)
        ) from None
    except Exception as e:  # truncated, not a pickle, ...
        raise ValueError(
            f"{spec['title']} file {path} is corrupt or not a CIFAR python-pickle batch ({type(e).__name__}: {e}); "
            "delete the folder and " + _how_to_get(name, spec, data_dir)
        ) from None
    if not isinstance(obj, dict):
        raise ValueError(
            f"{spec['title']} file {path} holds a {type(obj).__name__}, expected a dict; "
            + _how_to_get(name, spec, data_dir)
        )
    return obj, md5


def _check_checksums(folder: Path, md5s: dict[str, str], name: str, spec: dict, data_dir) -> None:
    """Warn (once) when files differ from the published ones: they load, but are not the official data."""
    published = spec.get("file_md5", {})
    differ = [f for f, got in md5s.items() if f in published and got != published[f]]
    if differ:
        warnings.warn(
            f"{spec['title']} files in {folder} are not the published ones (MD5 differs for {', '.join(differ)}): "
            "they load, but numbers from them will not compare with runs on the official data; if that is not "
            "intended, " + _how_to_get(name, spec, data_dir),
            RuntimeWarning,
            stacklevel=3,
        )


def _read_batch(path: Path, label_key: str, name: str, spec: dict, data_dir, md5s: dict[str, str]):
    """``(x, y)`` of one batch file, x as (n, 3, 32, 32) uint8; records the file's MD5 in ``md5s``."""
    d, md5s[path.name] = _read_pickle(path, name, spec, data_dir)
    try:
        data = np.asarray(_get(d, "data"))
        labels = np.asarray(_get(d, label_key), dtype=np.int64)
    except KeyError as e:
        raise ValueError(
            f"{spec['title']} file {path} has no {e.args[0]!r} entry (keys: {sorted(map(str, d))}); expected "
            f"'data' and {label_key!r}; " + _how_to_get(name, spec, data_dir)
        ) from None
    if data.ndim != 2 or data.shape[1] != 3072 or data.dtype != np.uint8 or labels.shape != (data.shape[0],):
        raise ValueError(
            f"{spec['title']} file {path}: 'data' must be a (n, 3072) uint8 array with n labels; got data "
            f"{data.shape} {data.dtype} and {labels.shape[0] if labels.ndim else 0} labels; "
            + _how_to_get(name, spec, data_dir)
        )
    return data.reshape(-1, 3, 32, 32), labels  # (n, 3, 32, 32)


def read_cifar(
    name: str, data_dir, *, label_mode: str = "fine"
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, list[str]]:
    """``(x_train, y_train, x_test, y_test, class_names)`` with x as (n, 3, 32, 32) uint8."""
    spec = _spec(name)
    folder = find_cifar_folder(name, data_dir)
    if spec is CIFAR_SPECS["cifar10"]:
        label_key, names_key = "labels", "label_names"
    elif label_mode in ("fine", "coarse"):
        label_key, names_key = f"{label_mode}_labels", f"{label_mode}_label_names"
    else:
        raise ValueError(f"label_mode must be 'fine' (100 classes) or 'coarse' (20 superclasses), got {label_mode!r}")
    md5s: dict[str, str] = {}
    meta, md5s[spec["meta"]] = _read_pickle(folder / spec["meta"], name, spec, data_dir)
    try:
        names = [n.decode() if isinstance(n, bytes) else str(n) for n in _get(meta, names_key)]
    except KeyError:
        raise ValueError(
            f"{spec['title']} meta file {folder / spec['meta']} has no {names_key!r} entry; "
            + _how_to_get(name, spec, data_dir)
        ) from None
    out = []
    for files in (spec["train"], spec["test"]):
        xs, ys = zip(*(_read_batch(folder / f, label_key, name, spec, data_dir, md5s) for f in files))
        x, y = np.concatenate(xs), np.concatenate(ys)
        if y.size and (y.min() < 0 or y.max() >= len(names)):
            raise ValueError(
                f"{spec['title']} labels in {folder} run from {y.min()} to {y.max()}, but the meta file names "
                f"{len(names)} classes; the files are inconsistent — " + _how_to_get(name, spec, data_dir)
            )
        out += [x, y]
    _check_checksums(folder, md5s, name, spec, data_dir)
    return out[0], out[1], out[2], out[3], names


def _md5(path: Path) -> str:
    h = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def download_cifar(name: str, data_dir, *, url: str | None = None, md5: str | None = None, force: bool = False) -> Path:
    """Download and extract the python-pickle tarball of ``name`` into ``data_dir``; returns the folder.

    Skipped when the folder is already complete (unless ``force``). The
    tarball's MD5 must equal the published one (``md5`` overrides it, ``url``
    the address — e.g. a mirror or a ``file://`` path); on a mismatch the
    download is deleted and :class:`ValueError` raised. Extraction uses
    tarfile's ``"data"`` filter (no absolute paths, links out of the folder, ...).
    """
    spec = _spec(name)
    root = Path(data_dir).expanduser()
    if not force:
        try:
            return find_cifar_folder(name, root)
        except FileNotFoundError:
            pass
    root.mkdir(parents=True, exist_ok=True)
    url = url or spec["url"]
    md5 = (md5 or spec["md5"]).lower()
    fd, tmp = tempfile.mkstemp(dir=root, prefix=".download-", suffix=".tar.gz")
    try:
        with os.fdopen(fd, "wb") as f, urllib.request.urlopen(url, timeout=60) as r:
            shutil.copyfileobj(r, f, length=1 << 20)
        got = _md5(Path(tmp))
        if got != md5:
            raise ValueError(
                f"checksum mismatch for {url}: MD5 {got}, expected {md5}; the download was deleted, try again"
            )
        with tarfile.open(tmp, "r:gz") as tar:
            tar.extractall(root, filter="data")
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return find_cifar_folder(name, root)


def _load(name: str, data_dir, download: bool, label_mode: str = "fine") -> Raw:
    if download:
        if data_dir is None:
            raise ValueError(f"download=True needs data_dir= (where to put {_spec(name)['folder']}/)")
        download_cifar(name, data_dir)
    xtr, ytr, xte, yte, names = read_cifar(name, data_dir, label_mode=label_mode)
    return Raw(xtr, ytr, xte, yte, num_classes=len(names), kind="image")


@register_dataset("cifar10")
def _cifar10(*, seed: int, data_dir=None, download: bool = False) -> Raw:
    """CIFAR-10 as (3, 32, 32) images, 10 classes, 50000 train / 10000 test, read from ``data_dir``.

    ``download=True`` fetches and checks the tarball first (only then is the network used).
    """
    return _load("cifar10", data_dir, download)


@register_dataset("cifar100")
def _cifar100(*, seed: int, data_dir=None, download: bool = False, label_mode: str = "fine") -> Raw:
    """CIFAR-100 as (3, 32, 32) images, read from ``data_dir``; ``label_mode`` 'fine' (100 classes) or 'coarse' (20).

    ``download=True`` fetches and checks the tarball first (only then is the network used).
    """
    return _load("cifar100", data_dir, download, label_mode)
