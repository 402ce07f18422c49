import gzip
import pickle
import re
from pathlib import Path

import numpy as np
import pytest

from experiments.data import (
    DATASET_NAMES,
    FASHION_MNIST_DEBIAN_PACKAGE,
    FASHION_MNIST_DIR,
    IDX_IMAGES_MAGIC,
    IDX_LABELS_MAGIC,
    Dataset,
    load_cifar,
    load_dataset,
    load_digits,
    load_idx,
    parse_idx,
    steps_per_epoch,
    subset,
)

CIFAR10_TRAIN_FILES = [f"data_batch_{index}" for index in range(1, 6)]
IDX_NAMES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}


def write_pickle(path: Path, content) -> None:
    path.write_bytes(pickle.dumps(content))


def cifar_rows(rng: np.random.Generator, count: int) -> np.ndarray:
    return rng.integers(0, 200, size=(count, 3072), dtype=np.uint8)


def write_cifar10(directory: Path, per_batch: int = 4, seed: int = 0) -> dict[str, dict]:
    """Five train batches and a test batch; returns the raw content written per file."""
    rng = np.random.default_rng(seed)
    directory.mkdir(parents=True, exist_ok=True)
    written = {}
    for name in [*CIFAR10_TRAIN_FILES, "test_batch"]:
        batch = {
            b"batch_label": name.encode(),
            b"data": cifar_rows(rng, per_batch),
            b"labels": rng.integers(0, 10, size=per_batch).tolist(),
        }
        write_pickle(directory / name, batch)
        written[name] = batch
    return written


def write_cifar100(directory: Path, train_count: int = 4, test_count: int = 3) -> dict[str, dict]:
    rng = np.random.default_rng(1)
    directory.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, count in (("train", train_count), ("test", test_count)):
        batch = {
            b"data": cifar_rows(rng, count),
            b"fine_labels": rng.integers(0, 100, size=count).tolist(),
            b"coarse_labels": rng.integers(0, 20, size=count).tolist(),
        }
        write_pickle(directory / name, batch)
        written[name] = batch
    return written


def idx_bytes(array: np.ndarray, magic: int) -> bytes:
    header = magic.to_bytes(4, "big") + b"".join(size.to_bytes(4, "big") for size in array.shape)
    return header + array.astype(np.uint8).tobytes()


def write_idx(path: Path, content: bytes, compress: bool) -> None:
    if compress:
        path.with_name(path.name + ".gz").write_bytes(gzip.compress(content))
    else:
        path.write_bytes(content)


def write_mnist(
    directory: Path, train_count: int = 5, test_count: int = 3, compress: bool = True
) -> dict[str, np.ndarray]:
    """Four tiny 28x28 IDX files; returns the raw arrays written."""
    rng = np.random.default_rng(2)
    directory.mkdir(parents=True, exist_ok=True)
    arrays = {
        "train_images": rng.integers(0, 256, size=(train_count, 28, 28), dtype=np.uint8),
        "train_labels": rng.integers(0, 10, size=train_count, dtype=np.uint8),
        "test_images": rng.integers(0, 256, size=(test_count, 28, 28), dtype=np.uint8),
        "test_labels": rng.integers(0, 10, size=test_count, dtype=np.uint8),
    }
    for role, array in arrays.items():
        magic = IDX_IMAGES_MAGIC if role.endswith("images") else IDX_LABELS_MAGIC
        write_idx(directory / IDX_NAMES[role], idx_bytes(array, magic), compress)
    return arrays


def expected_nhwc(rows: np.ndarray) -> np.ndarray:
    """CHW rows to NHWC by explicit index arithmetic, independently of the loader."""
    images = np.empty((len(rows), 32, 32, 3), np.float64)
    for y in range(32):
        for x in range(32):
            for c in range(3):
                images[:, y, x, c] = rows[:, c * 1024 + y * 32 + x]
    return images


def normalised_with(images: np.ndarray, reference: np.ndarray) -> np.ndarray:
    axes = tuple(range(reference.ndim - 1))
    return (images - reference.mean(axis=axes)) / reference.std(axis=axes)


def assert_normalised(images: np.ndarray) -> None:
    axes = tuple(range(images.ndim - 1))
    np.testing.assert_allclose(images.mean(axis=axes, dtype=np.float64), 0.0, atol=1e-5)
    np.testing.assert_allclose(images.std(axis=axes, dtype=np.float64), 1.0, atol=1e-5)


@pytest.fixture
def cifar10_dir(tmp_path: Path) -> tuple[Path, dict[str, dict]]:
    directory = tmp_path / "cifar-10-batches-py"
    return directory, write_cifar10(directory)


