"""Input pipeline speed: images per second read alone, and while a ResNet-18 trains on them.

    python -m experiments.benchmarks.loader                        # a generated folder of JPEGs
    python -m experiments.benchmarks.loader --workers 1,2,4 --image-size 64
    python -m experiments.benchmarks.loader --folder ~/data/imagenet --image-size 224 \
        --arch resnet-50-imagenet --workers 4,8,16

For each number of worker processes it times (a) the pipeline alone: batches
read from an image folder, decoded, randomly cropped and flipped, standardised
and stacked (`experiments.pipeline.training_batches`), and (b) training:
the same batches fed through `DevicePrefetch` into a compiled train step,
with the seconds the step waited for input. (c) The step alone, on one batch
already on the device, is what training would reach if input were free. The
first batches of each run (worker start-up) are left out of its rate.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import jax

from experiments import pipeline
from experiments.benchmarks.train_step import compiled_step
from experiments.data import load_image_folder
from experiments.imagefolder import write_image_folder
from experiments.models import build_dense, create_members

WARMUP_BATCHES = 3


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--folder", default=None, help="an image folder (default: generate one)")
    parser.add_argument("--images", type=int, default=1536, help="images to generate")
    parser.add_argument("--source-size", default="160,120", help="generated JPEGs' width,height")
    parser.add_argument("--image-size", type=int, default=64, help="crop side")
    parser.add_argument("--workers", default="1,2,4", help="comma-separated worker counts")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--batches", type=int, default=48, help="timed batches, pipeline alone")
    parser.add_argument("--train-batches", type=int, default=6, help="timed batches, training")
    parser.add_argument("--arch", default="resnet-18-imagenet")
    return parser.parse_args(argv)


def generated_folder(directory: Path, images: int, size: tuple[int, int]) -> Path:
    classes = tuple(f"class{i:02d}" for i in range(8))
    per_class = max(1, images // len(classes))
    return write_image_folder(
        directory, classes=classes, train_per_class=per_class, val_per_class=1, size=size
    )


def time_batches(iterator, count: int) -> float:
    """Images per second over `count` batches after the warm-up ones."""
    for _ in range(WARMUP_BATCHES):
        next(iterator)
    start, images = time.perf_counter(), 0
    for _ in range(count):
        batch = next(iterator)
        images += len(batch[1])
    return images / (time.perf_counter() - start)


def pipeline_alone(batches, workers: int, count: int) -> float:
    iterator = pipeline.iterate(batches, pipeline.Loader(workers=workers))
    try:
        return time_batches(iterator, count)
    finally:
        pipeline.close(iterator, workers)


def training(batches, workers: int, count: int, step, state) -> tuple[float, float]:
    """`(images per second, fraction of the time spent waiting for input)` of training."""
    loader = pipeline.Loader(workers=workers)
    iterator = pipeline.iterate(batches, loader)
    prefetch = pipeline.DevicePrefetch(iterator, jax.device_put, loader.prefetch, workers)
    try:
        for _ in range(WARMUP_BATCHES):
            (images, labels), _ = next(prefetch)
            state, metrics = step(state, images, labels)
        jax.block_until_ready(metrics)
        waited, start, seen = prefetch.waited, time.perf_counter(), 0
        for _ in range(count):
            (images, labels), _ = next(prefetch)
            state, metrics = step(state, images, labels)
            seen += len(labels)
        jax.block_until_ready(metrics)
        seconds = time.perf_counter() - start
        return seen / seconds, (prefetch.waited - waited) / seconds
    finally:
        prefetch.close()


def step_alone(step, state, batch, count: int) -> float:
    state, metrics = step(state, *batch)
    jax.block_until_ready(metrics)
    start = time.perf_counter()
    for _ in range(count):
        state, metrics = step(state, *batch)
    jax.block_until_ready(metrics)
    return count * len(batch[1]) / (time.perf_counter() - start)


def run(args: argparse.Namespace, folder: Path, log=print) -> list[str]:
    dataset = load_image_folder(folder, image_size=args.image_size)
    split = dataset.split("train", augment=True)
    most = WARMUP_BATCHES + max(args.batches, args.train_batches)
    epochs = 1 + most * args.batch_size // (len(split) // args.batch_size * args.batch_size)
    batches = pipeline.training_batches(split, args.batch_size, epochs, seed=0)
    modules = create_members([args.arch], num_classes=dataset.num_classes, in_channels=3, seed=0)
    model = build_dense(modules)
    shape = dataset.image_shape
    step, state, batch, _, _ = compiled_step(model, args.batch_size, shape, dataset.num_classes)
    alone = step_alone(step, state, batch, args.train_batches)
    lines = [
        f"{dataset.train_size:,} images in {folder}, {args.image_size}x{args.image_size} crops, "
        f"batch {args.batch_size}, {args.arch}, {jax.device_count()} "
        f"{jax.default_backend()} device(s)",
        f"train step alone (input free): {alone:,.0f} images/s",
        "",
        "| workers | pipeline alone (images/s) | training (images/s) | waiting for input |",
        "| ---: | ---: | ---: | ---: |",
    ]
    for line in lines:
        log(line)
    for workers in (int(w) for w in args.workers.split(",")):
        read = pipeline_alone(batches, workers, args.batches)
        trained, waiting = training(batches, workers, args.train_batches, step, state)
        lines.append(f"| {workers} | {read:,.0f} | {trained:,.0f} | {waiting:.0%} |")
        log(lines[-1])
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory() as scratch:
        if args.folder:
            folder = Path(args.folder).expanduser()
        else:
            size = tuple(int(x) for x in args.source_size.split(","))
            folder = generated_folder(Path(scratch) / "images", args.images, size)
        run(args, folder, log=lambda line: print(line, flush=True))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
