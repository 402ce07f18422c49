"""Image classification data sets, and each split as the input pipeline reads it.

Nothing here downloads. ``digits`` ships with scikit-learn; CIFAR-10/100 are read from the
standard python pickle batches and MNIST / Fashion-MNIST from the standard IDX files, all of
which must already be on disk; these are held in memory as normalised NHWC arrays
(`Dataset`). An ``image_folder`` (ImageNet's layout) is read file by file as training goes
(`FolderDataset`). Both give their splits as `Split`s (`experiments.pipeline` reads them).
"""

from __future__ import annotations

import dataclasses
import functools
import gzip
import math
import os
import pickle
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from experiments import imagefolder
from experiments.settings import AUGMENTATIONS, DATASET_NAMES, Augmentation

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FASHION_MNIST_DEBIAN_PACKAGE = "dataset-fashion-mnist"

IDX_IMAGES_MAGIC = 0x00000803
IDX_LABELS_MAGIC = 0x00000801
IDX_FILE_STEMS = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}

CIFAR_IMAGE_SHAPE = (32, 32, 3)

DATA_SHAPES: dict[str, tuple[tuple[int, int, int], int]] = {
    "digits": ((8, 8, 1), 10),
    "mnist": ((28, 28, 1), 10),
    "fashion_mnist": ((28, 28, 1), 10),
    "cifar10": ((32, 32, 3), 10),
    "cifar100": ((32, 32, 3), 100),
}
"""`{data set: (image shape (h, w, c), classes)}`, known without loading it."""

DATASET_SIZES: dict[str, tuple[int, int]] = {
    "digits": (1437, 360),
    "mnist": (60_000, 10_000),
    "fashion_mnist": (60_000, 10_000),
    "cifar10": (50_000, 10_000),
    "cifar100": (50_000, 10_000),
}
"""`{data set: (train images, test images)}` of the standard splits."""

PathLike = str | os.PathLike


class Records(Protocol):
    def __len__(self) -> int: ...
    def __getitem__(self, index: int) -> Any: ...


@dataclass(frozen=True)
class Split:
    """A split as the input pipeline reads it.

    Attributes:
      records: random access to the split's records (arrays' rows, files).
      transform: `record -> (image, label)`, or `(record, rng) -> (image, label)`
        when `random`; None when the records are `(image, label)` already.
      random: the transform draws from an `np.random.Generator`.
    """

    records: Records
    transform: Callable | None = None
    random: bool = False

    def __len__(self) -> int:
        return len(self.records)


@dataclass(frozen=True, eq=False)
class ArrayRecords:
    """Rows of in-memory arrays as records: `[i] -> (images[i], labels[i])`."""

    images: np.ndarray
    labels: np.ndarray

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        return self.images[index], self.labels[index]