@pytest.fixture
def mnist_dir(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    directory = tmp_path / "mnist"
    return directory, write_mnist(directory)


def test_cifar10_shapes_dtypes_and_labels(cifar10_dir):
    directory, written = cifar10_dir
    ds = load_cifar(directory)
    assert ds.name == "cifar10"
    assert ds.num_classes == 10
    assert ds.train_images.shape == (20, 32, 32, 3)
    assert ds.test_images.shape == (4, 32, 32, 3)
    assert ds.image_shape == (32, 32, 3)
    assert ds.train_images.dtype == np.float32
    assert ds.test_images.dtype == np.float32
    assert ds.train_labels.dtype == np.int32
    assert ds.test_labels.dtype == np.int32
    expected_train = np.concatenate([written[name][b"labels"] for name in CIFAR10_TRAIN_FILES])
    np.testing.assert_array_equal(ds.train_labels, expected_train)
    np.testing.assert_array_equal(ds.test_labels, written["test_batch"][b"labels"])


def test_cifar_marked_pixel_lands_at_its_channel_row_and_column(tmp_path):
    directory = tmp_path / "cifar"
    written = write_cifar10(directory)
    rows = written["data_batch_2"][b"data"]
    channel, row, column = 1, 3, 30
    rows[1, channel * 1024 + row * 32 + column] = 255
    write_pickle(directory / "data_batch_2", written["data_batch_2"])

    ds = load_cifar(directory)

    marked_image = 4 + 1
    assert np.unravel_index(np.argmax(ds.train_images), ds.train_images.shape) == (
        marked_image,
        row,
        column,
        channel,
    )


def test_cifar_pixels_follow_chw_to_hwc_layout(cifar10_dir):
    directory, written = cifar10_dir
    ds = load_cifar(directory)
    train = expected_nhwc(np.concatenate([written[name][b"data"] for name in CIFAR10_TRAIN_FILES]))
    test = expected_nhwc(written["test_batch"][b"data"])
    np.testing.assert_allclose(ds.train_images, normalised_with(train, train), atol=1e-5)
    np.testing.assert_allclose(ds.test_images, normalised_with(test, train), atol=1e-5)


def test_cifar_train_split_is_normalised_per_channel(cifar10_dir):
    directory, _ = cifar10_dir
    ds = load_cifar(directory)
    assert_normalised(ds.train_images)
    assert ds.train_images.flags.c_contiguous and ds.test_images.flags.c_contiguous


def test_cifar_accepts_parent_of_standard_folder(cifar10_dir):
    directory, _ = cifar10_dir
    from_parent = load_cifar(directory.parent)
    from_folder = load_cifar(directory)
    np.testing.assert_array_equal(from_parent.train_images, from_folder.train_images)


def test_cifar100_reads_fine_labels(tmp_path):
    written = write_cifar100(tmp_path / "cifar-100-python")
    ds = load_cifar(tmp_path, num_classes=100)
    assert ds.name == "cifar100"
    assert ds.num_classes == 100
    assert ds.train_images.shape == (4, 32, 32, 3)
    assert ds.test_images.shape == (3, 32, 32, 3)
    np.testing.assert_array_equal(ds.train_labels, written["train"][b"fine_labels"])
    np.testing.assert_array_equal(ds.test_labels, written["test"][b"fine_labels"])
    assert_normalised(ds.train_images)


def test_cifar_rejects_other_class_counts(cifar10_dir):
    with pytest.raises(ValueError, match="10 or 100"):
        load_cifar(cifar10_dir[0], num_classes=20)


def test_cifar_missing_file_is_named(cifar10_dir):
    directory, _ = cifar10_dir
    (directory / "data_batch_3").unlink()
    with pytest.raises(FileNotFoundError) as error:
        load_cifar(directory)
    message = str(error.value)
    assert "missing data_batch_3 in" in message
    assert str(directory) in message


def test_cifar_missing_directory_names_expected_files(tmp_path):
    absent = tmp_path / "absent"
    with pytest.raises(FileNotFoundError) as error:
        load_cifar(absent, num_classes=100)
    message = str(error.value)
    assert f"{absent} does not exist" in message
    assert "train, test" in message
    assert "cifar-100-python" in message


def test_cifar_pickle_with_wrong_keys(tmp_path):
    directory = tmp_path / "cifar"
    written = write_cifar10(directory)
    batch = written["data_batch_4"]
    batch[b"fine_labels"] = batch.pop(b"labels")
    write_pickle(directory / "data_batch_4", batch)
    with pytest.raises(
        ValueError, match=r"data_batch_4: expected a dict with keys b'data' and b'labels'"
    ):
        load_cifar(directory)


def test_cifar_pickle_that_is_not_a_dict(tmp_path):
    directory = tmp_path / "cifar"
    write_cifar10(directory)
    write_pickle(directory / "test_batch", [1, 2, 3])
    with pytest.raises(ValueError, match="test_batch: expected a dict.*found list"):
        load_cifar(directory)


def test_cifar_truncated_pickle(tmp_path):
    directory = tmp_path / "cifar"
    write_cifar10(directory)
    path = directory / "data_batch_1"
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ValueError, match="data_batch_1: not a readable pickle"):
        load_cifar(directory)


