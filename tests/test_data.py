"""normlab.lab.data: loaders, splits, standardisation, the CIFAR reader and Batches, against numpy oracles."""

from __future__ import annotations

import hashlib
import os
import pickle
import random
import tarfile
from collections import Counter

import numpy as np
import pytest
import torch

from normlab.lab.data import Augment, Batches, Dataset, dataset_names, download_cifar, load_dataset, stratified_subset

# the CIFAR files written here have the right format but not the published bytes: the checksum warning is expected
pytestmark = pytest.mark.filterwarnings("ignore:CIFAR-.* not the published ones:RuntimeWarning")

SMALL = {
    "digits": {},
    "mnist1d": {"args": {"num_samples": 600}},
    "synthetic-images": {"n_train": 120, "n_test": 60, "size": 8, "channels": 2, "num_classes": 4},
    "synthetic-sequences": {"n_train": 120, "n_test": 60, "seq_len": 12, "dim": 6, "min_len": 3},
}
EXPECTED = {  # kind, input_shape, num_classes
    "digits": ("image", (1, 8, 8), 10),
    "mnist1d": ("signal", (1, 40), 10),
    "synthetic-images": ("image", (2, 8, 8), 4),
    "synthetic-sequences": ("sequence", (12, 6), 4),
}


@pytest.fixture(autouse=True)
def _cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("NORMLAB_CACHE", str(tmp_path_factory.getbasetemp() / "normlab-cache"))


def _same(a: Dataset, b: Dataset) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("x_train", "y_train", "x_test", "y_test"))


def test_dataset_names_lists_every_builtin():
    builtin = {"digits", "mnist1d", "synthetic-images", "synthetic-sequences", "cifar10", "cifar100"}
    assert set(dataset_names()) >= builtin


def test_unknown_name_and_option_say_what_is_valid():
    with pytest.raises(KeyError, match="known datasets: cifar10, cifar100, digits"):
        load_dataset("imagenet")
    with pytest.raises(TypeError, match="unknown option.*'colour'.*valid options: test_fraction"):
        load_dataset("digits", colour=True)
    with pytest.raises(ValueError, match="n_train=5000 but 'digits' has only"):
        load_dataset("digits", n_train=5000)


@pytest.mark.parametrize("name", sorted(SMALL))
def test_shapes_dtypes_and_labels(name):
    ds = load_dataset(name, seed=0, **SMALL[name])
    kind, shape, k = EXPECTED[name]
    assert (ds.kind, ds.input_shape, ds.num_classes) == (kind, shape, k)
    for x, y, m in ((ds.x_train, ds.y_train, ds.mask_train), (ds.x_test, ds.y_test, ds.mask_test)):
        assert x.dtype == torch.float32 and y.dtype == torch.int64
        assert x.shape == (len(y), *shape) and y.dim() == 1
        assert int(y.min()) >= 0 and int(y.max()) < k
        assert len(torch.unique(y)) == k  # every class present
        assert torch.isfinite(x).all()
        if kind == "sequence":
            assert m.dtype == torch.bool and m.shape == x.shape[:2]
            assert m.any(1).all()
        else:
            assert m is None


@pytest.mark.parametrize("name", ["digits", "synthetic-images", "synthetic-sequences"])
def test_seed_determines_the_data(name):
    a, b = load_dataset(name, seed=3, **SMALL[name]), load_dataset(name, seed=3, **SMALL[name])
    c = load_dataset(name, seed=4, **SMALL[name])
    assert _same(a, b)
    assert not _same(a, c)


