"""Dataset registry: embedded splits, subsets, loaders, and torchvision loaders on files in the real formats."""

from __future__ import annotations

import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch

from ns_core import data
from ns_core.data import DatasetNotFound, augment_batch, dataset_names, load_dataset, stratified_split


def _rows(split) -> set[bytes]:
    """Each example's stored bytes (uint8 for file datasets, float32 for the embedded ones)."""
    return {row.numpy().tobytes() for row in split.x}


def test_mnist5k_splits_are_fixed_stratified_and_in_range() -> None:
    splits = load_dataset("mnist5k")
    assert (len(splits.train), len(splits.val), len(splits.test)) == (3500, 500, 1000)
    assert splits.input_shape == (1, 28, 28) and splits.num_classes == 10
    x, y = splits.train.take()
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape[1:] == (1, 28, 28)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0 and float(x.max()) > 0.99  # scaled, not 0..255
    assert np.all(np.abs(np.bincount(splits.val.y.numpy(), minlength=10) - 50) <= 2)  # stratified
    assert set(np.unique(splits.test.y.numpy())) == set(range(10))
    again = load_dataset("mnist5k")
    assert torch.equal(again.train.x, splits.train.x) and torch.equal(again.val.y, splits.val.y)


@pytest.mark.parametrize("name", ["mnist5k", "digits", "fake", "user_models:blobs"])
def test_train_validation_and_test_are_disjoint(name: str) -> None:
    splits = load_dataset(name)
    train, val, test = _rows(splits.train), _rows(splits.val), _rows(splits.test)
    assert len(val) == len(splits.val) and not (val & train) and not (val & test) and not (train & test)


def test_validation_is_picked_by_the_data_seed_alone() -> None:
    labels = load_dataset("mnist5k").train.y
    chosen, rest = stratified_split(labels, 300, seed=0)
    assert len(set(chosen) & set(rest)) == 0 and sorted([*chosen, *rest]) == list(range(len(labels)))
    a, b = load_dataset("mnist5k", data_seed=0), load_dataset("mnist5k", data_seed=1)
    assert not torch.equal(a.val.y, b.val.y) and len(a.val) == len(b.val) == 500
    small = load_dataset("mnist5k", val_size=200, train_limit=1000, test_limit=100)
    assert (len(small.train), len(small.val), len(small.test)) == (1000, 200, 100)
    assert _rows(small.val) == _rows(load_dataset("mnist5k", val_size=200).val)  # limits never move validation


def test_a_stratified_split_is_scikit_learns_and_read_back_without_importing_it(tmp_path, monkeypatch) -> None:
    import sys

    from sklearn.model_selection import train_test_split

    monkeypatch.setenv("NSLAB_CACHE", str(tmp_path))
    labels = load_dataset("mnist5k").train.y
    expected, _ = train_test_split(np.arange(len(labels)), train_size=300, stratify=labels.numpy(), random_state=3)
    before = set((tmp_path / "splits").glob("*.npz"))  # loading mnist5k cached its validation split
    chosen, rest = stratified_split(labels, 300, seed=3)  # computed and cached
    (cached,) = set((tmp_path / "splits").glob("*.npz")) - before
    assert chosen.tolist() == sorted(expected.tolist()) and len(chosen) + len(rest) == len(labels)
    monkeypatch.setitem(sys.modules, "sklearn.model_selection", None)  # importing it now raises ImportError
    again, rest_again = stratified_split(labels, 300, seed=3)
    assert again.tolist() == chosen.tolist() and rest_again.tolist() == rest.tolist()
    with pytest.raises(ImportError):  # another seed is not cached: it would need scikit-learn
        stratified_split(labels, 300, seed=4)
    cached.write_bytes(b"not a zip file")
    monkeypatch.delitem(sys.modules, "sklearn.model_selection")
    assert stratified_split(labels, 300, seed=3)[0].tolist() == chosen.tolist()  # a corrupt entry is recomputed


def test_mnist5k_cache_cannot_be_altered_by_a_caller() -> None:
    splits = load_dataset("mnist5k")
    splits.train.x.zero_()
    assert float(load_dataset("mnist5k").train.x.max()) > 0.99


