"""The input pipeline on grain: every data set, in memory or an image folder, read one way.

A split is a random-access source of records and the transform that makes an
example `(image [h, w, c] float32, label int32)` of each (`Split`). Training
reads all epochs as one grain `MapDataset` of batches:

    epoch e:  records shuffled by grain with a seed of (seed, e), the last
              len % batch_size left out; `transform(record, rng)` with an rng
              of (seed, position in the run), so augmentation is reproducible
    batches:  global batch g is cut into one contiguous piece per process;
              each process reads only its own pieces (`[p::P]`)

and iterates it with threads, or worker processes (`Loader.workers`), a few
batches ahead; `DevicePrefetch` keeps `Loader.prefetch` batches on the devices
ahead of the step. Each batch comes with the grain iterator's state after it,
which the checkpoint keeps, so a run resumes on the very next batch.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import gc
import os
import time
from collections.abc import Callable

import grain
import numpy as np

from experiments import distributed
from experiments.data import Records, Split
from experiments.imagefolder import DataError


@dataclasses.dataclass(frozen=True)
class Loader:
    """How batches are read.

    Attributes:
      workers: worker processes that read and transform batches (0: threads of
        this process, the right choice for data held in memory).
      threads: threads reading batches in this process, or in each worker.
      prefetch: batches kept on the devices ahead of the step (2: double buffering).
    """

    workers: int = 0
    threads: int = 2
    prefetch: int = 2


def epoch_seed(seed: int, epoch: int) -> int:
    """The shuffle seed of `epoch`, a 32-bit integer of `(seed, epoch)`."""
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


def local_batch_size(batch_size: int, processes: int) -> int:
    if batch_size % processes:
        raise ValueError(
            f"the batch size {batch_size} does not divide over {processes} processes; use a "
            f"multiple of {processes}"
        )
    return batch_size // processes


@dataclasses.dataclass(frozen=True)
class Unreadable:
    """What a worker hands back for a record it could not read: the reason, naming the file
    (raised as `DataError` in the training process, not as a worker's traceback)."""

    message: str


def _example(split: Split, record):
    try:
        return record if split.transform is None else split.transform(record)
    except DataError as error:
        return Unreadable(str(error))


def _random_example(split: Split, record, rng: np.random.Generator):
    try:
        return split.transform(record, rng)
    except DataError as error:
        return Unreadable(str(error))


def _labelled(example):
    if isinstance(example, Unreadable):
        return example
    image, label = example
    return np.asarray(image, np.float32), np.asarray(label, np.int32)


def _stack(examples: list):
    """`(images [n, ...], labels [n])`, or the first `Unreadable` among `examples`."""
    for example in examples:
        if isinstance(example, Unreadable):
            return example
    images, labels = zip(*examples, strict=True)
    return np.stack(images), np.stack(labels)


def checked(batch):
    """`batch` as plain numpy arrays, unless a record of it could not be read: then
    `DataError` naming it. (A worker's batch arrives in shared memory, which is released
    once nothing refers to it; a device array on the CPU could keep referring to it.)"""
    if isinstance(batch, Unreadable):
        raise DataError(batch.message)
    return tuple(np.array(part) for part in batch)


def training_batches(
    split: Split,
    batch_size: int,
    epochs: int,
    seed: int,
    *,
    process: int = 0,
    processes: int = 1,
) -> grain.MapDataset:
    """This process's batches of `epochs` epochs: epoch e (1-based) holds the
    `len(split) // batch_size` batches from `(e - 1) * steps` on, each
    `(images [batch_size / processes, h, w, c], labels [batch_size / processes])`."""
    local = local_batch_size(batch_size, processes)
    steps = len(split) // batch_size
    if steps == 0:
        raise ValueError(f"batch size {batch_size} exceeds the {len(split)} training examples")
    source = grain.MapDataset.source(split.records)
    kept = slice(steps * batch_size)  # each epoch leaves out the remainder
    epochs_of_records = grain.MapDataset.concatenate(
        [source.shuffle(seed=epoch_seed(seed, e)).slice(kept) for e in range(1, epochs + 1)]
    )
    if split.random:
        transform = functools.partial(_random_example, split)
        examples = epochs_of_records.random_map(transform, seed=epoch_seed(seed, 0))
    else:
        examples = epochs_of_records.map(functools.partial(_example, split))
    batches = examples.map(_labelled).batch(local, batch_fn=_stack)
    return batches.slice(slice(process, None, processes))


class _Padded:
    """`records` followed by copies of the last record, up to `size` (evaluation batches)."""

    def __init__(self, records: Records, size: int):
        self.records, self.size = records, size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int):
        return self.records[min(int(index), len(self.records) - 1)]