@dataclass(frozen=True, eq=False)
class Dataset:
    """Train and test splits held in memory: images float32 ``[n, h, w, c]``, labels
    int32 ``[n]``. Augmentation is done on the device, in the train step."""

    name: str
    train_images: np.ndarray
    train_labels: np.ndarray
    test_images: np.ndarray
    test_labels: np.ndarray
    num_classes: int

    def __post_init__(self) -> None:
        _check_split(self.name, "train", self.train_images, self.train_labels)
        _check_split(self.name, "test", self.test_images, self.test_labels)
        if self.train_images.shape[1:] != self.test_images.shape[1:]:
            raise ValueError(
                f"{self.name}: train images {self.train_images.shape[1:]} and test images "
                f"{self.test_images.shape[1:]} differ in shape"
            )

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(h, w, c)`` of every image."""
        height, width, channels = self.train_images.shape[1:]
        return height, width, channels

    @property
    def train_size(self) -> int:
        return len(self.train_labels)

    @property
    def test_size(self) -> int:
        return len(self.test_labels)

    in_memory = True

    def split(self, name: str, augment: bool = False) -> Split:
        """The ``"train"`` or ``"test"`` split's rows (``augment`` does nothing here: the
        train step augments on the device)."""
        del augment
        if name == "train":
            return Split(ArrayRecords(self.train_images, self.train_labels))
        return Split(ArrayRecords(self.test_images, self.test_labels))

    def device_augmentation(self, augmentation: Augmentation) -> Augmentation:
        """What of ``augmentation`` the train step does on the device: all of it."""
        return augmentation


@dataclass(frozen=True, eq=False)
class FolderDataset:
    """An image folder in ImageNet's layout, read file by file as training goes.

    Images are decoded, cropped to ``image_size`` (training: ``augmentation``'s
    random resized crop and flip; evaluation: resize and centre crop) and
    standardised with ImageNet's statistics in the input pipeline's workers.
    """

    name: str
    train: imagefolder.FolderSplit
    test: imagefolder.FolderSplit
    image_size: int
    augmentation: Augmentation = AUGMENTATIONS["imagenet"]

    in_memory = False

    @property
    def num_classes(self) -> int:
        return len(self.train.classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return self.image_size, self.image_size, 3

    @property
    def train_size(self) -> int:
        return len(self.train)

    @property
    def test_size(self) -> int:
        return len(self.test)

    @property
    def test_labels(self) -> np.ndarray:
        return self.test.labels

    @property
    def skipped(self) -> tuple[Path, ...]:
        """Files of both splits left out as not images (``bad_images="skip"``)."""
        return self.train.skipped + self.test.skipped

    def split(self, name: str, augment: bool = False) -> Split:
        """The ``"train"`` split (``augment``: with the training augmentation) or ``"test"``."""
        if name == "train" and augment:
            transform = functools.partial(
                imagefolder.train_example,
                size=self.image_size,
                resized_crop=self.augmentation.resized_crop,
                flip=self.augmentation.flip,
            )
            return Split(self.train, transform, random=True)
        evaluate = functools.partial(imagefolder.eval_example, size=self.image_size)
        return Split(self.train if name == "train" else self.test, evaluate)

    def device_augmentation(self, augmentation: Augmentation) -> Augmentation:
        """Nothing: the workers crop and flip as they decode."""
        del augmentation
        return Augmentation()


def load_image_folder(
    directory: PathLike,
    *,
    image_size: int = 224,
    augmentation: Augmentation = AUGMENTATIONS["imagenet"],
    bad_images: str = "refuse",
) -> FolderDataset:
    """The ``train/`` and ``val/`` splits of ``directory`` (the test split is ``val/``)."""
    train, val = scan_folder(str(directory), bad_images)
    return FolderDataset("image_folder", train, val, image_size, augmentation)


@functools.lru_cache(maxsize=4)
def scan_folder(directory: str, bad_images: str) -> tuple:
    """`imagefolder.scan_image_folder`, once per process for the same folder (checks and
    loading both need it; a large folder takes a while to list)."""
    return imagefolder.scan_image_folder(directory, bad_images=bad_images)


def _check_split(name: str, split: str, images: np.ndarray, labels: np.ndarray) -> None:
    if images.ndim != 4 or labels.ndim != 1:
        raise ValueError(
            f"{name}: {split} images must be [n, h, w, c] and labels [n], got "
            f"{list(images.shape)} and {list(labels.shape)}"
        )
    if len(images) != len(labels):
        raise ValueError(f"{name}: {len(labels)} {split} labels for {len(images)} {split} images")


def channel_statistics(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std (``[c]`` float32 each) of ``[n, h, w, c]`` images.

    A constant channel gets std 1 so that normalising it stays finite.
    """
    means, stds = [], []
    for channel in np.moveaxis(images, -1, 0):
        mean = channel.mean(dtype=np.float64)
        std = math.sqrt(np.square(channel - np.float32(mean)).mean(dtype=np.float64))
        means.append(mean)
        stds.append(std if std > 0 else 1.0)
    return np.asarray(means, np.float32), np.asarray(stds, np.float32)