def test_digits_split_is_a_stratified_partition_of_sklearn_digits():
    from sklearn.datasets import load_digits

    raw = load_digits()
    ds = load_dataset("digits", seed=1, test_fraction=0.25)
    # undo the standardisation; pixels are integers 0..16
    back = lambda x: torch.round(x * ds.std + ds.mean).flatten(1).numpy().astype(np.int64)  # noqa: E731
    tr, te = back(ds.x_train), back(ds.x_test)
    assert np.abs(tr - (ds.x_train * ds.std + ds.mean).flatten(1).numpy()).max() < 1e-4
    rows = lambda a, y: Counter(tuple(r) + (int(c),) for r, c in zip(a, y))  # noqa: E731
    train_rows, test_rows = rows(tr, ds.y_train.numpy()), rows(te, ds.y_test.numpy())
    assert not set(train_rows) & set(test_rows)  # disjoint (the 1797 digits images are all distinct)
    assert train_rows + test_rows == rows(raw.data.astype(np.int64), raw.target)  # and together all of them
    per_class = np.bincount(raw.target)
    assert np.all(np.abs(np.bincount(ds.y_test.numpy()) - 0.25 * per_class) <= 1)


def test_n_train_subset_is_stratified_and_seeded():
    a = load_dataset("digits", seed=0, n_train=100, n_test=50)
    assert len(a.y_train) == 100 and len(a.y_test) == 50
    full = load_dataset("digits", seed=0)
    for sub, whole in ((a.y_train, full.y_train), (a.y_test, full.y_test)):
        expected = len(sub) * np.bincount(whole.numpy()) / len(whole)
        assert np.all(np.abs(np.bincount(sub.numpy()) - expected) < 1)
    assert _same(a, load_dataset("digits", seed=0, n_train=100, n_test=50))


def test_stratified_subset_keeps_class_proportions():
    y = np.array([0] * 50 + [1] * 30 + [2] * 3)
    for seed in range(3):
        idx = stratified_subset(y, 20, np.random.default_rng(seed))
        assert len(np.unique(idx)) == 20
        assert np.bincount(y[idx]).tolist() == [12, 7, 1]  # 20 * (50, 30, 3) / 83 = 12.05, 7.23, 0.72


def test_standardisation_uses_train_statistics_per_channel():
    ds = load_dataset("synthetic-images", seed=0, standardize=False, **SMALL["synthetic-images"])
    st = load_dataset("synthetic-images", seed=0, **SMALL["synthetic-images"])
    xtr, xte = ds.x_train.double().numpy(), ds.x_test.double().numpy()
    mean = xtr.mean(axis=(0, 2, 3), keepdims=True)
    std = xtr.std(axis=(0, 2, 3), keepdims=True)
    np.testing.assert_allclose(st.x_train.numpy(), (xtr - mean) / std, atol=1e-5)
    np.testing.assert_allclose(st.x_test.numpy(), (xte - mean) / std, atol=1e-5)
    assert st.std.shape == (2, 1, 1)
    assert not np.allclose(st.x_test.numpy().mean(axis=(0, 2, 3)), 0.0, atol=1e-7)  # test set is not re-centred


def test_sequence_standardisation_ignores_padding_and_keeps_it_zero():
    ds = load_dataset("synthetic-sequences", seed=0, **SMALL["synthetic-sequences"])
    x, m = ds.x_train.double().numpy(), ds.mask_train.numpy()
    real = x[m]  # (number of real tokens, D)
    np.testing.assert_allclose(real.mean(0), 0.0, atol=1e-5)
    np.testing.assert_allclose(real.std(0), 1.0, atol=1e-4)
    assert np.all(x[~m] == 0) and np.all(ds.x_test.numpy()[~ds.mask_test.numpy()] == 0)
    lengths = ds.mask_train.sum(1)
    assert int(lengths.min()) >= 3 and int(lengths.max()) <= 12 and len(torch.unique(lengths)) > 3
    assert torch.equal(ds.mask_train, torch.arange(12)[None, :] < lengths[:, None])  # padding at the end


