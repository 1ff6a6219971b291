"""Shared pytest fixtures and settings."""
import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]

# Keep tests deterministic and light on the 2-core CI machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def synthetic_datasets(tmp_path_factory) -> Path:
    """Root of a small synthetic benchmark (16 source, 4 source val, 8 target train, 6 target val
    images of 128x256), generated and prepared with the real converters; ``register_all(root)`` already called.

    Each pytest worker builds its own copy.
    """
    from gbw_panoptic.data.datasets import register_all
    from gbw_panoptic.data.prepare.synthetic import prepare_synthetic

    root = tmp_path_factory.mktemp("datasets")
    reports = prepare_synthetic(
        str(root / "synthetic"), seed=0, num_source=16, num_target_train=8, num_target_val=6, height=128, width=256,
        num_source_val=4,
    )
    failures = [(name, report.failures) for name, report in reports if report.failures]
    assert not failures, failures
    register_all(str(root))
    return root
