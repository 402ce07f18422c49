import functools
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from experiments.imagefolder import (
    BAD_IMAGE_POLICIES,
    IMAGE_SUFFIXES,
    IMAGENET_MEAN,
    IMAGENET_STD,
    DataError,
    FolderRecord,
    FolderSplit,
    decode_rgb,
    eval_example,
    looks_like_image,
    random_resized_crop,
    resize_centre_crop,
    resized_crop_box,
    scan_image_folder,
    scan_split,
    standardise_imagenet,
    train_example,
    write_image_folder,
)

BILINEAR = Image.Resampling.BILINEAR
CORRUPT_JPEG = b"\xff\xd8\xff\xe0" + b"not really a jpeg " * 8


def write_image(path: Path, colour=(200, 100, 50), size=(6, 4), format=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path, format=format)
    return path


def write_split(directory: Path, counts: dict[str, int]) -> None:
    """`counts[class]` PNG images in `directory/<class>/`, classes made in the order given."""
    for name, count in counts.items():
        (directory / name).mkdir(parents=True)
        for i in range(count):
            write_image(directory / name / f"{i}.png", colour=(i, 0, 0))


def write_folder(root: Path, train: dict[str, int], val: dict[str, int]) -> Path:
    write_split(root / "train", train)
    write_split(root / "val", val)
    return root