def test_cifar_label_count_mismatch(tmp_path):
    directory = tmp_path / "cifar"
    written = write_cifar10(directory)
    written["test_batch"][b"labels"].append(3)
    write_pickle(directory / "test_batch", written["test_batch"])
    with pytest.raises(ValueError, match="test_batch: 5 labels for 4 images"):
        load_cifar(directory)


def test_cifar_wrong_data_shape(tmp_path):
    directory = tmp_path / "cifar"
    written = write_cifar10(directory)
    written["data_batch_1"][b"data"] = written["data_batch_1"][b"data"][:, :100]
    write_pickle(directory / "data_batch_1", written["data_batch_1"])
    with pytest.raises(ValueError, match=r"data_batch_1: b'data' must be uint8 \[n, 3072\]"):
        load_cifar(directory)


def test_cifar_label_out_of_range(tmp_path):
    directory = tmp_path / "cifar"
    written = write_cifar10(directory)
    written["data_batch_5"][b"labels"][0] = 10
    write_pickle(directory / "data_batch_5", written["data_batch_5"])
    with pytest.raises(ValueError, match=r"data_batch_5: labels span .* outside \[0, 9\]"):
        load_cifar(directory)


@pytest.mark.parametrize("compress", [True, False], ids=["gzip", "plain"])
def test_idx_shapes_dtypes_and_labels(tmp_path, compress):
    written = write_mnist(tmp_path, compress=compress)
    ds = load_idx(tmp_path, "mnist")
    assert ds.name == "mnist"
    assert ds.num_classes == 10
    assert ds.train_images.shape == (5, 28, 28, 1)
    assert ds.test_images.shape == (3, 28, 28, 1)
    assert ds.image_shape == (28, 28, 1)
    assert ds.train_images.dtype == np.float32
    assert ds.train_labels.dtype == np.int32
    np.testing.assert_array_equal(ds.train_labels, written["train_labels"])
    np.testing.assert_array_equal(ds.test_labels, written["test_labels"])
    train = written["train_images"][..., None].astype(np.float64)
    test = written["test_images"][..., None].astype(np.float64)
    np.testing.assert_allclose(ds.train_images, normalised_with(train, train), atol=1e-5)
    np.testing.assert_allclose(ds.test_images, normalised_with(test, train), atol=1e-5)
    assert_normalised(ds.train_images)


def test_idx_marked_pixel_keeps_its_row_and_column(tmp_path):
    images = np.zeros((5, 28, 28), np.uint8)
    images[2, 4, 21] = 255
    write_mnist(tmp_path)
    write_idx(tmp_path / IDX_NAMES["train_images"], idx_bytes(images, IDX_IMAGES_MAGIC), True)
    ds = load_idx(tmp_path, "mnist")
    assert np.unravel_index(np.argmax(ds.train_images), ds.train_images.shape) == (2, 4, 21, 0)


def test_idx_prefers_gzip_when_both_exist(tmp_path):
    written = write_mnist(tmp_path, compress=True)
    plain_labels = (written["train_labels"] + 1) % 10
    write_idx(
        tmp_path / IDX_NAMES["train_labels"], idx_bytes(plain_labels, IDX_LABELS_MAGIC), False
    )
    ds = load_idx(tmp_path, "mnist")
    np.testing.assert_array_equal(ds.train_labels, written["train_labels"])


def test_parse_idx_reads_big_endian_dimensions():
    array = np.arange(2 * 300 * 3, dtype=np.uint32).reshape(2, 300, 3).astype(np.uint8)
    parsed = parse_idx(idx_bytes(array, IDX_IMAGES_MAGIC), IDX_IMAGES_MAGIC)
    np.testing.assert_array_equal(parsed, array)


