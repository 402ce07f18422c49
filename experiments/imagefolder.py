"""Image-folder data sets in the ImageNet layout, read one encoded file at a time.

A data set lives under ``<root>/train/<class>/...`` and ``<root>/val/<class>/...``. Class
names are sorted, as torchvision and tfds read them, and a label is the index of its class in
that sorted list. A `FolderSplit` has ``__len__`` and ``__getitem__``, so it serves as a grain
``MapDataset.source``; the per-example transforms (`train_example`, `eval_example`) use numpy,
PIL and the standard library only, and everything here pickles, so they run in data-loader
worker processes.
"""

from __future__ import annotations

import colorsys
import dataclasses
import io
import math
import operator
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import NamedTuple

import numpy as np
from PIL import Image

PathLike = str | os.PathLike

IMAGE_SUFFIXES: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")
"""File suffixes read as images, compared lower-cased."""

IMAGENET_MEAN: tuple[float, float, float] = (0.485, 0.456, 0.406)
"""Per-channel (RGB) mean of ImageNet pixels scaled to [0, 1]."""

IMAGENET_STD: tuple[float, float, float] = (0.229, 0.224, 0.225)
"""Per-channel (RGB) standard deviation of ImageNet pixels scaled to [0, 1]."""

BAD_IMAGE_POLICIES = ("refuse", "skip")
"""What scanning does with a file in a class folder that is not an image."""

SPLITS = ("train", "val")

_HEADER_BYTES = 16
_MAX_NAMES = 3
_MAX_CLASSES = 5


class DataError(ValueError):
    """A data set that cannot be read as given; the message names the path and what to do."""


class FolderRecord(NamedTuple):
    """One example as stored: the still-encoded file, its label and where it came from."""

    data: bytes
    label: int
    path: str


@dataclasses.dataclass(frozen=True, eq=False)
class FolderSplit:
    """One split: `files[i]` has label `labels[i]` (int32 [n]); `skipped` are files left out
    as not images."""

    directory: Path
    classes: tuple[str, ...]
    files: tuple[Path, ...]
    labels: np.ndarray
    skipped: tuple[Path, ...] = ()

    def __post_init__(self) -> None:
        labels = np.asarray(self.labels, dtype=np.int32)
        if labels.ndim != 1 or len(labels) != len(self.files):
            raise ValueError(
                f"{self.directory}: {len(self.files)} files need labels of shape "
                f"[{len(self.files)}], got {list(labels.shape)}"
            )
        object.__setattr__(self, "directory", Path(self.directory))
        object.__setattr__(self, "classes", tuple(self.classes))
        object.__setattr__(self, "files", tuple(Path(file) for file in self.files))
        object.__setattr__(self, "labels", labels)
        object.__setattr__(self, "skipped", tuple(Path(file) for file in self.skipped))

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> FolderRecord:
        """The `index`-th file's bytes (still encoded), label and path."""
        index = operator.index(index)
        path = self.files[index]
        try:
            data = path.read_bytes()
        except OSError as error:
            raise DataError(
                f"{path}: cannot be read ({error}); check the file and rescan the folder"
            ) from error
        return FolderRecord(data=data, label=int(self.labels[index]), path=str(path))

    def first(self, count: int) -> FolderSplit:
        """The split's first `count` files, with the same classes."""
        if not 0 <= count <= len(self):
            raise ValueError(f"count must be in [0, {len(self)}], got {count}")
        return dataclasses.replace(self, files=self.files[:count], labels=self.labels[:count])


# Scanning.


def looks_like_image(path: PathLike) -> bool:
    """Whether the file starts like a JPEG, PNG, GIF, BMP or WebP; reads at most 16 bytes."""
    try:
        with open(path, "rb") as file:
            header = file.read(_HEADER_BYTES)
    except OSError:
        return False
    return _is_image_header(header)


def _is_image_header(header: bytes) -> bool:
    return (
        header.startswith(b"\xff\xd8\xff")
        or header.startswith(b"\x89PNG\r\n\x1a\n")
        or header.startswith((b"GIF87a", b"GIF89a"))
        or header.startswith(b"BM")
        or (header.startswith(b"RIFF") and header[8:12] == b"WEBP")
    )