def test_mnist1d_is_the_packages_own_generator_output_and_is_cached(monkeypatch):
    from mnist1d.data import get_dataset_args, make_dataset

    from normlab.lab.data import _builtin, cache_dir

    np.random.seed(123)
    random.seed(7)
    before = (np.random.get_state()[1].copy(), random.getstate())
    ds = load_dataset("mnist1d", **SMALL["mnist1d"])
    # the generator's global seeding is undone
    assert np.array_equal(np.random.get_state()[1], before[0]) and random.getstate() == before[1]
    args = get_dataset_args()
    args.num_samples = 600
    ref = make_dataset(args)
    np.testing.assert_allclose((ds.x_train * ds.std + ds.mean)[:, 0].numpy(), ref["x"], atol=1e-4)
    np.testing.assert_array_equal(ds.y_test.numpy(), ref["y_test"])
    files = list(cache_dir().glob("mnist1d-*.npz"))
    assert files and not list(cache_dir().glob("*.tmp"))

    def boom(_):
        raise AssertionError("regenerated although cached")

    monkeypatch.setattr(_builtin, "_generate_mnist1d", boom)
    assert _same(ds, load_dataset("mnist1d", **SMALL["mnist1d"]))
    small = load_dataset("mnist1d", n_train=50, **SMALL["mnist1d"])
    assert np.all(np.abs(np.bincount(small.y_train.numpy()) - 50 * np.bincount(ref["y"]) / len(ref["y"])) < 1)
    with pytest.raises(AssertionError, match="regenerated"):  # other args, other cache key
        load_dataset("mnist1d", args={"num_samples": 700})


# ------------------------------------------------------------------ Batches


