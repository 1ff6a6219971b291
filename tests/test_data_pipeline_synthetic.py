"""The data pipeline on the prepared synthetic benchmark (``synthetic_datasets`` fixture)."""
import itertools
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from panopticapi.utils import rgb2id
from PIL import Image

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.projects.panoptic_deeplab.target_generator import PanopticDeepLabTargetGenerator

from gbw_panoptic.config import add_gbw_panoptic_config
from gbw_panoptic.data import (
    PanopticTargetGenerator,
    build_rcs_sampler,
    rcs_class_probabilities,
    build_test_loader,
    build_uda_train_loader,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from bench_panoptic_targets import from_detectron2_layout  # noqa: E402

SOURCE, TARGET, VAL = (
    "synthetic_source_panoptic_train",
    "synthetic_target_panoptic_train",
    "synthetic_target_panoptic_val",
)
INSTANCE_KEYS = ("center", "center_weights", "offset", "offset_weights")


@pytest.fixture
def cfg(synthetic_datasets):
    cfg = get_cfg()
    add_gbw_panoptic_config(cfg)
    cfg.DATASETS.TRAIN = (SOURCE,)
    cfg.DATASETS.TARGET_TRAIN = (TARGET,)
    cfg.DATASETS.TEST = (VAL,)
    cfg.INPUT.BASE_SIZE = [128, 256]
    cfg.INPUT.RESIZE_RATIO_RANGE = [0.75, 1.25]
    cfg.INPUT.CROP.SIZE = [96, 128]
    cfg.INPUT.GAUSSIAN_SIGMA = 4
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.DATALOADER.RCS.MIN_PIXELS = 50
    cfg.SOLVER.IMS_PER_BATCH = 2
    cfg.DATASETS.TARGET_IMS_PER_BATCH = 2
    return cfg


def test_uda_loader_on_synthetic_benchmark(cfg):
    steps = list(itertools.islice(iter(build_uda_train_loader(cfg)), 3))
    for source_batch, target_batch in steps:
        assert len(source_batch) == 2 and len(target_batch) == 2
        for record in source_batch:
            height, width = record["image"].shape[1:]
            assert record["image"].dtype == torch.uint8 and (height, width) == (96, 128)
            assert record["sem_seg"].shape == (height, width) and record["sem_seg"].dtype == torch.int64
            labels = record["sem_seg"].unique()
            assert ((labels < 19) | (labels == 255)).all()
            assert record["center"].shape == (1, height, width)
            assert record["offset"].shape == (2, height, width)
            assert record["center_weights"].shape == record["offset_weights"].shape == (height, width)
        for record in target_batch:
            assert record["image"].shape == (3, 96, 128)
            assert not {"sem_seg", *INSTANCE_KEYS} & set(record)


def test_target_generator_equals_detectron2_on_prepared_labels(synthetic_datasets):
    meta = MetadataCatalog.get(SOURCE)
    thing_ids = list(meta.thing_dataset_id_to_contiguous_id.values())
    options = {"ignore_label": meta.ignore_label, "thing_ids": thing_ids, "sigma": 4, "ignore_stuff_in_offset": True}
    ours, reference = PanopticTargetGenerator(**options), PanopticDeepLabTargetGenerator(**options)
    for record in DatasetCatalog.get(SOURCE)[:4]:
        panoptic = rgb2id(np.asarray(Image.open(record["pan_seg_file_name"]).convert("RGB")))
        expected = reference(panoptic, record["segments_info"])
        got = ours(panoptic, record["segments_info"])
        assert all(torch.equal(got[k], v) for k, v in from_detectron2_layout(expected).items())
        # The semantic labels derived from the panoptic PNG match the prepared train-id PNG.
        assert np.array_equal(got["sem_seg"].numpy(), np.asarray(Image.open(record["sem_seg_file_name"])))


def test_rcs_uses_the_prepared_class_statistics(cfg):
    """The sampler's classes, probabilities and image lists follow the label PNGs and the formula."""
    dicts = DatasetCatalog.get(SOURCE)
    counts = np.stack(
        [np.bincount(np.asarray(Image.open(d["sem_seg_file_name"])).ravel(), minlength=256)[:19] for d in dicts]
    )
    sampler = build_rcs_sampler(cfg, cfg.DATASETS.TRAIN)
    expected = rcs_class_probabilities(counts.sum(axis=0), cfg.DATALOADER.RCS.TEMPERATURE)
    assert sampler.classes.tolist() == np.flatnonzero(expected).tolist()
    np.testing.assert_allclose(sampler.class_probabilities, expected[sampler.classes], rtol=1e-12)
    for c, images in zip(sampler.classes, sampler.images_of_class):
        qualifying = np.flatnonzero(counts[:, c] > cfg.DATALOADER.RCS.MIN_PIXELS)
        assert images.tolist() == (qualifying if len(qualifying) else np.flatnonzero(counts[:, c])).tolist()
    # The most probable class is drawn at least as often as uniform image sampling would.
    rarest = int(sampler.classes[np.argmax(sampler.class_probabilities)])
    items = list(itertools.islice(sampler.indices(0, 0), 2000))
    # Each index travels with its class (for the mapper's crop, DATALOADER.RCS.MIN_CROP_RATIO > 0).
    assert all(counts[index, fields["rcs_class"]] > 0 for index, fields in items)
    draws = np.array([index for index, _ in items])
    has_rarest = counts[:, rarest] > 0
    assert has_rarest[draws].mean() >= has_rarest.mean()


def test_test_loader_on_synthetic_val(cfg):
    names = []
    for batch in build_test_loader(cfg, VAL):
        (record,) = batch
        assert record["image"].shape == (3, record["height"], record["width"])
        names.append(record["file_name"])
    assert sorted(names) == sorted(d["file_name"] for d in DatasetCatalog.get(VAL))