def _has_image_suffix(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def _is_image(path: Path) -> bool:
    return _has_image_suffix(path) and looks_like_image(path)


def _visible(entries: Iterable[Path]) -> list[Path]:
    return sorted(entry for entry in entries if not entry.name.startswith("."))


def _count(count: int, noun: str) -> str:
    """`count` and `noun`, with an "s" unless the count is one."""
    return f"{count:,} {noun}" if count == 1 else f"{count:,} {noun}s"


def _some(names: Sequence[str], limit: int) -> str:
    """`names` joined by commas, at most `limit` of them, then how many more."""
    shown = ", ".join(names[:limit])
    rest = len(names) - limit
    return f"{shown} and {rest:,} more" if rest > 0 else shown


def _class_folders(directory: Path) -> list[str]:
    """The sorted names of the split's visible sub-directories; DataError if there are none."""
    if not directory.is_dir():
        raise DataError(f"{directory}: not a directory; expected {directory.name}/<class>/<images>")
    entries = _visible(directory.iterdir())
    classes = [entry.name for entry in entries if entry.is_dir()]
    if classes:
        return classes
    images = [entry for entry in entries if entry.is_file() and _has_image_suffix(entry)]
    if images:
        raise DataError(
            f"{directory}/ holds {len(images):,} files but no class folders: sort them into "
            f"{directory.name}/<class>/ first"
        )
    raise DataError(
        f"{directory}: no class folders; expected {directory.name}/<class>/<images>, one "
        "folder per class"
    )


def _class_files(folder: Path) -> list[Path]:
    """Every visible file under `folder`, recursively, in sorted order."""
    files = []
    for parent, dirs, names in os.walk(folder):
        dirs[:] = [name for name in dirs if not name.startswith(".")]
        files.extend(Path(parent, name) for name in names if not name.startswith("."))
    return sorted(files)


def _check_policy(bad_images: str) -> None:
    if bad_images not in BAD_IMAGE_POLICIES:
        raise ValueError(f"bad_images must be one of {BAD_IMAGE_POLICIES}, got {bad_images!r}")


def _class_difference(expected: Sequence[str], found: Sequence[str]) -> tuple[list[str], list[str]]:
    """`(only in expected, only in found)`, each sorted."""
    return sorted(set(expected) - set(found)), sorted(set(found) - set(expected))


def _describe(names: list[str], where: str) -> str:
    """How many of `names` are only in `where`, and the first few of them."""
    if not names:
        return f"none only in {where}"
    return f"{len(names):,} only in {where} ({_some(names, _MAX_CLASSES)})"


def scan_split(
    directory: PathLike,
    *,
    bad_images: str = "refuse",
    classes: Sequence[str] | None = None,
) -> FolderSplit:
    """Lists `directory/<class>/**` without decoding; `classes`, if given, must match exactly.

    Files that are not images (by suffix and header) raise a DataError with
    ``bad_images="refuse"`` and are left out and listed in `skipped` with ``"skip"``.
    """
    _check_policy(bad_images)
    directory = Path(directory)
    found = _class_folders(directory)
    if classes is not None and sorted(classes) != found:
        missing, extra = _class_difference(classes, found)
        raise DataError(
            f"{directory}: class folders differ from the {len(classes):,} expected: "
            f"{_describe(missing, 'the expected classes')}, "
            f"{_describe(extra, f'{directory.name}/')}; give every split the same class folders"
        )
    files, labels, bad, empty = [], [], [], []
    for label, name in enumerate(found):
        images = []
        for path in _class_files(directory / name):
            (images if _is_image(path) else bad).append(path)
        if not images:
            empty.append(name)
        files.extend(images)
        labels.extend([label] * len(images))
    if bad and bad_images == "refuse":
        names = [str(path.relative_to(directory)) for path in bad]
        raise DataError(
            f"{directory}: {_count(len(bad), 'file')} in class folders "
            f"{'is not an image' if len(bad) == 1 else 'are not images'} "
            f"({_some(names, _MAX_NAMES)}); remove such files, or pass --bad-images skip to "
            "leave them out"
        )
    if empty:
        raise DataError(
            f"{directory}: {_count(len(empty), 'class folder')} of {directory.name}/ without "
            f"images ({_some(empty, _MAX_CLASSES)}); add images or remove those folders"
        )
    return FolderSplit(
        directory=directory,
        classes=tuple(found),
        files=tuple(files),
        labels=np.asarray(labels, dtype=np.int32),
        skipped=tuple(bad),
    )


def scan_image_folder(
    root: PathLike, *, bad_images: str = "refuse"
) -> tuple[FolderSplit, FolderSplit]:
    """`(train, val)` of an ImageNet-layout folder ``root/{train,val}/<class>/...``."""
    _check_policy(bad_images)
    root = Path(root)
    if not root.is_dir():
        raise DataError(
            f"{root}: not a directory; expected a folder holding train/<class>/ and val/<class>/"
        )
    missing = [split for split in SPLITS if not (root / split).is_dir()]
    if missing:
        held = [entry.name + ("/" if entry.is_dir() else "") for entry in _visible(root.iterdir())]
        holds = f"it holds {_some(held, _MAX_NAMES)}" if held else "it is empty"
        raise DataError(
            f"{root}: no {' or '.join(f'{split}/' for split in missing)} folder ({holds}); "
            "expected train/<class>/<images> and val/<class>/<images>"
        )
    train = scan_split(root / "train", bad_images=bad_images)
    only_train, only_val = _class_difference(train.classes, _class_folders(root / "val"))
    if only_train or only_val:
        raise DataError(
            f"{root}: train/ and val/ have different class folders: "
            f"{_describe(only_train, 'train/')}, {_describe(only_val, 'val/')}; "
            "give both splits the same class folders"
        )
    val = scan_split(root / "val", bad_images=bad_images, classes=train.classes)
    return train, val


# Decoding and per-example transforms.


def decode_rgb(data: bytes, source: str) -> Image.Image:
    """The RGB image encoded in `data`; DataError naming `source` if it cannot be decoded."""
    try:
        image = Image.open(io.BytesIO(data))
        image.load()
        if image.mode in ("P", "PA"):
            image = image.convert("RGBA")
        return image.convert("RGB")
    except Image.UnidentifiedImageError:
        raise DataError(f"{source}: not a readable image (not a format Pillow reads)") from None
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as error:
        raise DataError(f"{source}: not a readable image ({error})") from error


def _rgb_pixels(image: Image.Image) -> np.ndarray:
    if image.mode != "RGB":
        image = image.convert("RGB")
    return np.array(image, dtype=np.uint8)


def resized_crop_box(
    width: int,
    height: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> tuple[int, int, int, int]:
    """`(left, top, w, h)` of a random crop, as torchvision's ``RandomResizedCrop`` picks it.

    Up to 10 tries of area fraction in `scale` and aspect ratio w / h log-uniform in `ratio`;
    then the centre crop with the image's ratio clamped to `ratio`.
    """
    if not (0 < scale[0] <= scale[1] and 0 < ratio[0] <= ratio[1]):
        raise ValueError(
            f"need 0 < scale[0] <= scale[1], 0 < ratio[0] <= ratio[1]: {scale}, {ratio}"
        )
    area = width * height
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_ratio[0], log_ratio[1]))
        w = round(math.sqrt(target_area * aspect))
        h = round(math.sqrt(target_area / aspect))
        if 0 < w <= width and 0 < h <= height:
            top = int(rng.integers(0, height - h + 1))
            left = int(rng.integers(0, width - w + 1))
            return left, top, w, h
    return _centre_box(width, height, ratio)