def evaluation_batches(
    split: Split, batch_size: int, *, process: int = 0, processes: int = 1
) -> grain.MapDataset:
    """This process's pieces of the split in order, in batches of `batch_size`, the last
    one padded with copies of the last example (drop them after: `len(split)` are real)."""
    local = local_batch_size(batch_size, processes)
    padded = -(-len(split) // batch_size) * batch_size
    examples = grain.MapDataset.source(_Padded(split.records, padded))
    examples = examples.map(functools.partial(_example, split)).map(_labelled)
    return examples.batch(local, batch_fn=_stack).slice(slice(process, None, processes))


def sample_batches(split: Split, batch_size: int, count: int, seed: int) -> list[tuple]:
    """The first `count` batches of the split shuffled with `seed`, whole on every
    process (the search's gradient batches); the last may be smaller."""
    examples = grain.MapDataset.source(split.records).shuffle(seed=epoch_seed(seed, 0))
    examples = examples.map(functools.partial(_example, split)).map(_labelled)
    batches = examples.batch(batch_size, batch_fn=_stack)
    return [checked(batches[i]) for i in range(min(count, len(batches)))]


def _allow_unparsed_flags() -> None:
    """grain's worker processes read absl flags, which a program without `absl.app` never
    parses; their defaults are what is meant."""
    from absl import flags

    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()


def iterate(dataset: grain.MapDataset, loader: Loader, state: dict | None = None):
    """A grain iterator over `dataset`, set to `state` (a `get_state()` of an earlier one)."""
    read = grain.ReadOptions(num_threads=max(1, loader.threads), prefetch_buffer_size=2)
    stream = dataset.to_iter_dataset(read)
    if loader.workers:
        _allow_unparsed_flags()
        workers = min(loader.workers, len(dataset)) or 1
        stream = stream.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    iterator = iter(stream)
    if state is not None:
        iterator.set_state(state)
    return iterator


def close(iterator, workers: int = 0) -> None:
    """Stops an iterator's threads and worker processes now, not at interpreter exit.

    `workers` is the number of worker processes it was made with (`Loader.workers`). With
    any, a full garbage collection frees the shared memory of the batches they made (held in
    reference cycles, which only the collector breaks). Without, none is made: in a large
    process it costs a fraction of a second, at every evaluation.
    """
    closer = getattr(iterator, "close", None)
    if closer is not None:
        closer()
        if workers:
            gc.collect()


class DevicePrefetch:
    """Batches of a grain iterator put on the devices `size` ahead of their use.

    Yields `(device batch, iterator state after it)`; `waited` sums the
    seconds `next` spent waiting for the host, the time a step stood idle.
    """

    def __init__(self, iterator, put: Callable, size: int = 2, workers: int = 0):
        self.iterator, self.put, self.size = iterator, put, max(1, size)
        self.workers = workers  # the iterator's worker processes, for `close`
        self.queue: collections.deque = collections.deque()
        self.waited = 0.0

    def _fill(self) -> None:
        while len(self.queue) < self.size:
            try:
                host = next(self.iterator)
            except StopIteration:
                return
            self.queue.append((self.put(checked(host)), self.iterator.get_state()))

    def __iter__(self):
        return self

    def __next__(self):
        start = time.perf_counter()
        self._fill()
        self.waited += time.perf_counter() - start
        if not self.queue:
            raise StopIteration
        return self.queue.popleft()

    def close(self) -> None:
        self.queue.clear()
        close(self.iterator, self.workers)


def device_put(mesh) -> Callable:
    """`put(local batch) -> global batch` on `mesh`'s data axis, from this process's piece."""
    return functools.partial(distributed.shard_local_batch, mesh=mesh)


def default_workers(in_memory: bool) -> int:
    """Worker processes when not told: none for data in memory, else up to 8 of the CPUs."""
    return 0 if in_memory else max(1, min(8, (os.cpu_count() or 2) - 1))
