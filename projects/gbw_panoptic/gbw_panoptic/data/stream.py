"""Training streams that are pure functions of a seed and a position: exact, instant resume.

A training loader draws an infinite sequence of samples. Here sample ``p`` (its position in the
stream, counted over all processes) is determined by the stream's seed and ``p`` alone:

- its dataset index comes from an :class:`IndexStream`, which can start at any position without
  drawing the ones before it (:class:`ShuffledIndexStream`: a fresh permutation per epoch;
  :class:`~gbw_panoptic.data.rcs.RareClassSampler`: rare class sampling);
- its augmentation (random resize, crop, flip) runs with the global generators seeded from
  ``(seed, p)`` (:func:`~gbw_panoptic.utils.rng.seeded_rng`), so neither the worker that maps it nor
  what was drawn before matters.

Step ``s`` of training takes positions ``s·T .. s·T + T − 1`` (``T`` = the total batch over all
processes); process ``r`` keeps the ``r``-th block of ``T / world_size`` of them, and data loader
worker ``w`` of ``W`` maps the steps ``s`` with ``s − start ≡ w (mod W)``, so the batches arrive in
step order. Consequences: resuming at step ``s`` starts the stream there (no replay of earlier
batches), and the data of a run do not depend on ``DATALOADER.NUM_WORKERS``.
"""
import signal
from typing import Any, Callable, Dict, Iterator, Protocol, Sequence, Tuple, Union

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from detectron2.data.build import trivial_batch_collator
from detectron2.utils import comm

from ..utils.rng import derived_seed, seeded_rng

__all__ = ["IndexStream", "ShuffledIndexStream", "TrainStream", "build_stream_loader"]

# Domains of derived_seed keys, so that index draws and augmentations never share a seed.
_AUGMENTATION, _INDICES = 0, 1


class IndexStream(Protocol):
    """An infinite sequence of dataset indices determined by a seed, readable from any position.

    An item is a dataset index, or a pair of an index and fields added to a copy of that dataset
    dict before it is mapped (rare class sampling: the class the image was drawn for).
    """

    def indices(self, seed: int, start: int) -> Iterator[Union[int, Tuple[int, Dict[str, Any]]]]:
        """The items at positions ``start, start + 1, ...`` of the stream of ``seed``."""
        ...


def index_block_seed(seed: int, block: int) -> int:
    """Seed of block ``block`` (an epoch, a chunk of draws) of the index stream of ``seed``."""
    return derived_seed(seed, _INDICES, block)


class ShuffledIndexStream:
    """Every index of a dataset of ``size`` images once per epoch, in a fresh random order each
    epoch (seeded per epoch, so any epoch is drawn directly)."""

    def __init__(self, size: int):
        if size <= 0:
            raise ValueError(f"cannot sample from an empty dataset (size {size})")
        self.size = size

    def indices(self, seed: int, start: int) -> Iterator[int]:
        epoch, offset = divmod(start, self.size)
        while True:
            generator = torch.Generator().manual_seed(index_block_seed(seed, epoch))
            yield from torch.randperm(self.size, generator=generator)[offset:].tolist()
            epoch, offset = epoch + 1, 0


class TrainStream(IterableDataset):
    """This process's share of a seeded training stream, mapped, step after step (see the module
    docstring). Iterate it through a ``DataLoader`` with ``batch_size`` = :attr:`batch_size`.

    Attributes:
        seed: the stream's seed (int in [0, 2**32)); the same on every process.
        start_step: the first training step to produce (0 from the beginning; set before iterating).
    """

    def __init__(
        self,
        dataset_dicts: Sequence[Dict[str, Any]],
        mapper: Callable[[Dict[str, Any]], Dict[str, Any]],
        index_stream: IndexStream,
        total_batch_size: int,
        seed: int,
    ):
        """
        Args:
            dataset_dicts: the dataset, in Detectron2's format.
            mapper: dataset dict -> model input dict (it must copy what it changes).
            index_stream: the dataset indices of the stream.
            total_batch_size: samples per step over all processes; a multiple of the world size.
            seed: the stream's seed.
        """
        world_size = comm.get_world_size()
        if total_batch_size <= 0 or total_batch_size % world_size:
            raise ValueError(
                f"a total batch size of {total_batch_size} cannot be split over {world_size} processes"
            )
        self.dataset_dicts = dataset_dicts
        self.mapper = mapper
        self.index_stream = index_stream
        self.total_batch_size = total_batch_size
        self.batch_size = total_batch_size // world_size
        self.rank = comm.get_rank()
        self.seed = seed
        self.start_step = 0

    def __iter__(self) -> Iterator[Dict[str, Any]]:
        worker = get_worker_info()
        worker_id, num_workers = (worker.id, worker.num_workers) if worker is not None else (0, 1)
        first = self.start_step * self.total_batch_size
        positions = self.index_stream.indices(self.seed, first)
        for position, item in enumerate(positions, start=first):
            step, offset = divmod(position, self.total_batch_size)
            if (step - self.start_step) % num_workers != worker_id or offset // self.batch_size != self.rank:
                continue
            index, fields = item if isinstance(item, tuple) else (item, None)
            record = self.dataset_dicts[index]
            if fields:
                record = {**record, **fields}
            with seeded_rng(derived_seed(self.seed, _AUGMENTATION, position)):
                sample = self.mapper(record)
            # Outside the block: the consumer runs between two samples with its own generator states.
            yield sample


def _leave_stop_signals_to_the_trainer(worker_id: int) -> None:
    """Loader workers ignore SIGINT / SIGTERM (Ctrl-C reaches the whole process group): the training
    process finishes its step, checkpoints and then stops them."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


class _StreamLoader(DataLoader):
    """A ``DataLoader`` whose workers stop as soon as one of them fails.

    The workers ignore SIGTERM (:func:`_leave_stop_signals_to_the_trainer`), so a worker still alive when
    the interpreter exits makes the exit wait for it forever (multiprocessing terminates daemonic children
    with SIGTERM, then joins them). Torch's iterator stops its workers when it is freed, but the error a
    worker raises holds the iterator in its traceback's frames until the error is gone, and an error that
    ends the program is kept to the exit (``sys.last_traceback``). So the error is raised again without
    those frames (the worker's own traceback is in its message) and the iterator freed first."""

    def __iter__(self) -> Iterator[Any]:
        iterator = super().__iter__()
        return iterator if self.num_workers == 0 else _stopping_workers_on_error(iterator)


def _stopping_workers_on_error(iterator: Iterator[Any]) -> Iterator[Any]:
    """The items of ``iterator`` (a multi-process loader iterator); on an error, the iterator is freed (its
    workers stop) before the error, without the iterator's frames, is raised."""
    while True:
        try:
            item = next(iterator)
        except StopIteration:
            return
        except Exception as error:
            error.with_traceback(None)
            del iterator
            raise error
        yield item


def build_stream_loader(stream: TrainStream, num_workers: int) -> DataLoader:
    """Infinite ``DataLoader`` of this process's batches (lists of :attr:`TrainStream.batch_size`
    mapped dicts) of ``stream``, in step order, mapped by ``num_workers`` worker processes (0: in
    this process). Creating an iterator draws nothing from torch's global generator; when a worker
    fails, the workers are stopped before its error reaches the caller (:class:`_StreamLoader`)."""
    return _StreamLoader(
        stream,
        batch_size=stream.batch_size,
        num_workers=num_workers,
        collate_fn=trivial_batch_collator,
        drop_last=True,
        generator=torch.Generator().manual_seed(stream.seed),
        worker_init_fn=_leave_stop_signals_to_the_trainer,
    )