def test_digits_and_fake_shapes() -> None:
    digits = load_dataset("digits")
    assert digits.input_shape == (1, 8, 8) and len(digits.train) + len(digits.val) + len(digits.test) == 1797
    assert digits.train.images().dtype == torch.float32 and float(digits.train.x.max()) == 1.0
    fake = load_dataset("fake")
    assert (len(fake.train), len(fake.val), len(fake.test), fake.input_shape) == (448, 64, 256, (3, 32, 32))
    assert fake.augment == "crop_flip" and load_dataset("mnist5k").augment == "none"


def test_batches_come_by_index_in_a_seeded_order() -> None:
    split = load_dataset("digits").train

    def order(seed):
        return torch.cat([y for _, y in split.batches(64, seed=seed)])

    assert torch.equal(order(3), order(3)) and not torch.equal(order(3), order(4))
    assert torch.equal(torch.cat([y for _, y in split.batches(64)]), split.y)
    assert sorted(order(3).tolist()) == sorted(split.y.tolist())


def test_uint8_splits_become_floats_in_0_1_only_when_drawn() -> None:
    split = data.Split(torch.tensor([[[[0, 255]]]], dtype=torch.uint8), torch.tensor([1]))
    x, _ = split.take()
    assert split.x.dtype == torch.uint8 and x.dtype == torch.float32 and x.flatten().tolist() == [0.0, 1.0]


def test_augmentation_crops_and_flips_within_the_padded_image() -> None:
    x = torch.arange(2 * 3 * 8 * 8, dtype=torch.float32).view(2, 3, 8, 8) / 400 + 0.01
    generator = torch.Generator().manual_seed(0)
    out = augment_batch(x, "crop_flip", generator)
    assert out.shape == x.shape and not torch.equal(out, x)
    for image, source in zip(out, x, strict=True):  # every pixel is one of the source's pixels or padding (0)
        values = set(source.flatten().tolist()) | {0.0}
        assert set(image.flatten().tolist()) <= values
    assert torch.equal(augment_batch(x, "none"), x)
    again = augment_batch(x, "crop_flip", torch.Generator().manual_seed(0))
    assert torch.equal(out, again)


def test_unknown_dataset_lists_the_names() -> None:
    with pytest.raises(ValueError, match="mnist5k") as info:
        load_dataset("mnist4k")
    assert all(name in str(info.value) for name in dataset_names())
    with pytest.raises(ValueError, match="val_size 4000 leaves no training examples"):
        load_dataset("mnist5k", val_size=4000)


# ---- torchvision datasets on small files written in the real on-disk formats ------------------------------


