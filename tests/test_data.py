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
from ns_core.data import DatasetNotFound, dataset_labels, dataset_names, load_dataset, make_loader


def test_mnist5k_split_is_fixed_stratified_and_in_range() -> None:
    splits = load_dataset("mnist5k")
    assert (len(splits.train), len(splits.test)) == (4000, 1000)
    assert splits.input_shape == (1, 28, 28) and splits.num_classes == 10
    x, y = splits.train.tensors
    assert x.dtype == torch.float32 and y.dtype == torch.int64 and x.shape[1:] == (1, 28, 28)
    assert float(x.min()) >= 0.0 and float(x.max()) <= 1.0 and float(x.max()) > 0.99  # scaled, not 0..255
    counts = np.bincount(y.numpy(), minlength=10)
    assert np.all(np.abs(counts - 400) <= 5), counts
    assert set(np.unique(splits.test.tensors[1].numpy())) == set(range(10))
    again = load_dataset("mnist5k")
    assert torch.equal(again.train.tensors[0], x) and torch.equal(again.test.tensors[1], splits.test.tensors[1])


def test_mnist5k_cache_cannot_be_altered_by_a_caller() -> None:
    splits = load_dataset("mnist5k")
    splits.train.tensors[0].zero_()
    assert float(load_dataset("mnist5k").train.tensors[0].max()) > 0.99


def test_digits_and_fake_shapes() -> None:
    digits = load_dataset("digits")
    assert digits.input_shape == (1, 8, 8) and len(digits.train) + len(digits.test) == 1797
    x, y = digits.train[0]
    assert x.shape == (1, 8, 8) and x.dtype == torch.float32 and float(digits.train.tensors[0].max()) == 1.0
    fake = load_dataset("fake")
    assert (len(fake.train), len(fake.test), fake.input_shape) == (512, 256, (3, 32, 32))
    assert torch.equal(fake.train.tensors[0], load_dataset("fake").train.tensors[0])


def test_limits_are_stratified_seeded_subsets() -> None:
    a = load_dataset("mnist5k", train_limit=200, test_limit=50, seed=1)
    assert (len(a.train), len(a.test)) == (200, 50)
    assert np.array_equal(np.bincount(dataset_labels(a.train)), np.full(10, 20))
    b = load_dataset("mnist5k", train_limit=200, seed=1)
    c = load_dataset("mnist5k", train_limit=200, seed=2)
    assert a.train.indices == b.train.indices and a.train.indices != c.train.indices
    assert len(load_dataset("mnist5k", train_limit=3).train) == 3  # fewer than the classes: random subset


def test_make_loader_order_depends_only_on_seed() -> None:
    dataset = load_dataset("digits").train

    def order(seed: int) -> torch.Tensor:
        return torch.cat([y for _, y in make_loader(dataset, batch_size=64, shuffle=True, seed=seed)])

    assert torch.equal(order(3), order(3))
    assert not torch.equal(order(3), order(4))
    unshuffled = torch.cat([y for _, y in make_loader(dataset, batch_size=64, shuffle=False)])
    assert torch.equal(unshuffled, dataset.tensors[1])


def test_unknown_dataset_lists_the_names() -> None:
    with pytest.raises(ValueError, match="mnist5k") as info:
        load_dataset("mnist4k")
    assert all(name in str(info.value) for name in dataset_names())


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
    images = ((np.arange(n * 784).reshape(n, 28, 28) * 7 + offset) % 256).astype(np.uint8)
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
    assert (len(splits.train), len(splits.test), splits.input_shape) == (30, 20, (1, 28, 28))
    x, y = splits.train[13]
    assert isinstance(y, int) and y == 3 and x.dtype == torch.float32
    torch.testing.assert_close(x, torch.from_numpy(arrays["train"][13]).float().div(255).unsqueeze(0))
    torch.testing.assert_close(splits.test[5][0][0], torch.from_numpy(arrays["t10k"][5]).float().div(255))
    xb, yb = next(iter(make_loader(splits.train, batch_size=8, shuffle=False)))
    assert xb.shape == (8, 1, 28, 28) and yb.dtype == torch.int64 and yb.tolist() == list(range(8))


def test_mnist_reads_raw_idx_files(tmp_path: Path) -> None:
    arrays = write_mnist_files(tmp_path / "MNIST" / "raw")
    check_idx_splits(load_dataset("mnist", root=tmp_path), arrays)


def test_mnist_gunzips_gz_files_left_in_raw(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    arrays = write_mnist_files(raw, compress=True)
    check_idx_splits(load_dataset("mnist", root=str(tmp_path)), arrays)
    assert (raw / "train-images-idx3-ubyte").is_file()


def test_fashion_mnist_takes_the_debian_package_files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    system = tmp_path / "usr-share-datasets-fashion-mnist"
    arrays = write_mnist_files(system, compress=True)
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", system)
    root = tmp_path / "data"
    splits = load_dataset("fashion_mnist", root=root, train_limit=10, seed=0)
    assert sorted(p.name for p in (root / "FashionMNIST" / "raw").iterdir()) == sorted(data.IDX_FILES)
    assert len(splits.train) == 10 and sorted(dataset_labels(splits.train).tolist()) == list(range(10))
    check_idx_splits(load_dataset("fashion_mnist", root=root), arrays)


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

    splits = load_dataset("cifar10", root=tmp_path)
    assert (len(splits.train), len(splits.test), splits.input_shape) == (20, 4, (3, 32, 32))
    x, y = splits.train[6]  # data_batch_2, row 2
    expected = torch.from_numpy(batches["data_batch_2"]["data"][2].reshape(3, 32, 32)).float().div(255)
    torch.testing.assert_close(x, expected)
    assert y == batches["data_batch_2"]["labels"][2]
    assert splits.test[3][1] == batches["test_batch"]["labels"][3]


def test_svhn_reads_mat_files(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    images = {}
    for split, n in (("train", 12), ("test", 5)):
        x = rng.integers(0, 256, size=(32, 32, 3, n), dtype=np.uint8)  # (H, W, C, N) as in the release
        y = ((np.arange(n) % 10) + 1).astype(np.uint8).reshape(n, 1)  # digit 0 is stored as label 10
        scipy.io.savemat(tmp_path / f"{split}_32x32.mat", {"X": x, "y": y})
        images[split] = x
    splits = load_dataset("svhn", root=tmp_path)
    assert (len(splits.train), len(splits.test), splits.input_shape) == (12, 5, (3, 32, 32))
    x, y = splits.train[9]
    assert y == 0  # label 10 -> digit 0
    torch.testing.assert_close(x, torch.from_numpy(images["train"][..., 9]).permute(2, 0, 1).float().div(255))
    assert splits.train[4][1] == 5


@pytest.mark.parametrize("name", ["mnist", "fashion_mnist", "cifar10", "svhn"])
def test_missing_files_raise_one_line_dataset_not_found(name: str, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(data, "DEBIAN_FASHION_MNIST", tmp_path / "absent")
    with pytest.raises(DatasetNotFound) as info:
        load_dataset(name, root=tmp_path / "empty")
    message = str(info.value)
    assert "\n" not in message and str(tmp_path / "empty") in message and "download=True" in message
    assert isinstance(info.value, ValueError)
