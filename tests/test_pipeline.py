"""The grain input pipeline: epochs, shuffling, per-process pieces, padding, resume, prefetch."""

import subprocess
import sys
import tempfile
from pathlib import Path

import jax
import numpy as np
import pytest
from conftest import subprocess_env

from experiments import pipeline
from experiments.data import ArrayRecords, Split
from experiments.pipeline import (
    DevicePrefetch,
    Loader,
    evaluation_batches,
    iterate,
    sample_batches,
    training_batches,
)


def numbered(count: int) -> Split:
    """Records whose image is `[[[i, i]]]` and label `i`: where each one went is visible."""
    images = np.repeat(np.arange(count, dtype=np.float32), 2).reshape(count, 1, 1, 2)
    return Split(ArrayRecords(images, np.arange(count, dtype=np.int32)))


def labels_of(dataset) -> list[np.ndarray]:
    return [dataset[i][1] for i in range(len(dataset))]


def jitter(record, rng):
    """A random transform: adds a draw in [0, 1) to the image, keeps the label."""
    image, label = record
    return image + rng.random(), label


# --- training batches -----------------------------------------------------------------------


def test_each_epoch_is_a_shuffle_of_distinct_examples_leaving_the_remainder_out():
    # 23 examples in batches of 5: 4 steps an epoch, 20 examples, 3 left out (23 - 4 * 5)
    batches = training_batches(numbered(23), batch_size=5, epochs=3, seed=0)
    assert len(batches) == 3 * 4
    epochs = [np.concatenate(labels_of(batches)[4 * e : 4 * e + 4]) for e in range(3)]
    for seen in epochs:
        assert len(seen) == 20 and len(set(seen.tolist())) == 20
        assert set(seen.tolist()) <= set(range(23))
        assert not np.array_equal(seen, np.arange(20))  # shuffled
    assert not np.array_equal(epochs[0], epochs[1])  # a new order every epoch
    images, labels = batches[0]
    assert images.shape == (5, 1, 1, 2) and images.dtype == np.float32
    assert labels.dtype == np.int32
    np.testing.assert_array_equal(images[:, 0, 0, 0], labels)  # rows stay together


def test_the_order_is_the_seeds_and_only_the_seeds():
    def order(seed):
        return np.concatenate(labels_of(training_batches(numbered(40), 8, 2, seed)))

    np.testing.assert_array_equal(order(3), order(3))
    assert not np.array_equal(order(3), order(4))


def test_each_process_reads_its_contiguous_piece_of_every_global_batch():
    split = Split(numbered(30).records, jitter, random=True)
    whole = training_batches(split, batch_size=6, epochs=2, seed=1)
    pieces = [training_batches(split, 6, 2, 1, process=p, processes=3) for p in range(3)]
    assert [len(p) for p in pieces] == [len(whole)] * 3
    for g in range(len(whole)):
        images = np.concatenate([pieces[p][g][0] for p in range(3)])
        labels = np.concatenate([pieces[p][g][1] for p in range(3)])
        assert pieces[0][g][0].shape[0] == 2  # 6 / 3 processes
        np.testing.assert_array_equal(labels, whole[g][1])
        np.testing.assert_array_equal(images, whole[g][0])  # the same augmentation draws


def test_a_random_transform_draws_anew_each_epoch_and_the_same_on_a_rerun():
    split = Split(numbered(8).records, jitter, random=True)
    batches = training_batches(split, batch_size=8, epochs=2, seed=0)
    again = training_batches(split, batch_size=8, epochs=2, seed=0)
    for epoch in range(2):
        images, labels = batches[epoch]
        noise = images[:, 0, 0, 0] - labels
        assert np.all((noise >= 0) & (noise < 1))
        np.testing.assert_array_equal(images, again[epoch][0])
    first = dict(zip(batches[0][1], batches[0][0][:, 0, 0, 0] - batches[0][1], strict=True))
    second = dict(zip(batches[1][1], batches[1][0][:, 0, 0, 0] - batches[1][1], strict=True))
    assert any(first[k] != second[k] for k in first)


def test_a_batch_larger_than_the_split_or_not_divisible_by_the_processes_is_refused():
    with pytest.raises(ValueError, match="exceeds the 4 training examples"):
        training_batches(numbered(4), batch_size=5, epochs=1, seed=0)
    with pytest.raises(ValueError, match="does not divide over 4 processes"):
        training_batches(numbered(40), batch_size=6, epochs=1, seed=0, processes=4)


# --- evaluation and sample batches ----------------------------------------------------------