def standardise(train_images: np.ndarray, test_images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Normalise both ``[n, h, w, c]`` splits with the train split's per-channel statistics."""
    train = train_images.astype(np.float32, order="C")
    test = test_images.astype(np.float32, order="C")
    mean, std = channel_statistics(train)
    for split in (train, test):
        split -= mean
        split /= std
    return train, test


def _build_dataset(
    name: str,
    train: tuple[np.ndarray, np.ndarray],
    test: tuple[np.ndarray, np.ndarray],
    num_classes: int,
) -> Dataset:
    train_images, test_images = standardise(train[0], test[0])
    return Dataset(
        name=name,
        train_images=train_images,
        train_labels=train[1].astype(np.int32),
        test_images=test_images,
        test_labels=test[1].astype(np.int32),
        num_classes=num_classes,
    )


def _checked_labels(
    labels: np.ndarray, image_count: int, num_classes: int, source: str
) -> np.ndarray:
    """Labels as int32 ``[n]`` after checking count, dtype and range against ``source``."""
    if labels.ndim != 1 or not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(
            f"{source}: labels must be a 1-d integer sequence, got {labels.dtype} "
            f"{list(labels.shape)}"
        )
    if len(labels) != image_count:
        raise ValueError(f"{source}: {len(labels)} labels for {image_count} images")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(
            f"{source}: labels span [{labels.min()}, {labels.max()}], "
            f"outside [0, {num_classes - 1}]"
        )
    return labels.astype(np.int32)


def load_digits(test_fraction: float = 0.2, seed: int = 0) -> Dataset:
    """scikit-learn's 1797 8x8 grey digits as ``[n, 8, 8, 1]``, split stratified by ``seed``."""
    # imported here: scikit-learn takes a second or two to import, and only the digits need it
    from sklearn.datasets import load_digits as sklearn_load_digits
    from sklearn.model_selection import train_test_split

    bunch = sklearn_load_digits()
    images = bunch.images[..., np.newaxis]
    train_images, test_images, train_labels, test_labels = train_test_split(
        images,
        bunch.target,
        test_size=test_fraction,
        random_state=seed,
        stratify=bunch.target,
    )
    return _build_dataset(
        "digits", (train_images, train_labels), (test_images, test_labels), num_classes=10
    )


@dataclass(frozen=True)
class _CifarLayout:
    folder: str
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    label_key: bytes


_CIFAR_LAYOUTS = {
    10: _CifarLayout(
        folder="cifar-10-batches-py",
        train_files=tuple(f"data_batch_{index}" for index in range(1, 6)),
        test_files=("test_batch",),
        label_key=b"labels",
    ),
    100: _CifarLayout(
        folder="cifar-100-python",
        train_files=("train",),
        test_files=("test",),
        label_key=b"fine_labels",
    ),
}

_UNPICKLING_ERRORS = (
    pickle.UnpicklingError,
    EOFError,
    AttributeError,
    ImportError,
    IndexError,
    TypeError,
    ValueError,
)


def load_cifar(directory: PathLike, num_classes: int = 10) -> Dataset:
    """CIFAR-10 or CIFAR-100 (fine labels) from the python pickle batches.

    ``directory`` holds the batch files or is the parent of ``cifar-10-batches-py`` /
    ``cifar-100-python``. Images become ``[n, 32, 32, 3]``. The files are unpickled, so
    only read ones from a trusted source.
    """
    if num_classes not in _CIFAR_LAYOUTS:
        raise ValueError(f"num_classes must be 10 or 100 for CIFAR, got {num_classes}")
    layout = _CIFAR_LAYOUTS[num_classes]
    root = _find_cifar_root(Path(directory), layout, num_classes)
    train = _read_cifar_batches([root / file for file in layout.train_files], layout, num_classes)
    test = _read_cifar_batches([root / file for file in layout.test_files], layout, num_classes)
    return _build_dataset(f"cifar{num_classes}", train, test, num_classes)


def _find_cifar_root(directory: Path, layout: _CifarLayout, num_classes: int) -> Path:
    """The one of ``directory`` and ``directory / layout.folder`` holding every batch file."""
    expected = layout.train_files + layout.test_files
    candidates = (directory, directory / layout.folder)
    missing = {candidate: _missing_files(candidate, expected) for candidate in candidates}
    for candidate in candidates:
        if not missing[candidate]:
            return candidate
    closest = min(candidates, key=lambda candidate: len(missing[candidate]))
    problem = (
        f"directory {directory} does not exist"
        if not directory.is_dir()
        else f"missing {', '.join(missing[closest])} in {closest}"
    )
    raise FileNotFoundError(
        f"CIFAR-{num_classes}: {problem}; expected files {', '.join(expected)} "
        f"in {directory} or {candidates[1]}"
    )


def _missing_files(directory: Path, names: Sequence[str]) -> list[str]:
    return [name for name in names if not (directory / name).is_file()]


def _read_cifar_batches(
    paths: Sequence[Path], layout: _CifarLayout, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Concatenated images uint8 ``[n, 32, 32, 3]`` and labels int32 ``[n]`` of ``paths``."""
    batches = [_read_cifar_batch(path, layout.label_key, num_classes) for path in paths]
    images = np.concatenate([images for images, _ in batches])
    labels = np.concatenate([labels for _, labels in batches])
    return images, labels


def _read_cifar_batch(
    path: Path, label_key: bytes, num_classes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Images uint8 ``[n, 32, 32, 3]`` and labels int32 ``[n]`` of one pickle batch."""
    batch = _unpickle(path)
    if not isinstance(batch, dict) or b"data" not in batch or label_key not in batch:
        found = list(batch) if isinstance(batch, dict) else type(batch).__name__
        raise ValueError(
            f"{path}: expected a dict with keys b'data' and {label_key!r}, found {found}"
        )
    data = np.asarray(batch[b"data"])
    row_size = math.prod(CIFAR_IMAGE_SHAPE)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != row_size:
        raise ValueError(
            f"{path}: b'data' must be uint8 [n, {row_size}], got {data.dtype} {list(data.shape)}"
        )
    labels = _checked_labels(np.asarray(batch[label_key]), len(data), num_classes, str(path))
    return cifar_rows_to_nhwc(data), labels


def cifar_rows_to_nhwc(rows: np.ndarray) -> np.ndarray:
    """CIFAR rows ``[n, 3072]`` (channel-major, then row, then column) to ``[n, 32, 32, 3]``."""
    height, width, channels = CIFAR_IMAGE_SHAPE
    return rows.reshape(-1, channels, height, width).transpose(0, 2, 3, 1)


def _unpickle(path: Path) -> object:
    with path.open("rb") as file:
        try:
            return pickle.load(file, encoding="bytes")
        except _UNPICKLING_ERRORS as error:
            raise ValueError(f"{path}: not a readable pickle ({error})") from error


def load_idx(directory: PathLike, name: str, num_classes: int = 10) -> Dataset:
    """MNIST-style dataset from the four IDX files (gzip or plain) in ``directory``.

    Images become ``[n, 28, 28, 1]`` (or whatever ``[h, w]`` the headers give).
    """
    paths = _find_idx_files(Path(directory), name)
    splits = []
    for split in ("train", "test"):
        images_path, labels_path = paths[f"{split}_images"], paths[f"{split}_labels"]
        images = read_idx(images_path, IDX_IMAGES_MAGIC)
        check_image_dims(images.shape, str(images_path))
        labels = read_idx(labels_path, IDX_LABELS_MAGIC)
        source = f"{labels_path} (with {images_path.name})"
        splits.append(
            (images[..., np.newaxis], _checked_labels(labels, len(images), num_classes, source))
        )
    train, test = splits
    return _build_dataset(name, train, test, num_classes)


def _find_idx_files(directory: Path, name: str) -> dict[str, Path]:
    """Path of each IDX file, preferring ``<stem>.gz`` over ``<stem>``."""
    found, missing = {}, []
    for role, stem in IDX_FILE_STEMS.items():
        candidates = [directory / f"{stem}.gz", directory / stem]
        existing = [path for path in candidates if path.is_file()]
        if existing:
            found[role] = existing[0]
        else:
            missing.append(f"{stem}.gz")
    if not missing:
        return found
    problem = (
        f"directory {directory} does not exist"
        if not directory.is_dir()
        else f"missing {', '.join(missing)} in {directory}"
    )
    expected = ", ".join(f"{stem}.gz" for stem in IDX_FILE_STEMS.values())
    raise FileNotFoundError(
        f"{name}: {problem}; expected files {expected} in {directory} "
        f"(the same names without .gz are accepted too).{_install_hint(name)}"
    )


def _install_hint(name: str) -> str:
    if name != "fashion_mnist":
        return ""
    return (
        f" On Debian or Ubuntu, the package {FASHION_MNIST_DEBIAN_PACKAGE} installs them in "
        f"{FASHION_MNIST_DIR} (apt install {FASHION_MNIST_DEBIAN_PACKAGE})."
    )


def check_image_dims(dims: Sequence[int], source: str) -> None:
    """Raises unless IDX image dims `[n, h, w]` hold images of at least one pixel."""
    if len(dims) != 3 or min(dims[1:], default=0) < 1:
        raise ValueError(
            f"{source}: holds images of shape {list(dims[1:])} ({list(dims)} in all); "
            "MNIST-style images are [n, height, width] with height and width at least 1"
        )


def read_idx_header(path: PathLike) -> tuple[int, tuple[int, ...]]:
    """`(magic, dims)` of an IDX file, gzip-compressed or not, reading only its header."""
    path = Path(path)
    with path.open("rb") as raw:
        compressed = raw.read(2) == b"\x1f\x8b"
    try:
        with gzip.open(path, "rb") if compressed else path.open("rb") as file:
            head = file.read(4)
            num_dims = int.from_bytes(head, "big") & 0xFF if len(head) == 4 else 0
            dims_bytes = file.read(4 * num_dims)
    except (gzip.BadGzipFile, EOFError, zlib.error) as error:
        raise ValueError(f"{path}: corrupt or truncated gzip data ({error})") from error
    if len(head) < 4 or len(dims_bytes) < 4 * num_dims:
        raise ValueError(f"{path}: truncated, shorter than its IDX header")
    dims = tuple(int(size) for size in np.frombuffer(dims_bytes, ">u4"))
    return int.from_bytes(head, "big"), dims


def check_idx_headers(paths: dict[str, Path]) -> None:
    """The image files' headers promise images of at least one pixel (nothing else is read)."""
    for role in ("train_images", "test_images"):
        magic, dims = read_idx_header(paths[role])
        if magic != IDX_IMAGES_MAGIC:
            raise ValueError(
                f"{paths[role]}: bad magic number 0x{magic:08x}, expected 0x{IDX_IMAGES_MAGIC:08x}"
            )
        check_image_dims(dims, str(paths[role]))


def read_idx(path: PathLike, expected_magic: int) -> np.ndarray:
    """The uint8 array stored in an IDX file, gzip-compressed or not, shaped by its header."""
    path = Path(path)
    content = path.read_bytes()
    if content[:2] == b"\x1f\x8b":
        try:
            content = gzip.decompress(content)
        except (gzip.BadGzipFile, EOFError, zlib.error) as error:
            raise ValueError(f"{path}: corrupt or truncated gzip data ({error})") from error
    return parse_idx(content, expected_magic, str(path))


def parse_idx(content: bytes, expected_magic: int, source: str = "IDX data") -> np.ndarray:
    """The uint8 array in raw IDX bytes: big-endian magic, then one big-endian uint32 per dim."""
    if len(content) < 4:
        raise ValueError(f"{source}: truncated, {len(content)} bytes is shorter than the header")
    magic = int.from_bytes(content[:4], "big")
    if magic != expected_magic:
        raise ValueError(
            f"{source}: bad magic number 0x{magic:08x}, expected 0x{expected_magic:08x}"
        )
    num_dims = magic & 0xFF
    header_size = 4 + 4 * num_dims
    if len(content) < header_size:
        raise ValueError(
            f"{source}: truncated header, {num_dims} dimensions need {header_size} bytes"
        )
    dims = tuple(int(size) for size in np.frombuffer(content, ">u4", num_dims, offset=4))
    payload_size = len(content) - header_size
    if payload_size != math.prod(dims):
        problem = "truncated" if payload_size < math.prod(dims) else "has trailing bytes"
        raise ValueError(
            f"{source}: {problem}, header shape {list(dims)} needs {math.prod(dims)} bytes "
            f"of data but {payload_size} follow"
        )
    return np.frombuffer(content, np.uint8, offset=header_size).reshape(dims)


def load_dataset(name: str, data_dir: PathLike | None = None, **kwargs) -> Dataset:
    """Load ``name`` (one of ``DATASET_NAMES``); ``kwargs`` go to the specific loader.

    ``digits`` takes no ``data_dir``; ``fashion_mnist`` defaults to ``FASHION_MNIST_DIR``;
    ``mnist``, ``cifar10`` and ``cifar100`` need ``data_dir``.
    """
    key, directory = _source(name, data_dir)
    if key == "digits":
        return load_digits(**kwargs)
    if key == "image_folder":
        return load_image_folder(directory, **kwargs)
    if key in ("mnist", "fashion_mnist"):
        return load_idx(directory, key, **kwargs)
    return load_cifar(directory, num_classes=10 if key == "cifar10" else 100, **kwargs)


def check_files(name: str, data_dir: PathLike | None = None, bad_images: str = "refuse") -> None:
    """Raises what ``load_dataset`` would for absent files (and IDX images of no pixels),
    reading no more than the IDX headers (an image folder: its listing and each file's
    first bytes)."""
    key, directory = _source(name, data_dir)
    if key in ("mnist", "fashion_mnist"):
        check_idx_headers(_find_idx_files(Path(directory), key))
    elif key == "image_folder":
        scan_folder(str(directory), bad_images)
    elif key != "digits":
        classes = 10 if key == "cifar10" else 100
        _find_cifar_root(Path(directory), _CIFAR_LAYOUTS[classes], classes)


def _source(name: str, data_dir: PathLike | None) -> tuple[str, PathLike | None]:
    """``(dataset key, directory to read)`` of ``name``, its default location applied."""
    key = name.lower().replace("-", "_")
    if key not in DATASET_NAMES:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {', '.join(DATASET_NAMES)}")
    if key == "digits":
        if data_dir is not None:
            raise ValueError("digits ships with scikit-learn and takes no data_dir")
        return key, None
    if key == "fashion_mnist" and data_dir is None:
        return key, FASHION_MNIST_DIR
    if data_dir is None:
        raise ValueError(f"{key} has no default location; pass data_dir")
    return key, data_dir


def held_images(
    name: str, data_dir: PathLike | None = None, bad_images: str = "refuse"
) -> tuple[int, int, int]:
    """``(train images, test images, classes)`` of a data set, without loading it."""
    key, directory = _source(name, data_dir)
    if key == "image_folder":
        train, val = scan_folder(str(directory), bad_images)
        return len(train), len(val), len(train.classes)
    return (*DATASET_SIZES[key], DATA_SHAPES[key][1])


def subset(ds, train_size: int | None = None, test_size: int | None = None):
    """The first ``train_size`` / ``test_size`` examples of each split (None keeps all).

    The normalisation of ``ds`` is kept as it is, not recomputed.
    """
    if isinstance(ds, FolderDataset):
        for argument, size, split in (
            ("train_size", train_size, ds.train),
            ("test_size", test_size, ds.test),
        ):
            if size is not None and not 0 <= size <= len(split):
                raise ValueError(f"{argument} must be in [0, {len(split)}], got {size}")
        return dataclasses.replace(
            ds,
            train=ds.train if train_size is None else ds.train.first(train_size),
            test=ds.test if test_size is None else ds.test.first(test_size),
        )
    train = _first(ds.train_images, ds.train_labels, train_size, "train_size")
    test = _first(ds.test_images, ds.test_labels, test_size, "test_size")
    return dataclasses.replace(
        ds,
        train_images=train[0],
        train_labels=train[1],
        test_images=test[0],
        test_labels=test[1],
    )


def _first(
    images: np.ndarray, labels: np.ndarray, size: int | None, argument: str
) -> tuple[np.ndarray, np.ndarray]:
    if size is None:
        return images, labels
    if not 0 <= size <= len(images):
        raise ValueError(f"{argument} must be in [0, {len(images)}], got {size}")
    return images[:size], labels[:size]


def steps_per_epoch(n: int, batch_size: int, drop_remainder: bool) -> int:
    """Number of batches of ``batch_size`` in ``n`` examples, the last partial one counted
    unless ``drop_remainder``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if n < 0:
        raise ValueError(f"n must be non-negative, got {n}")
    return n // batch_size if drop_remainder else -(-n // batch_size)