def ramp_image(width: int, height: int) -> np.ndarray:
    """uint8 [height, width, 3] whose pixels are all distinct: red = 8 x, green = 12 y."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([8 * x, 12 * y, np.full_like(x, 7)], axis=-1).astype(np.uint8)


# Scanning.


def test_scan_split_sorts_classes_and_labels_by_index(tmp_path):
    split = tmp_path / "train"
    write_split(split, {"zebra": 3, "ant": 1, "mole": 2})
    write_image(split / "mole" / "deeper" / "0.png")  # Searched recursively.

    result = scan_split(split)

    assert result.classes == ("ant", "mole", "zebra")
    expected_files = [
        "ant/0.png",
        "mole/0.png",
        "mole/1.png",
        "mole/deeper/0.png",
        "zebra/0.png",
        "zebra/1.png",
        "zebra/2.png",
    ]
    assert [str(file.relative_to(split)) for file in result.files] == expected_files
    assert result.labels.dtype == np.int32
    np.testing.assert_array_equal(result.labels, [0, 1, 1, 1, 2, 2, 2])
    assert result.skipped == ()
    assert len(result) == 7


def test_getitem_reads_bytes_label_and_path(tmp_path):
    write_split(tmp_path / "train", {"zebra": 2, "ant": 1})
    split = scan_split(tmp_path / "train")
    path = tmp_path / "train" / "zebra" / "1.png"

    for index in (2, np.int64(2), np.int32(2), -1):
        record = split[index]
        assert isinstance(record, FolderRecord)
        assert record.data == path.read_bytes()
        assert record.label == 1
        assert isinstance(record.label, int)
        assert record.path == str(path)


def test_first_keeps_the_leading_files(tmp_path):
    write_split(tmp_path / "train", {"b": 2, "a": 2})
    split = scan_split(tmp_path / "train")

    head = split.first(3)

    assert isinstance(head, FolderSplit)
    assert len(head) == 3
    assert head.classes == ("a", "b")
    assert head.files == split.files[:3]
    np.testing.assert_array_equal(head.labels, [0, 0, 1])
    assert head[2].data == (tmp_path / "train" / "b" / "0.png").read_bytes()
    assert len(split.first(0)) == 0
    with pytest.raises(ValueError, match="count"):
        split.first(5)


@pytest.mark.parametrize("format", ["JPEG", "PNG", "GIF", "BMP", "WEBP"])
def test_looks_like_image_accepts_real_images(tmp_path, format):
    path = write_image(tmp_path / f"image.{format.lower()}", format=format)
    assert looks_like_image(path)
    assert looks_like_image(str(path))


def test_looks_like_image_rejects_non_images(tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("hello, this is not a picture\n")
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    wave = tmp_path / "sound.webp"
    wave.write_bytes(b"RIFF\x24\x00\x00\x00WAVEfmt ")
    short_png = tmp_path / "short.png"
    short_png.write_bytes(b"\x89PNG")

    assert not looks_like_image(text)
    assert not looks_like_image(empty)
    assert not looks_like_image(wave)
    assert not looks_like_image(short_png)
    assert not looks_like_image(tmp_path / "missing.jpg")
    assert not looks_like_image(tmp_path)  # A directory cannot be read as a file.


def test_image_suffixes_are_lower_case_with_dots():
    assert set(IMAGE_SUFFIXES) == {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp"}


def test_upper_case_suffixes_count_as_images(tmp_path):
    write_image(tmp_path / "train" / "a" / "one.JPG", format="JPEG")
    write_image(tmp_path / "train" / "a" / "two.Png", format="PNG")
    assert len(scan_split(tmp_path / "train")) == 2


def test_scan_image_folder_reads_both_splits(tmp_path):
    write_folder(tmp_path, {"dog": 3, "cat": 2}, {"dog": 1, "cat": 1})

    train, val = scan_image_folder(tmp_path)

    assert train.classes == val.classes == ("cat", "dog")
    assert train.directory == tmp_path / "train"
    assert val.directory == tmp_path / "val"
    np.testing.assert_array_equal(train.labels, [0, 0, 1, 1, 1])
    np.testing.assert_array_equal(val.labels, [0, 1])


def test_hidden_entries_are_ignored(tmp_path):
    write_split(tmp_path / "train", {"a": 1, "b": 1})
    (tmp_path / "train" / ".DS_Store").write_bytes(b"junk")
    (tmp_path / "train" / ".cache").mkdir()  # Not a class.
    (tmp_path / "train" / "a" / ".DS_Store").write_bytes(b"junk")
    (tmp_path / "train" / "a" / ".thumbs").mkdir()
    (tmp_path / "train" / "a" / ".thumbs" / "x.txt").write_text("junk")
    write_image(tmp_path / "train" / "b" / ".hidden.png")

    split = scan_split(tmp_path / "train")

    assert split.classes == ("a", "b")
    assert [file.name for file in split.files] == ["0.png", "0.png"]
    assert split.skipped == ()


def test_scan_does_not_decode(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    (tmp_path / "train" / "a" / "broken.jpg").write_bytes(CORRUPT_JPEG)
    assert len(scan_split(tmp_path / "train")) == 1


# Scanning errors.


def test_missing_root(tmp_path):
    with pytest.raises(DataError, match="nowhere"):
        scan_image_folder(tmp_path / "nowhere")
    file = tmp_path / "file.txt"
    file.write_text("x")
    with pytest.raises(DataError, match="file.txt"):
        scan_image_folder(file)


def test_missing_train_names_it_and_what_root_holds(tmp_path):
    write_split(tmp_path / "val", {"a": 1})
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / ".hidden").write_text("x")

    with pytest.raises(DataError) as error:
        scan_image_folder(tmp_path)

    message = str(error.value)
    assert str(tmp_path) in message
    assert "no train/ folder" in message
    assert "notes.txt" in message
    assert "val/" in message
    assert ".hidden" not in message


def test_missing_val_and_empty_root(tmp_path):
    write_split(tmp_path / "train", {"a": 1})
    with pytest.raises(DataError, match="no val/ folder"):
        scan_image_folder(tmp_path)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no train/ or val/ folder.*empty"):
        scan_image_folder(empty)


def test_split_of_loose_images_says_to_sort_them(tmp_path):
    write_split(tmp_path / "train", {"a": 1})
    for i in range(3):
        write_image(tmp_path / "val" / f"ILSVRC2012_val_{i:08d}.JPEG", format="JPEG")

    with pytest.raises(DataError) as error:
        scan_image_folder(tmp_path)

    message = str(error.value)
    assert str(tmp_path / "val") in message
    assert "holds 3 files but no class folders" in message
    assert "val/<class>/" in message


def test_empty_split_has_no_class_folders(tmp_path):
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="no class folders"):
        scan_split(tmp_path / "train")
    with pytest.raises(DataError, match="not a directory"):
        scan_split(tmp_path / "missing")


def test_bad_files_are_refused_by_default(tmp_path):
    write_split(tmp_path / "train", {"a": 2, "b": 1})
    (tmp_path / "train" / "a" / "notes.txt").write_text("x")
    (tmp_path / "train" / "b" / "fake.jpg").write_text("not an image")

    with pytest.raises(DataError) as error:
        scan_split(tmp_path / "train")

    message = str(error.value)
    assert "2 files" in message
    assert "a/notes.txt" in message
    assert "b/fake.jpg" in message
    assert "--bad-images skip" in message


def test_many_bad_files_name_the_first_three(tmp_path):
    write_split(tmp_path / "train", {"a": 1})
    for i in range(5):
        (tmp_path / "train" / "a" / f"bad{i}.txt").write_text("x")

    with pytest.raises(DataError) as error:
        scan_split(tmp_path / "train")

    message = str(error.value)
    assert "5 files" in message
    assert "a/bad0.txt, a/bad1.txt, a/bad2.txt and 2 more" in message
    assert "bad3" not in message


def test_skip_leaves_bad_files_out_and_lists_them(tmp_path):
    write_split(tmp_path / "train", {"a": 2, "b": 1})
    notes = tmp_path / "train" / "a" / "notes.txt"
    notes.write_text("x")
    fake = tmp_path / "train" / "b" / "fake.jpg"
    fake.write_text("not an image")
    empty = tmp_path / "train" / "b" / "empty.png"
    empty.write_bytes(b"")

    split = scan_split(tmp_path / "train", bad_images="skip")

    assert split.skipped == (notes, empty, fake)
    assert [str(file.relative_to(tmp_path / "train")) for file in split.files] == [
        "a/0.png",
        "a/1.png",
        "b/0.png",
    ]
    np.testing.assert_array_equal(split.labels, [0, 0, 1])


def test_class_without_images(tmp_path):
    write_split(tmp_path / "train", {"ant": 1, "mole": 0})
    with pytest.raises(DataError) as error:
        scan_split(tmp_path / "train")
    message = str(error.value).replace(str(tmp_path), "<tmp>")
    assert message.startswith("<tmp>/train:")
    assert "1 class folder of train/ without images (mole)" in message
    assert "ant" not in message

    (tmp_path / "train" / "mole" / "notes.txt").write_text("x")
    with pytest.raises(DataError, match="mole"):
        scan_split(tmp_path / "train", bad_images="skip")


def test_train_and_val_classes_must_match(tmp_path):
    write_folder(tmp_path, {"ant": 1, "bee": 1, "cat": 1}, {"bee": 1, "cat": 1, "dog": 1, "eel": 1})

    with pytest.raises(DataError) as error:
        scan_image_folder(tmp_path)

    message = str(error.value)
    assert "1 only in train/ (ant)" in message
    assert "2 only in val/ (dog, eel)" in message


def test_train_and_val_class_difference_is_capped(tmp_path):
    only_train = {f"t{i}": 1 for i in range(7)}
    write_folder(tmp_path, {"shared": 1, **only_train}, {"shared": 1})

    with pytest.raises(DataError) as error:
        scan_image_folder(tmp_path)

    message = str(error.value)
    assert "7 only in train/ (t0, t1, t2, t3, t4 and 2 more)" in message
    assert "none only in val/" in message


def test_scan_split_with_given_classes(tmp_path):
    write_split(tmp_path / "val", {"b": 1, "a": 1})
    assert scan_split(tmp_path / "val", classes=("a", "b")).classes == ("a", "b")

    with pytest.raises(DataError) as error:
        scan_split(tmp_path / "val", classes=("a", "c"))

    message = str(error.value)
    assert str(tmp_path / "val") in message
    assert "(c)" in message
    assert "(b)" in message


def test_unknown_bad_image_policy(tmp_path):
    write_folder(tmp_path, {"a": 1}, {"a": 1})
    for scan in (scan_split, scan_image_folder):
        with pytest.raises(ValueError, match="refuse.*skip"):
            scan(tmp_path, bad_images="ignore")
    assert BAD_IMAGE_POLICIES == ("refuse", "skip")


# Decoding.


@pytest.mark.parametrize(
    ("mode", "colour", "expected"),
    [
        ("L", 77, (77, 77, 77)),
        ("RGBA", (10, 20, 30, 128), (10, 20, 30)),
        ("RGB", (1, 2, 3), (1, 2, 3)),
    ],
)
def test_decode_rgb_converts_to_rgb(tmp_path, mode, colour, expected):
    path = tmp_path / "image.png"
    Image.new(mode, (5, 3), colour).save(path)

    image = decode_rgb(path.read_bytes(), str(path))

    assert image.mode == "RGB"
    assert image.size == (5, 3)
    assert np.unique(np.asarray(image).reshape(-1, 3), axis=0).tolist() == [list(expected)]


def test_decode_rgb_converts_palette_images(tmp_path):
    path = tmp_path / "image.gif"
    Image.new("RGB", (4, 4), (255, 0, 0)).convert("P").save(path)
    image = decode_rgb(path.read_bytes(), str(path))
    assert image.mode == "RGB"
    assert np.unique(np.asarray(image).reshape(-1, 3), axis=0).tolist() == [[255, 0, 0]]


def test_decode_rgb_names_the_source_of_an_unreadable_image():
    for data in (CORRUPT_JPEG, b"", b"plain text"):
        with pytest.raises(DataError, match="somewhere/x.jpg: not a readable image"):
            decode_rgb(data, "somewhere/x.jpg")


# Crops.


def box_fits(box, width, height, scale, ratio) -> bool:
    """Whether `box` can come from an area fraction in `scale` and a ratio in `ratio`.

    `w = round(sqrt(a r))` and `h = round(sqrt(a / r))` put `sqrt(a r)` in [w - 1/2, w + 1/2]
    and `sqrt(a / r)` in [h - 1/2, h + 1/2], so the area `a` (their product) lies in
    [(w - 1/2)(h - 1/2), (w + 1/2)(h + 1/2)] and the ratio `r` (their quotient) in
    [(w - 1/2) / (h + 1/2), (w + 1/2) / (h - 1/2)]; each range must meet the allowed one.
    """
    left, top, w, h = box
    area = width * height
    areas = ((w - 0.5) * (h - 0.5), (w + 0.5) * (h + 0.5))
    ratios = ((w - 0.5) / (h + 0.5), (w + 0.5) / (h - 0.5))
    return (
        areas[0] <= scale[1] * area
        and areas[1] >= scale[0] * area
        and ratios[0] <= ratio[1]
        and ratios[1] >= ratio[0]
    )


@pytest.mark.parametrize("shape", [(64, 48), (50, 50), (23, 71)])
def test_resized_crop_box_stays_inside_with_area_and_ratio_in_range(shape):
    width, height = shape
    scale, ratio = (0.08, 1.0), (3 / 4, 4 / 3)
    offsets = set()
    for seed in range(400):
        box = resized_crop_box(width, height, np.random.default_rng(seed), scale, ratio)
        left, top, w, h = box
        assert all(isinstance(value, int) for value in box)
        assert 0 < w <= width and 0 < h <= height
        assert 0 <= left <= width - w and 0 <= top <= height - h
        assert box_fits(box, width, height, scale, ratio), (seed, box)
        offsets.add((left, top))
    assert len(offsets) > 100  # Offsets vary.


def test_resized_crop_box_with_narrow_scale():
    # Area fraction 1/4 of 40 x 40 and ratio 1: w = h = round(sqrt(400)) = 20, so the offsets
    # range over 0..20 each.
    for seed in range(50):
        rng = np.random.default_rng(seed)
        left, top, w, h = resized_crop_box(40, 40, rng, (0.25, 0.25), (1, 1))
        assert (w, h) == (20, 20)
        assert 0 <= left <= 20 and 0 <= top <= 20


@pytest.mark.parametrize(
    ("width", "height", "scale", "ratio", "expected"),
    [
        # 1 x 50: every try needs w >= round(sqrt(0.08 * 50 * 3/4)) = 2 > 1, so the centre crop:
        # ratio 1/50 < 3/4 keeps w = 1, h = round(1 / (3/4)) = 1, top = (50 - 1) // 2 = 24.
        (1, 50, (0.08, 1.0), (3 / 4, 4 / 3), (0, 24, 1, 1)),
        # 50 x 1 mirrors it: h = 1, w = round(1 * 4/3) = 1, left = 24.
        (50, 1, (0.08, 1.0), (3 / 4, 4 / 3), (24, 0, 1, 1)),
        # Whole area at ratio 1 of 30 x 20 needs w = h = round(sqrt(600)) = 24 > 20; centre crop:
        # ratio 1.5 > 1 keeps h = 20, w = round(20 * 1) = 20, left = (30 - 20) // 2 = 5.
        (30, 20, (1.0, 1.0), (1.0, 1.0), (5, 0, 20, 20)),
        # More than the whole area never fits; ratio 1.5 lies in [1/2, 2]: the whole image.
        (30, 20, (1.5, 2.0), (0.5, 2.0), (0, 0, 30, 20)),
    ],
)
def test_resized_crop_box_falls_back_to_a_centre_crop(width, height, scale, ratio, expected):
    for seed in range(5):
        rng = np.random.default_rng(seed)
        assert resized_crop_box(width, height, rng, scale, ratio) == expected


def test_resized_crop_box_rejects_bad_ranges():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError):
        resized_crop_box(10, 10, rng, (0.5, 0.1))
    with pytest.raises(ValueError):
        resized_crop_box(10, 10, rng, (0.1, 0.5), (2.0, 1.0))


def test_random_resized_crop_shape_and_determinism():
    image = Image.fromarray(ramp_image(30, 20))

    first = random_resized_crop(image, 12, np.random.default_rng(3))
    again = random_resized_crop(image, 12, np.random.default_rng(3))

    assert first.shape == (12, 12, 3)
    assert first.dtype == np.uint8
    np.testing.assert_array_equal(first, again)
    others = [random_resized_crop(image, 12, np.random.default_rng(seed)) for seed in range(4, 8)]
    assert any(not np.array_equal(first, other) for other in others)


def test_random_resized_crop_of_the_whole_square_image_is_a_resize():
    image = Image.fromarray(ramp_image(20, 20))
    expected = np.asarray(image.resize((8, 8), BILINEAR))
    for seed in range(5):
        rng = np.random.default_rng(seed)
        crop = random_resized_crop(image, 8, rng, scale=(1.0, 1.0), ratio=(1.0, 1.0))
        np.testing.assert_array_equal(crop, expected)


def test_random_resized_crop_windows_lie_inside_the_image():
    # Area fraction 100/600 at ratio 1 on 30 x 20: a 10 x 10 box, resized to 10 x 10, which is
    # the window itself. The pixels are all distinct, so the window's place is found by search.
    pixels = ramp_image(30, 20)
    image = Image.fromarray(pixels)
    windows = {
        (top, left): pixels[top : top + 10, left : left + 10]
        for top in range(20 - 10 + 1)
        for left in range(30 - 10 + 1)
    }
    seen = set()
    for seed in range(100):
        rng = np.random.default_rng(seed)
        crop = random_resized_crop(image, 10, rng, scale=(1 / 6, 1 / 6), ratio=(1.0, 1.0))
        matches = [place for place, window in windows.items() if np.array_equal(crop, window)]
        assert len(matches) == 1, seed
        seen.add(matches[0])
    assert len(seen) > 50


def test_resize_centre_crop_by_hand():
    # 10 x 20 (width x height) with resize 8: the shorter side (width) becomes 8 and the longer
    # round(20 * 8 / 10) = 16; the centre 6 x 6 starts at row (16 - 6) // 2 = 5 and column
    # (8 - 6) // 2 = 1.
    portrait = Image.fromarray(ramp_image(10, 20))
    expected = np.asarray(portrait.resize((8, 16), BILINEAR))[5:11, 1:7]
    np.testing.assert_array_equal(resize_centre_crop(portrait, 6, resize=8), expected)

    # 20 x 10: width round(20 * 8 / 10) = 16, height 8; row (8 - 6) // 2 = 1, column 5.
    landscape = Image.fromarray(ramp_image(20, 10))
    expected = np.asarray(landscape.resize((16, 8), BILINEAR))[1:7, 5:11]
    np.testing.assert_array_equal(resize_centre_crop(landscape, 6, resize=8), expected)

    # 10 x 13: height round(13 * 8 / 10) = round(10.4) = 10; row (10 - 6) // 2 = 2, column 1.
    odd = Image.fromarray(ramp_image(10, 13))
    expected = np.asarray(odd.resize((8, 10), BILINEAR))[2:8, 1:7]
    np.testing.assert_array_equal(resize_centre_crop(odd, 6, resize=8), expected)


def test_resize_centre_crop_default_resize():
    # size 14: resize round(14 * 256 / 224) = 16. 30 x 45: height round(45 * 16 / 30) = 24;
    # row (24 - 14) // 2 = 5, column (16 - 14) // 2 = 1.
    image = Image.fromarray(ramp_image(30, 45))
    expected = np.asarray(image.resize((16, 24), BILINEAR))[5:19, 1:15]
    crop = resize_centre_crop(image, 14)
    assert crop.dtype == np.uint8
    np.testing.assert_array_equal(crop, expected)


def test_resize_centre_crop_needs_resize_at_least_size():
    with pytest.raises(ValueError, match="resize"):
        resize_centre_crop(Image.new("RGB", (10, 10)), 8, resize=6)


def test_standardise_imagenet_by_hand():
    pixels = np.array([[[0, 0, 0], [255, 255, 255], [128, 64, 32]]], np.uint8)
    expected = [
        [
            # -0.485 / 0.229, -0.456 / 0.224, -0.406 / 0.225
            [-2.117904, -2.035714, -1.804444],
            # (1 - 0.485) / 0.229, (1 - 0.456) / 0.224, (1 - 0.406) / 0.225
            [2.248908, 2.428571, 2.640000],
            # (0.501961 - 0.485) / 0.229, (0.250980 - 0.456) / 0.224, (0.125490 - 0.406) / 0.225
            [0.074065, -0.915266, -1.246710],
        ]
    ]
    result = standardise_imagenet(pixels)
    assert result.dtype == np.float32
    np.testing.assert_allclose(result, expected, atol=1e-5)
    assert IMAGENET_MEAN == (0.485, 0.456, 0.406)
    assert IMAGENET_STD == (0.229, 0.224, 0.225)


# Per-example transforms.


def png_record(tmp_path: Path, pixels: np.ndarray, label: int = 2) -> FolderRecord:
    path = tmp_path / "image.png"
    Image.fromarray(pixels).save(path)
    return FolderRecord(data=path.read_bytes(), label=label, path=str(path))


def test_train_example_shape_dtype_and_label(tmp_path):
    record = png_record(tmp_path, ramp_image(30, 20), label=4)
    for resized_crop in (True, False):
        image, label = train_example(
            record, np.random.default_rng(0), size=12, resized_crop=resized_crop
        )
        assert image.shape == (12, 12, 3)
        assert image.dtype == np.float32
        assert label == 4
        assert isinstance(label, np.int32)


def test_train_example_flips_for_some_seeds(tmp_path):
    record = png_record(tmp_path, ramp_image(30, 20))
    rng = np.random.default_rng(0)
    plain, _ = train_example(record, rng, size=12, resized_crop=False, flip=False)
    flips = []
    for seed in range(20):
        image, _ = train_example(record, np.random.default_rng(seed), size=12, resized_crop=False)
        # Without the resized crop the flip is the only draw: mirrored when it is below 1/2.
        flipped = np.random.default_rng(seed).random() < 0.5
        np.testing.assert_array_equal(image, plain[:, ::-1] if flipped else plain)
        flips.append(flipped)
    assert any(flips) and not all(flips)
    assert not np.array_equal(plain, plain[:, ::-1])


def test_eval_example_of_a_flat_colour(tmp_path):
    record = png_record(tmp_path, np.full((20, 30, 3), (200, 100, 50), np.uint8), label=1)
    image, label = eval_example(record, size=8)
    # (200 / 255 - 0.485) / 0.229, (100 / 255 - 0.456) / 0.224, (50 / 255 - 0.406) / 0.225
    expected = [1.307047, -0.285014, -0.932985]
    assert image.shape == (8, 8, 3)
    assert image.dtype == np.float32
    np.testing.assert_allclose(image, np.broadcast_to(expected, (8, 8, 3)), atol=1e-5)
    assert label == 1 and isinstance(label, np.int32)


def test_corrupt_jpeg_names_the_file(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    path = tmp_path / "train" / "a" / "broken.jpg"
    path.write_bytes(CORRUPT_JPEG)
    record = scan_split(tmp_path / "train")[0]

    with pytest.raises(DataError, match="broken.jpg: not a readable image"):
        train_example(record, np.random.default_rng(0), size=8)
    with pytest.raises(DataError, match="broken.jpg: not a readable image"):
        eval_example(record, size=8)


# A tiny synthetic folder.


def test_write_image_folder_is_scanned_with_the_right_counts(tmp_path):
    root = write_image_folder(tmp_path / "tiny", train_per_class=4, val_per_class=2)

    train, val = scan_image_folder(root)

    assert root == tmp_path / "tiny"
    assert train.classes == val.classes == ("ant", "bee", "cat")
    np.testing.assert_array_equal(train.labels, np.repeat([0, 1, 2], 4))
    np.testing.assert_array_equal(val.labels, np.repeat([0, 1, 2], 2))
    assert train.files[0] == root / "train" / "ant" / "ant_0000.jpg"
    with Image.open(train.files[0]) as image:
        assert image.format == "JPEG"
        assert image.size == (40, 32)


def test_write_image_folder_classes_differ_in_mean_colour(tmp_path):
    classes = ("a", "b", "c", "d")
    train, val = scan_image_folder(write_image_folder(tmp_path, classes=classes, size=(16, 12)))

    def mean_colour(record):
        return np.asarray(decode_rgb(record.data, record.path), np.float64).mean(axis=(0, 1))

    train_colours = np.array([mean_colour(train[i]) for i in range(len(train))])
    means = np.array([train_colours[train.labels == k].mean(axis=0) for k in range(len(classes))])
    distances = np.linalg.norm(means[:, None] - means[None], axis=-1)
    assert distances[~np.eye(len(classes), dtype=bool)].min() > 30

    # The nearest class mean names every validation image's class.
    for i in range(len(val)):
        nearest = np.argmin(np.linalg.norm(means - mean_colour(val[i]), axis=-1))
        assert nearest == val.labels[i]


def test_write_image_folder_is_deterministic(tmp_path):
    one = write_image_folder(tmp_path / "one", seed=3)
    two = write_image_folder(tmp_path / "two", seed=3)
    other = write_image_folder(tmp_path / "other", seed=4)
    path = Path("train", "bee", "bee_0001.jpg")
    assert (one / path).read_bytes() == (two / path).read_bytes()
    assert (one / path).read_bytes() != (other / path).read_bytes()


# Worker processes.


def test_split_record_and_transforms_pickle(tmp_path):
    write_folder(tmp_path, {"b": 2, "a": 1}, {"b": 1, "a": 1})
    (tmp_path / "train" / "a" / "notes.txt").write_text("x")
    train, _ = scan_image_folder(tmp_path, bad_images="skip")

    copy = pickle.loads(pickle.dumps(train))

    assert copy.directory == train.directory
    assert copy.classes == train.classes
    assert copy.files == train.files
    assert copy.skipped == train.skipped == (tmp_path / "train" / "a" / "notes.txt",)
    np.testing.assert_array_equal(copy.labels, train.labels)
    assert copy.labels.dtype == np.int32
    assert copy[1] == train[1]
    assert pickle.loads(pickle.dumps(train[1])) == train[1]

    transform = pickle.loads(pickle.dumps(functools.partial(train_example, size=8)))
    image, label = transform(copy[0], np.random.default_rng(0))
    assert image.shape == (8, 8, 3) and label == 0


def test_split_serves_as_a_grain_source(tmp_path):
    grain = pytest.importorskip("grain")
    train, _ = scan_image_folder(write_image_folder(tmp_path, size=(20, 16)))

    dataset = (
        grain.MapDataset.source(train)
        .seed(0)
        .random_map(functools.partial(train_example, size=8))
        .batch(4)
    )

    assert len(dataset) == 3
    images, labels = dataset[1]
    assert images.shape == (4, 8, 8, 3)
    assert images.dtype == np.float32
    np.testing.assert_array_equal(labels, [1, 1, 1, 1])