@pytest.mark.parametrize("compress", [True, False], ids=["gzip", "plain"])
def test_idx_bad_magic(tmp_path, compress):
    written = write_mnist(tmp_path, compress=compress)
    content = idx_bytes(written["test_images"], 0x00000903)
    write_idx(tmp_path / IDX_NAMES["test_images"], content, compress)
    with pytest.raises(ValueError, match=r"t10k-images-idx3-ubyte.*bad magic number 0x00000903"):
        load_idx(tmp_path, "mnist")


def test_idx_labels_file_in_place_of_images(tmp_path):
    written = write_mnist(tmp_path)
    content = idx_bytes(written["train_labels"], IDX_LABELS_MAGIC)
    write_idx(tmp_path / IDX_NAMES["train_images"], content, True)
    with pytest.raises(ValueError, match="0x00000801, expected 0x00000803"):
        load_idx(tmp_path, "mnist")


@pytest.mark.parametrize("compress", [True, False], ids=["gzip", "plain"])
def test_idx_truncated_data(tmp_path, compress):
    written = write_mnist(tmp_path, compress=compress)
    content = idx_bytes(written["train_images"], IDX_IMAGES_MAGIC)[:-10]
    write_idx(tmp_path / IDX_NAMES["train_images"], content, compress)
    with pytest.raises(ValueError, match=r"train-images-idx3-ubyte.*truncated.*3920 bytes"):
        load_idx(tmp_path, "mnist")


def test_idx_truncated_header(tmp_path):
    write_mnist(tmp_path, compress=False)
    path = tmp_path / IDX_NAMES["test_labels"]
    path.write_bytes(path.read_bytes()[:6])
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte: truncated header"):
        load_idx(tmp_path, "mnist")


def test_idx_trailing_bytes(tmp_path):
    written = write_mnist(tmp_path, compress=False)
    content = idx_bytes(written["test_labels"], IDX_LABELS_MAGIC) + b"\x00"
    write_idx(tmp_path / IDX_NAMES["test_labels"], content, False)
    with pytest.raises(ValueError, match="t10k-labels-idx1-ubyte: has trailing bytes"):
        load_idx(tmp_path, "mnist")


def test_idx_truncated_gzip_stream(tmp_path):
    write_mnist(tmp_path)
    path = tmp_path / (IDX_NAMES["train_images"] + ".gz")
    path.write_bytes(path.read_bytes()[:-20])
    with pytest.raises(ValueError, match="train-images-idx3-ubyte.gz: corrupt or truncated gzip"):
        load_idx(tmp_path, "mnist")


def test_idx_label_count_mismatch(tmp_path):
    written = write_mnist(tmp_path)
    labels = written["train_labels"][:4]
    write_idx(tmp_path / IDX_NAMES["train_labels"], idx_bytes(labels, IDX_LABELS_MAGIC), True)
    with pytest.raises(ValueError, match="train-labels-idx1-ubyte.gz .*4 labels for 5 images"):
        load_idx(tmp_path, "mnist")


