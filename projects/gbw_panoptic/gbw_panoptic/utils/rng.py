"""States of the random generators of a process: saved, restored, and seeded for one block.

Detectron2's augmentations draw from NumPy's global generator, PyTorch ops from torch's, some
libraries from Python's ``random``: these helpers handle the three together (and CUDA's, where
asked).
"""
import contextlib
import random
from typing import Any, Dict, Iterator

import numpy as np
import torch

__all__ = ["get_rng_state", "set_rng_state", "preserved_rng_state", "seeded_rng", "derived_seed"]


def get_rng_state(cuda: bool = True) -> Dict[str, Any]:
    """The states of Python's, NumPy's, torch's CPU and (with ``cuda``, if present) CUDA generators of
    this process, as tensors and plain Python values (loadable by ``torch.load(weights_only=True)``)."""
    name, keys, position, has_gauss, cached_gaussian = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached_gaussian),
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if cuda and torch.cuda.is_available() else [],
    }


def set_rng_state(state: Dict[str, Any]) -> None:
    """Restore the generator states returned by :func:`get_rng_state`."""
    random.setstate(state["python"])
    name, keys, position, has_gauss, cached_gaussian = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), position, has_gauss, cached_gaussian))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def preserved_rng_state(cuda: bool = True) -> Iterator[None]:
    """Run a block (e.g. an evaluation) without changing any generator state of this process."""
    state = get_rng_state(cuda)
    try:
        yield
    finally:
        set_rng_state(state)


def derived_seed(*keys: int) -> int:
    """A seed in [0, 2**32) determined by the non-negative integers ``keys`` (NumPy's
    ``SeedSequence``: well-mixed, so neighbouring keys give unrelated streams)."""
    return int(np.random.SeedSequence(list(keys)).generate_state(1)[0])


@contextlib.contextmanager
def seeded_rng(seed: int) -> Iterator[None]:
    """Run a block with Python's, NumPy's and torch's CPU generators seeded with ``seed`` (in
    [0, 2**32)), then put their previous states back: what the block draws depends on ``seed``
    alone, and the code around it draws as if the block had not run. CUDA generators are left
    alone (safe in data loader worker processes)."""
    with preserved_rng_state(cuda=False):
        random.seed(seed)
        np.random.seed(seed)
        torch.manual_seed(seed)
        yield