@pytest.mark.parametrize("n, bs, drop_last", [(103, 10, False), (103, 10, True), (100, 25, False), (7, 7, True)])
def test_batches_cover_every_index_once_per_epoch(n, bs, drop_last):
    x = torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 3)
    y = torch.arange(n)
    it = Batches(x, y, bs, seed=5, drop_last=drop_last)
    assert len(it) == (n // bs if drop_last else -(-n // bs))
    for _ in range(2):
        batches = list(it)
        assert len(batches) == len(it)
        seen = torch.cat([yb for _, yb in batches])
        assert all(len(yb) == bs for _, yb in batches[:-1])
        assert len(torch.unique(seen)) == len(seen) == (len(it) * bs if drop_last else n)
        for xb, yb in batches:
            assert torch.equal(xb[:, 0].long(), yb)  # x and y stay paired


def test_batches_are_seeded_per_epoch():
    y = torch.arange(50)
    order = lambda it: torch.cat([b[1] for b in it])  # noqa: E731
    a, b, c = Batches(y, y, 8, seed=1), Batches(y, y, 8, seed=1), Batches(y, y, 8, seed=2)
    e0, e1 = order(a), order(a)
    assert torch.equal(e0, order(b)) and torch.equal(e1, order(b))
    assert not torch.equal(e0, e1)  # a new order each epoch
    assert not torch.equal(e0, order(c))
    b.set_epoch(1)
    assert torch.equal(order(b), e1)  # resumable
    torch.manual_seed(0)
    _ = torch.rand(3)  # the global RNG plays no part
    b.set_epoch(0)
    assert torch.equal(order(b), e0)
    assert torch.equal(order(Batches(y, y, 8, shuffle=False)), y)


@pytest.mark.parametrize("n, bs, drop_last", [(100, 8, False), (100, 8, True), (60, 5, True)])
def test_class_sorted_batches_hold_one_class_each_in_a_shuffled_sequence(n, bs, drop_last):
    y = torch.arange(n) % 4  # 4 balanced classes, interleaved
    x = torch.arange(n, dtype=torch.float32)[:, None]
    it = Batches(x, y, bs, seed=3, drop_last=drop_last, order="class-sorted")
    assert len(it) == len(Batches(x, y, bs, drop_last=drop_last))
    epochs = [list(it), list(it)]
    for batches in epochs:
        seen = torch.cat([xb[:, 0].long() for xb, _ in batches])
        assert len(torch.unique(seen)) == len(seen) == (len(it) * bs if drop_last else n)  # each sample once
        for xb, yb in batches:
            assert torch.equal(y[xb[:, 0].long()], yb)  # x and y stay paired
        # numpy oracle: cut the label-sorted epoch into batches; a batch spans two classes only at a class end
        labels = np.sort(y.numpy())[: len(seen)]
        expected = sorted(len(np.unique(labels[i : i + bs])) for i in range(0, len(labels), bs))
        assert sorted(len(torch.unique(yb)) for _, yb in batches) == expected
        first = [int(yb[0]) for _, yb in batches]
        assert first != sorted(first)  # the batches are not visited class by class
    assert not all(torch.equal(a[1], b[1]) for a, b in zip(*epochs))  # a new order each epoch
    again = Batches(x, y, bs, seed=3, drop_last=drop_last, order="class-sorted")
    assert all(torch.equal(a[0], b[0]) for a, b in zip(epochs[0], again))  # seeded
    with pytest.raises(ValueError, match="order='random' is not one of: 'shuffled', 'class-sorted'"):
        Batches(x, y, bs, order="random")
    with pytest.raises(ValueError, match="needs integer class labels"):
        Batches(x, y.float(), bs, order="class-sorted")
    with pytest.raises(ValueError, match="shuffle=True"):
        Batches(x, y, bs, order="class-sorted", shuffle=False)


def test_batches_yield_masks_on_the_device():
    x, y, m = torch.randn(10, 4, 3), torch.arange(10), torch.rand(10, 4) > 0.3
    for xb, yb, mb in Batches(x, y, 4, mask=m, device="cpu"):
        assert mb.shape == (len(yb), 4) and mb.dtype == torch.bool and xb.device.type == "cpu"
        assert torch.equal(mb, m[yb]) and torch.equal(xb, x[yb])


def test_batches_reject_bad_arguments():
    x, y = torch.randn(5, 2), torch.arange(5)
    with pytest.raises(ValueError, match="same first dimension"):
        Batches(x, y[:4], 2)
    with pytest.raises(ValueError, match="batch_size must be a positive int"):
        Batches(x, y, 0)
    with pytest.raises(ValueError, match="leaves no batch"):
        Batches(x, y, 8, drop_last=True)
    with pytest.raises(ValueError, match="applies to images"):
        Batches(x, y, 2, augment="flip")
    with pytest.raises(ValueError, match="augment must be"):
        Batches(torch.randn(5, 1, 4, 4), y, 2, augment="rotate")


def _windows(xp: np.ndarray, h: int, w: int) -> list[np.ndarray]:
    return [xp[:, i : i + h, j : j + w] for i in range(xp.shape[1] - h + 1) for j in range(xp.shape[2] - w + 1)]


def test_augment_flip_and_crop_match_numpy():
    x = torch.randn(64, 2, 6, 5)
    g = torch.Generator().manual_seed(0)
    flipped = Augment(flip=True, pad=0)(x, g)
    is_flip = [torch.equal(f, s.flip(-1)) for f, s in zip(flipped, x)]
    assert all(torch.equal(f, s) or fl for f, s, fl in zip(flipped, x, is_flip))
    assert 10 < sum(is_flip) < 54
    cropped = Augment(flip=False, pad=2)(x, g).numpy()
    shifted = 0
    for c, s in zip(cropped, x.numpy()):
        xp = np.pad(s, ((0, 0), (2, 2), (2, 2)))
        wins = _windows(xp, 6, 5)
        assert any(np.array_equal(c, w) for w in wins)
        shifted += not np.array_equal(c, s)
    assert shifted > 40
    both = Augment(flip=True, pad=1)(x, g).numpy()
    n_flipped = 0
    for c, s in zip(both, x.numpy()):
        plain = any(np.array_equal(c, w) for w in _windows(np.pad(s, ((0, 0), (1, 1), (1, 1))), 6, 5))
        flipped = any(np.array_equal(c, w) for w in _windows(np.pad(s[..., ::-1], ((0, 0), (1, 1), (1, 1))), 6, 5))
        assert plain or flipped
        n_flipped += flipped and not plain
    assert 10 < n_flipped < 54
    sig = torch.randn(16, 1, 40)
    out = Augment(flip=False, pad=None)(sig, g)  # pad = 40 / 8 = 5
    for o, s in zip(out.numpy(), sig.numpy()):
        xp = np.pad(s, ((0, 0), (5, 5)))
        assert any(np.array_equal(o, xp[:, i : i + 40]) for i in range(11))


def test_batches_augmentation_is_seeded():
    x, y = torch.randn(40, 3, 8, 8), torch.arange(40)
    run = lambda: [xb for xb, _ in Batches(x, y, 16, seed=9, augment="flip+crop")]  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(run(), run()))
    xl = x.contiguous(memory_format=torch.channels_last)
    for a, (b, _) in zip(run(), Batches(xl, y, 16, seed=9, augment="flip-crop")):
        assert torch.equal(a, b) and b.is_contiguous(memory_format=torch.channels_last)
    assert not all(torch.equal(a, x[yb]) for a, (_, yb) in zip(run(), Batches(x, y, 16, seed=9)))