def write_idx(path: Path, array: np.ndarray, compress: bool = False) -> None:
    """IDX (LeCun): magic 0x00 0x00 0x08(ubyte) ndim, big-endian uint32 dims, then the bytes."""
    payload = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    payload += array.astype(np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        path = path.with_name(path.name + ".gz")
    path.write_bytes(gzip.compress(payload) if compress else payload)


def idx_arrays(n: int, offset: int) -> tuple[np.ndarray, np.ndarray]:
    images = np.random.default_rng(offset).integers(0, 256, size=(n, 28, 28), dtype=np.uint8)  # all distinct
    return images, (np.arange(n) % 10).astype(np.uint8)


def write_mnist_files(raw: Path, compress: bool = False) -> dict[str, np.ndarray]:
    arrays = {}
    for split, n in (("train", 30), ("t10k", 20)):
        images, labels = idx_arrays(n, offset=n)
        write_idx(raw / f"{split}-images-idx3-ubyte", images, compress)
        write_idx(raw / f"{split}-labels-idx1-ubyte", labels, compress)
        arrays[split] = images
    return arrays


def check_idx_splits(splits: data.DatasetSplits, arrays: dict[str, np.ndarray]) -> None:
    """30 training images: 10 held out for validation (one per class), 20 for training; 20 test images."""
    assert (len(splits.train), len(splits.val), len(splits.test), splits.input_shape) == (20, 10, 20, (1, 28, 28))
    assert splits.train.x.dtype == torch.uint8 and sorted(splits.val.y.tolist()) == list(range(10))
    x, y = splits.test.take()
    torch.testing.assert_close(x[5, 0], torch.from_numpy(arrays["t10k"][5]).float().div(255))
    assert y.tolist() == [i % 10 for i in range(20)]
    every = {row.tobytes() for row in arrays["train"]}
    assert _rows(splits.train) | _rows(splits.val) == every and not _rows(splits.train) & _rows(splits.val)


def test_mnist_reads_raw_idx_files(tmp_path: Path) -> None:
    arrays = write_mnist_files(tmp_path / "MNIST" / "raw")
    check_idx_splits(load_dataset("mnist", root=tmp_path, val_size=10), arrays)


def test_mnist_gunzips_gz_files_left_in_raw(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    arrays = write_mnist_files(raw, compress=True)
    check_idx_splits(load_dataset("mnist", root=str(tmp_path), val_size=10), arrays)
    assert (raw / "train-images-idx3-ubyte").is_file()


def test_fashion_mnist_takes_the_debian_package_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    system = tmp_path / "usr-share-datasets-fashion-mnist"
    arrays = write_mnist_files(system, compress=True)
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", system)
    root = tmp_path / "data"
    splits = load_dataset("fashion_mnist", root=root, val_size=10, train_limit=10)
    assert sorted(p.name for p in (root / "FashionMNIST" / "raw").iterdir()) == sorted(data.IDX_FILES)
    assert len(splits.train) == 10 and sorted(splits.train.y.tolist()) == list(range(10))
    check_idx_splits(load_dataset("fashion_mnist", root=root, val_size=10), arrays)


def test_cifar10_reads_python_pickle_batches(tmp_path: Path) -> None:
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        rows = rng.integers(0, 256, size=(4, 3072), dtype=np.uint8)  # each row: R plane, G plane, B plane
        labels = [int(v) for v in rng.integers(0, 10, size=4)]
        files = [f"{name}_{i}.png" for i in range(4)]
        batch = {"batch_label": name, "labels": labels, "data": rows, "filenames": files}
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
        batches[name] = batch
    meta = {"label_names": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                            "truck"], "num_cases_per_batch": 4, "num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))

    splits = load_dataset("cifar10", root=tmp_path, val_size=4)
    assert (len(splits.train), len(splits.val), len(splits.test), splits.input_shape) == (16, 4, 4, (3, 32, 32))
    assert splits.augment == "crop_flip"
    x, y = splits.test.take()
    expected = torch.from_numpy(batches["test_batch"]["data"][3].reshape(3, 32, 32)).float().div(255)
    torch.testing.assert_close(x[3], expected)  # CHW, as the release stores its rows
    assert y.tolist() == batches["test_batch"]["labels"]
    every = {r.tobytes() for n in range(1, 6) for r in batches[f"data_batch_{n}"]["data"]}  # CHW rows
    assert _rows(splits.train) | _rows(splits.val) == every


def test_svhn_reads_mat_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = {}
    for split, n in (("train", 12), ("test", 5)):
        x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)  # (H, W, C, N) as in the release
        y = ((np.arange(n) % 10) + 1).astype(np.uint8).reshape(n, 1)  # digit 0 is stored as label 10
        scipy.io.savemat(tmp_path / f"{split}_32x32.mat", {"X": x, "y": y})
        images[split] = x
    splits = load_dataset("svhn", root=tmp_path, val_size=2)
    assert (len(splits.train), len(splits.val), len(splits.test), splits.input_shape) == (10, 2, 5, (3, 32, 32))
    assert splits.augment == "crop"
    x, y = splits.test.take()
    assert y.tolist() == [1, 2, 3, 4, 5]
    labels = sorted(splits.train.y.tolist() + splits.val.y.tolist())
    assert labels == sorted([1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2])  # label 10 -> digit 0
    torch.testing.assert_close(x[4], torch.from_numpy(images["test"][..., 4]).permute(2, 0, 1).float().div(255))


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10", "svhn"])
def test_missing_files_raise_one_line_dataset_not_found(name: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "absent")
    with pytest.raises(DatasetNotFound) as info:
        load_dataset(name, root=tmp_path / "empty")
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "empty") in message and "download=True" in message
    assert isinstance(info.value, ValueError)