def _centre_box(width: int, height: int, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """`(left, top, w, h)` of the central crop whose ratio w / h is clamped to `ratio`."""
    w, h = width, height
    if width / height < ratio[0]:
        h = min(height, max(1, round(width / ratio[0])))
    elif width / height > ratio[1]:
        w = min(width, max(1, round(height * ratio[1])))
    return (width - w) // 2, (height - h) // 2, w, h


def random_resized_crop(
    image: Image.Image,
    size: int,
    rng: np.random.Generator,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> np.ndarray:
    """A random crop (see `resized_crop_box`) resized bilinearly to uint8 [size, size, 3]."""
    left, top, w, h = resized_crop_box(image.width, image.height, rng, scale, ratio)
    box = (left, top, left + w, top + h)
    return _rgb_pixels(image.resize((size, size), Image.Resampling.BILINEAR, box=box))


def resize_centre_crop(image: Image.Image, size: int, resize: int | None = None) -> np.ndarray:
    """Shorter side resized to `resize` (default ``round(size * 256 / 224)``), then the
    central uint8 [size, size, 3]."""
    resize = round(size * 256 / 224) if resize is None else resize
    if resize < size:
        raise ValueError(f"resize must be at least size {size}, got {resize}")
    width, height = image.size
    short, long = min(width, height), max(width, height)
    new_long = round(long * resize / short)
    new_size = (resize, new_long) if width <= height else (new_long, resize)
    pixels = _rgb_pixels(image.resize(new_size, Image.Resampling.BILINEAR))
    top = (pixels.shape[0] - size) // 2
    left = (pixels.shape[1] - size) // 2
    return pixels[top : top + size, left : left + size]


def standardise_imagenet(pixels: np.ndarray) -> np.ndarray:
    """uint8 [h, w, 3] -> float32 ``(pixels / 255 - IMAGENET_MEAN) / IMAGENET_STD``."""
    mean = np.asarray(IMAGENET_MEAN, dtype=np.float32)
    std = np.asarray(IMAGENET_STD, dtype=np.float32)
    return (pixels.astype(np.float32) / np.float32(255) - mean) / std


def train_example(
    record: FolderRecord,
    rng: np.random.Generator,
    *,
    size: int,
    resized_crop: bool = True,
    flip: bool = True,
) -> tuple[np.ndarray, np.int32]:
    """`(float32 [size, size, 3], int32 label)`: random resized (or centre) crop, random
    left-right flip, standardised."""
    image = decode_rgb(record.data, record.path)
    if resized_crop:
        pixels = random_resized_crop(image, size, rng)
    else:
        pixels = resize_centre_crop(image, size)
    if flip and rng.random() < 0.5:
        pixels = pixels[:, ::-1]
    return standardise_imagenet(pixels), np.int32(record.label)


def eval_example(record: FolderRecord, *, size: int) -> tuple[np.ndarray, np.int32]:
    """`(float32 [size, size, 3], int32 label)`: resized, centre-cropped, standardised."""
    pixels = resize_centre_crop(decode_rgb(record.data, record.path), size)
    return standardise_imagenet(pixels), np.int32(record.label)


# A tiny synthetic folder.


def _class_colour(index: int, count: int) -> np.ndarray:
    """float32 [3] in [0, 255]: hues spread evenly around the colour wheel."""
    return np.asarray(colorsys.hsv_to_rgb(index / count, 0.8, 0.9), np.float32) * 255


def synthetic_image(
    index: int, count: int, size: tuple[int, int], rng: np.random.Generator
) -> np.ndarray:
    """uint8 [height, width, 3] for class `index` of `count`: its colour, striped at a
    class-specific angle with a random phase, plus noise."""
    width, height = size
    angle = math.pi * index / count
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    along = x * math.cos(angle) + y * math.sin(angle)
    stripes = 0.5 + 0.5 * np.sin(2 * math.pi * along / 8 + rng.uniform(0, 2 * math.pi))
    shade = 0.7 + 0.3 * stripes[..., None]
    noise = rng.normal(0, 12, size=(height, width, 3))
    pixels = _class_colour(index, count) * shade + noise
    return np.clip(np.rint(pixels), 0, 255).astype(np.uint8)


def write_image_folder(
    root: PathLike,
    *,
    classes: Sequence[str] = ("ant", "bee", "cat"),
    train_per_class: int = 4,
    val_per_class: int = 2,
    size: tuple[int, int] = (40, 32),
    seed: int = 0,
    quality: int = 90,
) -> Path:
    """Writes ``root/{train,val}/<class>/<class>_0000.jpg, ...`` of `size` (width, height) and
    returns `root`; each class is a noisy rendering of its own colour and stripes."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    for split, per_class in (("train", train_per_class), ("val", val_per_class)):
        for index, name in enumerate(classes):
            folder = root / split / name
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                pixels = synthetic_image(index, len(classes), size, rng)
                Image.fromarray(pixels).save(folder / f"{name}_{i:04d}.jpg", quality=quality)
    return root