# ------------------------------------------------------------------ CIFAR files


def _write_pickle(path, obj):
    with open(path, "wb") as f:
        pickle.dump(obj, f, protocol=2)


def _fake_cifar10(folder, rng, per_batch=4, n_test=6):
    folder.mkdir(parents=True)
    xs, ys = [], []
    for i in range(1, 6):
        data = rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, per_batch)]
        _write_pickle(
            folder / f"data_batch_{i}",
            {b"batch_label": b"training batch", b"labels": labels, b"data": data, b"filenames": [b"x.png"] * per_batch},
        )
        xs.append(data), ys.extend(labels)
    test = rng.integers(0, 256, (n_test, 3072), dtype=np.uint8)
    test_labels = [int(v) for v in rng.integers(0, 10, n_test)]
    _write_pickle(folder / "test_batch", {b"labels": test_labels, b"data": test})
    meta = {b"label_names": [f"c{i}".encode() for i in range(10)], b"num_cases_per_batch": per_batch}
    _write_pickle(folder / "batches.meta", meta)
    return np.concatenate(xs), np.array(ys), test, np.array(test_labels)


def test_cifar10_reader_on_generated_pickles(tmp_path):
    xtr, ytr, xte, yte = _fake_cifar10(tmp_path / "cifar-10-batches-py", np.random.default_rng(0))
    for data_dir in (tmp_path, tmp_path / "cifar-10-batches-py"):  # parent folder, or the folder itself
        ds = load_dataset("cifar10", data_dir=data_dir)
        assert ds.input_shape == (3, 32, 32) and ds.num_classes == 10 and ds.kind == "image"
        raw = xtr.reshape(-1, 3, 32, 32).astype(np.float64)
        mean, std = raw.mean(axis=(0, 2, 3), keepdims=True), raw.std(axis=(0, 2, 3), keepdims=True)
        np.testing.assert_allclose(ds.x_train.numpy(), (raw - mean) / std, atol=1e-5)
        np.testing.assert_allclose(ds.x_test.numpy(), (xte.reshape(-1, 3, 32, 32) - mean) / std, atol=1e-5)
        np.testing.assert_array_equal(ds.y_train.numpy(), ytr)
        np.testing.assert_array_equal(ds.y_test.numpy(), yte)
    plain = load_dataset("cifar10", data_dir=tmp_path, standardize=False)
    assert plain.x_train[3, 1, 0, 0] == float(xtr[3, 1024])  # channel planes, row-major: G plane starts at 1024


def test_cifar100_reader_fine_and_coarse_labels_with_str_keys(tmp_path):
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    rng = np.random.default_rng(1)
    for split, n in (("train", 8), ("test", 5)):
        _write_pickle(
            folder / split,
            {
                "data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
                "fine_labels": list(range(n)),
                "coarse_labels": [i % 20 for i in range(n)],
            },
        )
    _write_pickle(
        folder / "meta",
        {"fine_label_names": [f"f{i}" for i in range(100)], "coarse_label_names": [f"c{i}" for i in range(20)]},
    )
    fine = load_dataset("cifar100", data_dir=tmp_path)
    coarse = load_dataset("cifar100", data_dir=tmp_path, label_mode="coarse")
    assert (fine.num_classes, coarse.num_classes) == (100, 20)
    assert fine.y_train.tolist() == list(range(8)) and fine.x_train.shape == (8, 3, 32, 32)
    with pytest.raises(ValueError, match="label_mode must be"):
        load_dataset("cifar100", data_dir=tmp_path, label_mode="medium")