def test_idx_missing_file_is_named(mnist_dir):
    directory, _ = mnist_dir
    (directory / "t10k-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(FileNotFoundError) as error:
        load_idx(directory, "mnist")
    message = str(error.value)
    assert f"missing t10k-labels-idx1-ubyte.gz in {directory}" in message
    assert FASHION_MNIST_DEBIAN_PACKAGE not in message


def test_idx_missing_directory_names_every_file(tmp_path):
    absent = tmp_path / "absent"
    with pytest.raises(FileNotFoundError) as error:
        load_idx(absent, "mnist")
    message = str(error.value)
    assert f"{absent} does not exist" in message
    for stem in IDX_NAMES.values():
        assert f"{stem}.gz" in message


def test_fashion_mnist_missing_mentions_debian_package(tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load_dataset("fashion_mnist", data_dir=tmp_path / "absent")
    assert FASHION_MNIST_DEBIAN_PACKAGE in str(error.value)
    assert "train-images-idx3-ubyte.gz" in str(error.value)


def test_digits_shapes_and_classes():
    ds = load_digits()
    assert ds.name == "digits"
    assert ds.num_classes == 10
    assert len(ds.train_images) + len(ds.test_images) == 1797
    assert len(ds.test_images) == 360
    assert ds.train_images.shape[1:] == (8, 8, 1)
    assert ds.image_shape == (8, 8, 1)
    assert ds.train_images.dtype == np.float32
    assert ds.train_labels.dtype == np.int32
    assert set(ds.train_labels.tolist()) == set(range(10))
    assert set(ds.test_labels.tolist()) == set(range(10))
    assert_normalised(ds.train_images)


def test_digits_split_is_stratified():
    ds = load_digits(test_fraction=0.25)
    train_share = np.bincount(ds.train_labels) / len(ds.train_labels)
    test_share = np.bincount(ds.test_labels) / len(ds.test_labels)
    np.testing.assert_allclose(train_share, test_share, atol=0.01)


def test_digits_split_depends_only_on_seed():
    first, again, other = load_digits(seed=3), load_digits(seed=3), load_digits(seed=4)
    np.testing.assert_array_equal(first.train_images, again.train_images)
    np.testing.assert_array_equal(first.test_labels, again.test_labels)
    assert not np.array_equal(first.test_labels, other.test_labels)


def test_dispatcher_loads_every_format(tmp_path):
    write_cifar10(tmp_path / "c10" / "cifar-10-batches-py")
    write_cifar100(tmp_path / "c100")
    write_mnist(tmp_path / "mnist")
    write_mnist(tmp_path / "fashion", compress=False)
    assert load_dataset("cifar10", tmp_path / "c10").num_classes == 10
    assert load_dataset("cifar100", str(tmp_path / "c100")).num_classes == 100
    assert load_dataset("mnist", tmp_path / "mnist").name == "mnist"
    assert load_dataset("fashion_mnist", tmp_path / "fashion").name == "fashion_mnist"
    assert load_dataset("Fashion-MNIST", tmp_path / "fashion").name == "fashion_mnist"


def test_dispatcher_passes_options_to_digits():
    ds = load_dataset("digits", test_fraction=0.5, seed=1)
    np.testing.assert_array_equal(ds.test_labels, load_digits(0.5, seed=1).test_labels)
    assert len(ds.test_images) == 899


def test_dispatcher_unknown_name_lists_known_names():
    with pytest.raises(ValueError) as error:
        load_dataset("imagenet")
    for name in DATASET_NAMES:
        assert name in str(error.value)


@pytest.mark.parametrize("name", ["mnist", "cifar10", "cifar100"])
def test_dispatcher_requires_data_dir_without_default(name):
    with pytest.raises(ValueError, match=f"{name} has no default location"):
        load_dataset(name)


def test_dispatcher_rejects_data_dir_for_digits(tmp_path):
    with pytest.raises(ValueError, match="takes no data_dir"):
        load_dataset("digits", tmp_path)


@pytest.mark.skipif(
    not FASHION_MNIST_DIR.is_dir(),
    reason=f"{FASHION_MNIST_DIR} is absent (Debian package {FASHION_MNIST_DEBIAN_PACKAGE})",
)
def test_real_fashion_mnist_from_default_location():
    ds = load_dataset("fashion_mnist")
    assert ds.train_images.shape == (60000, 28, 28, 1)
    assert ds.test_images.shape == (10000, 28, 28, 1)
    assert set(ds.train_labels.tolist()) == set(range(10))


def test_subset_takes_first_examples():
    ds = load_digits()
    small = subset(ds, train_size=100, test_size=7)
    assert small.train_images.shape == (100, 8, 8, 1)
    assert small.test_images.shape == (7, 8, 8, 1)
    np.testing.assert_array_equal(small.train_images, ds.train_images[:100])
    np.testing.assert_array_equal(small.test_labels, ds.test_labels[:7])
    assert (small.name, small.num_classes) == (ds.name, ds.num_classes)


def test_subset_none_keeps_split():
    ds = load_digits()
    small = subset(ds, test_size=5)
    assert len(small.train_images) == len(ds.train_images)
    assert len(small.test_images) == 5


@pytest.mark.parametrize("train_size", [-1, 1438])
def test_subset_rejects_sizes_out_of_range(train_size):
    with pytest.raises(ValueError, match=re.escape("train_size must be in [0, 1437]")):
        subset(load_digits(), train_size=train_size)


def test_dataset_checks_split_shapes():
    images = np.zeros((3, 4, 4, 1), np.float32)
    with pytest.raises(ValueError, match="2 train labels for 3 train images"):
        Dataset("toy", images, np.zeros(2, np.int32), images, np.zeros(3, np.int32), 2)
    with pytest.raises(ValueError, match="differ in shape"):
        Dataset("toy", images, np.zeros(3, np.int32), images[:, :2], np.zeros(3, np.int32), 2)


@pytest.mark.parametrize(
    ("n", "batch_size", "drop_remainder", "expected"),
    [(0, 4, False, 0), (8, 4, False, 2), (9, 4, False, 3), (9, 4, True, 2), (3, 4, True, 0)],
)
def test_steps_per_epoch(n, batch_size, drop_remainder, expected):
    assert steps_per_epoch(n, batch_size, drop_remainder) == expected
