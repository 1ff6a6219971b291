"""Seeded training streams: random access, instant seek, same data for any worker count and
process split, and the global generators left alone."""
import itertools
import random

import numpy as np
import pytest
import torch

from gbw_panoptic.data import ShuffledIndexStream, TrainStream, build_stream_loader
from gbw_panoptic.data import stream as stream_module

DATASET = [{"index": i} for i in range(7)]


class _DrawingMapper:
    """A mapper that draws from the three global generators, as augmentations do."""

    def __call__(self, dataset_dict):
        return {
            "index": dataset_dict["index"],
            "numpy": int(np.random.randint(1 << 30)),
            "torch": int(torch.randint(1 << 30, ())),
            "python": random.random(),
        }


def _batches(num_workers=0, start_step=0, steps=6, total_batch_size=3, seed=11):
    stream = TrainStream(DATASET, _DrawingMapper(), ShuffledIndexStream(len(DATASET)), total_batch_size, seed)
    stream.start_step = start_step
    return list(itertools.islice(iter(build_stream_loader(stream, num_workers)), steps))


def test_shuffled_stream_is_a_permutation_per_epoch_and_reads_from_any_position():
    indices = ShuffledIndexStream(7)
    full = list(itertools.islice(indices.indices(5, 0), 70))
    for epoch in range(10):
        assert sorted(full[7 * epoch : 7 * epoch + 7]) == list(range(7))
    assert full[:7] != full[7:14]  # a fresh order each epoch
    for start in (1, 6, 7, 8, 50):
        assert list(itertools.islice(indices.indices(5, start), 70 - start)) == full[start:]
    assert list(itertools.islice(indices.indices(6, 0), 70)) != full
    with pytest.raises(ValueError, match="empty dataset"):
        ShuffledIndexStream(0)


def test_batches_depend_only_on_seed_and_step():
    batches = _batches()
    assert [len(batch) for batch in batches] == [3] * 6
    assert _batches() == batches
    assert _batches(seed=12) != batches
    # Seeking starts at a step with exactly the data the full run had there.
    assert _batches(start_step=4, steps=2) == batches[4:]
    # Each sample's draws are its own: the same image at another position draws differently.
    samples = [sample for batch in batches for sample in batch]
    assert len({sample["numpy"] for sample in samples}) == len(samples)


@pytest.mark.slow
def test_worker_processes_give_the_same_batches_in_the_same_order():
    batches = _batches(steps=5)
    assert _batches(num_workers=2, steps=5) == batches
    assert _batches(num_workers=3, start_step=2, steps=3) == batches[2:]


def _global_draws():
    return np.random.rand(), torch.rand(()).item(), random.random()


def _seed_globals():
    np.random.seed(0)
    torch.manual_seed(0)
    random.seed(0)


def test_mapping_leaves_the_global_generators_alone():
    """What the training step draws between batches is what it would draw without the loader."""
    _seed_globals()
    expected = [_global_draws() for _ in range(3)]
    stream = TrainStream(DATASET, _DrawingMapper(), ShuffledIndexStream(len(DATASET)), 3, 11)
    _seed_globals()
    batches = iter(build_stream_loader(stream, 0))
    draws = []
    for _ in range(3):
        next(batches)
        draws.append(_global_draws())
    assert draws == expected


def test_processes_split_each_step(monkeypatch):
    """With 3 processes and a total batch of 6, process r gets samples 2r, 2r + 1 of every step."""
    single = _batches(total_batch_size=6, steps=4)
    monkeypatch.setattr(stream_module.comm, "get_world_size", lambda: 3)
    shares = []
    for rank in range(3):
        monkeypatch.setattr(stream_module.comm, "get_rank", lambda rank=rank: rank)
        shares.append(_batches(total_batch_size=6, steps=4))
    assert all(len(batch) == 2 for share in shares for batch in share)
    assert [sum((share[step] for share in shares), []) for step in range(4)] == single
    with pytest.raises(ValueError, match="total batch size of 4 cannot be split over 3 processes"):
        _batches(total_batch_size=4)