@pytest.mark.parametrize("count, batch_size", [(10, 4), (8, 4), (3, 5)])
def test_evaluation_keeps_the_order_and_pads_with_the_last_example(count, batch_size):
    batches = evaluation_batches(numbered(count), batch_size)
    labels = np.concatenate(labels_of(batches))
    padded = -(-count // batch_size) * batch_size  # whole batches
    expected = np.minimum(np.arange(padded), count - 1)
    np.testing.assert_array_equal(labels, expected)


def test_evaluation_pieces_join_into_the_whole_batches():
    whole = evaluation_batches(numbered(11), 4)
    pieces = [evaluation_batches(numbered(11), 4, process=p, processes=2) for p in range(2)]
    for g in range(len(whole)):
        joined = np.concatenate([pieces[0][g][1], pieces[1][g][1]])
        np.testing.assert_array_equal(joined, whole[g][1])


def test_sample_batches_are_the_first_of_a_seeded_shuffle():
    sample = sample_batches(numbered(23), batch_size=5, count=10, seed=2)
    assert [len(labels) for _, labels in sample] == [5, 5, 5, 5, 3]  # 23 in all, no more
    seen = np.concatenate([labels for _, labels in sample])
    assert sorted(seen.tolist()) == list(range(23))
    again = sample_batches(numbered(23), batch_size=5, count=2, seed=2)
    np.testing.assert_array_equal(np.concatenate([b[1] for b in again]), seen[:10])
    other = sample_batches(numbered(23), batch_size=5, count=2, seed=3)
    assert not np.array_equal(np.concatenate([b[1] for b in other]), seen[:10])


# --- iterating, resuming, prefetching -------------------------------------------------------


@pytest.mark.parametrize("workers", [0, 2], ids=["threads", "two-workers"])
def test_an_iterator_set_to_a_saved_state_goes_on_with_the_very_next_batch(workers):
    split = Split(numbered(30).records, jitter, random=True)
    batches = training_batches(split, batch_size=4, epochs=2, seed=5)
    loader = Loader(workers=workers)
    first = iterate(batches, loader)
    try:
        for _ in range(5):
            next(first)
        state = first.get_state()
        rest = [labels for _, labels in first]
    finally:
        pipeline.close(first, workers)
    assert len(rest) == len(batches) - 5
    again = iterate(batches, loader, state)
    try:
        resumed = [labels for _, labels in again]
    finally:
        pipeline.close(again, workers)
    for a, b, expected in zip(rest, resumed, labels_of(batches)[5:], strict=True):
        np.testing.assert_array_equal(a, expected)
        np.testing.assert_array_equal(b, expected)


LEAK_CHECK = """
import numpy as np
from grain._src.python.ipc.shared_memory_array import SharedMemoryArray

from experiments import pipeline
from experiments.data import ArrayRecords, Split


def main():
    images = np.zeros((32, 16, 16, 3), np.float32)
    split = Split(ArrayRecords(images, np.arange(32, dtype=np.int32)))
    batches = pipeline.training_batches(split, batch_size=8, epochs=1, seed=0)
    iterator = pipeline.iterate(batches, pipeline.Loader(workers=1))
    for _ in range(4):
        next(iterator)
    pipeline.close(iterator, workers=1)
    # grain unlinks a freed batch's shared memory on a thread of its own: wait for that
    # thread's queue, which an exit right after could cut short (the warning would be
    # the thread's lateness, not a batch left behind)
    deleting = SharedMemoryArray._del_thread_pool
    deleting.close()
    deleting.join()
    print("closed")


if __name__ == "__main__":  # the worker process imports this file
    main()
"""


def test_closing_an_iterator_frees_the_shared_memory_of_its_workers_batches(tmp_path):
    script = tmp_path / "leak_check.py"
    script.write_text(LEAK_CHECK)
    done = subprocess.run(
        [sys.executable, str(script)],
        cwd=Path(__file__).resolve().parents[1],
        env=subprocess_env(),
        capture_output=True,
        text=True,
        timeout=300,  # catches a hang only
    )
    assert done.returncode == 0 and done.stdout.strip() == "closed", done.stderr
    # at exit, Python's resource tracker warns of every shared memory block left behind
    assert "leaked shared_memory" not in done.stderr, done.stderr


def test_device_prefetch_keeps_the_order_and_gives_the_state_after_each_batch():
    batches = training_batches(numbered(20), batch_size=4, epochs=1, seed=0)
    iterator = iterate(batches, Loader())
    put_count = []

    def put(batch):
        put_count.append(1)
        return jax.device_put(batch)

    prefetch = DevicePrefetch(iterator, put, size=2)
    (images, labels), state = next(prefetch)
    assert len(put_count) == 2  # the next batch is already on the device
    np.testing.assert_array_equal(np.asarray(labels), batches[0][1])
    seen = [np.asarray(labels)]
    states = [state]
    for (_, labels), state in prefetch:
        seen.append(np.asarray(labels))
        states.append(state)
    prefetch.close()
    for got, expected in zip(seen, labels_of(batches), strict=True):
        np.testing.assert_array_equal(got, expected)
    # the state after batch k resumes on batch k + 1
    resumed = iterate(batches, Loader(), states[1])
    np.testing.assert_array_equal(next(resumed)[1], batches[2][1])
    pipeline.close(resumed)
    assert prefetch.waited >= 0.0


def test_default_workers_read_memory_in_process_and_folders_in_workers():
    assert pipeline.default_workers(in_memory=True) == 0
    assert pipeline.default_workers(in_memory=False) >= 1


def test_the_loader_benchmark_prints_a_row_per_worker_count():
    from experiments.benchmarks import loader

    lines = []
    args = loader.parse_args(
        ["--images", "64", "--source-size", "24,20", "--image-size", "16", "--workers", "0,1"]
        + ["--batch-size", "8", "--batches", "4", "--train-batches", "1", "--arch", "wrn-10-1"]
    )
    with tempfile.TemporaryDirectory() as scratch:
        folder = loader.generated_folder(Path(scratch), args.images, (24, 20))
        loader.run(args, folder, log=lines.append)
    assert lines[0].startswith("64 images in ") and "16x16 crops, batch 8, wrn-10-1" in lines[0]
    rows = [line.split("|")[1:-1] for line in lines if line.startswith(("| 0", "| 1"))]
    assert [int(row[0]) for row in rows] == [0, 1]
    for row in rows:
        read, trained = (float(cell.replace(",", "")) for cell in row[1:3])
        assert read > 0 and trained > 0 and row[3].strip().endswith("%")