def test_missing_cifar_says_what_is_expected_and_how_to_get_it(tmp_path, monkeypatch):
    import urllib.request

    monkeypatch.setattr(urllib.request, "urlopen", lambda *a, **k: pytest.fail("tried the network"))
    expected = r"cifar-10-batches-py.*data_batch_1, data_batch_2.*test_batch, batches\.meta.*download_cifar"
    with pytest.raises(FileNotFoundError, match=expected):
        load_dataset("cifar10", data_dir=tmp_path)
    with pytest.raises(FileNotFoundError, match="no data_dir was given"):
        load_dataset("cifar100")
    _fake_cifar10(tmp_path / "cifar-10-batches-py", np.random.default_rng(0))
    os.remove(tmp_path / "cifar-10-batches-py" / "data_batch_3")
    with pytest.raises(FileNotFoundError, match=r"missing in .*cifar-10-batches-py: data_batch_3\."):
        load_dataset("cifar10", data_dir=tmp_path)


@pytest.mark.parametrize(
    "damage, match",
    [
        (lambda p: p.write_bytes(b"\x80\x02not a pickle at all"), "corrupt or not a CIFAR python-pickle batch"),
        (lambda p: p.write_bytes(p.read_bytes()[:100]), "corrupt or not a CIFAR python-pickle batch"),
        (
            lambda p: _write_pickle(p, {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}),
            r"must be a \(n, 3072\) uint8",
        ),
        (lambda p: _write_pickle(p, {b"data": np.zeros((2, 3072), np.uint8)}), "has no 'labels' entry"),
        (
            lambda p: _write_pickle(p, {b"data": np.zeros((2, 3072), np.uint8), b"labels": [0, 10]}),
            "labels .* run from 0 to 10",
        ),
    ],
)
def test_corrupt_cifar_file_is_named(tmp_path, damage, match):
    _fake_cifar10(tmp_path / "cifar-10-batches-py", np.random.default_rng(0))
    bad = tmp_path / "cifar-10-batches-py" / "data_batch_2"
    damage(bad)
    with pytest.raises(ValueError, match=match) as info:
        load_dataset("cifar10", data_dir=tmp_path)
    assert "download_cifar" in str(info.value)


def test_download_cifar_verifies_the_md5_before_extracting(tmp_path):
    src = tmp_path / "src"
    _fake_cifar10(src / "cifar-10-batches-py", np.random.default_rng(2))
    tarball = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tarball, "w:gz") as tar:
        tar.add(src / "cifar-10-batches-py", arcname="cifar-10-batches-py")
    url = tarball.as_uri()
    dest = tmp_path / "data"
    with pytest.raises(ValueError, match="checksum mismatch.*expected c58f30108f718f92721af3b95e74349a"):
        download_cifar("cifar10", dest, url=url)  # the published checksum of the real tarball
    assert not (dest / "cifar-10-batches-py").exists() and not list(dest.iterdir())  # nothing extracted, no leftovers
    md5 = hashlib.md5(tarball.read_bytes()).hexdigest()
    folder = download_cifar("cifar10", dest, url=url, md5=md5)
    assert folder == dest / "cifar-10-batches-py"
    assert load_dataset("cifar10", data_dir=dest).x_train.shape == (20, 3, 32, 32)
    assert download_cifar("cifar10", dest, url="file:///nonexistent") == folder  # complete folder: no download


def test_dataset_repr_is_short():
    ds = load_dataset("synthetic-sequences", **SMALL["synthetic-sequences"])
    assert repr(ds) == (
        "Dataset('synthetic-sequences', kind='sequence', input_shape=(12, 6), num_classes=4, "
        "n_train=120, n_test=60, masked)"
    )
