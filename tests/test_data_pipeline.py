"""Data pipeline: panoptic targets, the dataset mapper and its augmentations, the UDA loader.

The tests build a tiny panoptic dataset of their own (image, train-id PNG, COCO-panoptic PNG and
class statistics), in which every class has its own image colour, so that label/image alignment
after augmentation can be checked pixel by pixel.
"""
import itertools
import sys
import json
from pathlib import Path
from typing import Any, Dict, List

import numpy as np
import pytest
import torch
from PIL import Image
from panopticapi.utils import id2rgb

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data import transforms as T
from detectron2.projects.panoptic_deeplab.target_generator import PanopticDeepLabTargetGenerator

from gbw_panoptic.config import add_gbw_panoptic_config
from gbw_panoptic.data import (
    GBWPanopticDatasetMapper,
    PanopticTargetGenerator,
    build_augmentations,
    build_test_loader,
    build_uda_train_loader,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from bench_panoptic_targets import from_detectron2_layout  # noqa: E402

NUM_CLASSES = 19
THING_TRAIN_IDS = list(range(11, 19))
# Cityscapes label id of each train id.
LABEL_IDS = [7, 8, 11, 12, 13, 17, 19, 20, 21, 22, 23, 24, 25, 26, 27, 28, 31, 32, 33]
INSTANCE_KEYS = ("center", "center_weights", "offset", "offset_weights")
# Image colour of each train id (distinct, far apart); unlabelled pixels are black.
PALETTE = np.array(
    [[40 + 200 * ((c >> b) & 1) for b in range(3)] for c in range(1, 8)]
    + [[120 + 100 * ((c >> b) & 1) for b in range(3)] for c in range(1, 8)]
    + [[(60 * c) % 256, 255 - 40 * c, 90] for c in range(5)],
    dtype=np.uint8,
)[:NUM_CLASSES]


def random_scene(rng: np.random.Generator, height: int, width: int, num_things: int):
    """A panoptic id map with sky/road/building stuff, thing boxes, a crowd box and a void box.

    Returns:
        (panoptic ids HxW int32, segments_info with contiguous category ids)
    """
    panoptic = np.zeros((height, width), dtype=np.int32)
    segments = []

    def add(segment_id: int, train_id: int, box, iscrowd: int = 0) -> None:
        y0, x0, y1, x1 = box
        panoptic[y0:y1, x0:x1] = segment_id
        segments.append({"id": segment_id, "category_id": train_id, "iscrowd": iscrowd, "isthing": train_id >= 11})

    add(LABEL_IDS[10], 10, (0, 0, height // 3, width))  # sky
    add(LABEL_IDS[2], 2, (height // 3, 0, height // 2, width * 2 // 3))  # building, left only
    add(LABEL_IDS[0], 0, (height // 2, 0, height, width))  # road
    for k in range(num_things):
        train_id = int(rng.choice([11, 13, 18]))
        h, w = rng.integers(4, max(5, height // 3), size=2)
        y0, x0 = int(rng.integers(0, height - h)), int(rng.integers(0, width - w))
        add(LABEL_IDS[train_id] * 1000 + k, train_id, (y0, x0, y0 + h, x0 + w))
    add(LABEL_IDS[13], 13, (height - 6, 0, height, width // 4), iscrowd=1)  # crowd of cars
    panoptic[: height // 6, width - width // 5 :] = 0  # void
    return panoptic, segments


def write_dataset(root: Path, name: str, num_images: int, height: int, width: int, seed: int) -> List[Dict[str, Any]]:
    """Write a small panoptic dataset under ``root`` and register it as ``name``."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    dicts, stats = [], {}
    for index in range(num_images):
        panoptic, segments = random_scene(rng, height, width, num_things=int(rng.integers(2, 6)))
        present = [s for s in segments if (panoptic == s["id"]).any()]
        train_ids = np.full((height, width), 255, dtype=np.uint8)
        for s in present:
            train_ids[panoptic == s["id"]] = s["category_id"]
        image = np.where((train_ids == 255)[..., None], 0, PALETTE[np.minimum(train_ids, NUM_CLASSES - 1)])
        image_id = f"{name}_{index:03d}"
        paths = {key: str(root / f"{image_id}_{key}.png") for key in ("image", "trainIds", "panoptic")}
        Image.fromarray(image.astype(np.uint8)).save(paths["image"])
        Image.fromarray(train_ids).save(paths["trainIds"])
        Image.fromarray(id2rgb(panoptic)).save(paths["panoptic"])
        stats[image_id] = np.bincount(train_ids.ravel(), minlength=256)[:NUM_CLASSES].tolist()
        dicts.append(
            {
                "file_name": paths["image"],
                "image_id": image_id,
                "height": height,
                "width": width,
                "pan_seg_file_name": paths["panoptic"],
                "sem_seg_file_name": paths["trainIds"],
                "segments_info": present,
                "has_instances": index % 4 != 3,
            }
        )
    stats_file = root / "class_stats.json"
    stats_file.write_text(json.dumps({"classes": [str(c) for c in range(NUM_CLASSES)], "images": stats}))
    if name in DatasetCatalog.list():
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, lambda: [dict(d) for d in dicts])
    MetadataCatalog.get(name).set(
        thing_dataset_id_to_contiguous_id={LABEL_IDS[t]: t for t in THING_TRAIN_IDS},
        ignore_label=255,
        label_divisor=1000,
        class_stats_file=str(stats_file),
    )
    return dicts


@pytest.fixture(scope="module")
def tiny_datasets(tmp_path_factory) -> Dict[str, List[Dict[str, Any]]]:
    root = tmp_path_factory.mktemp("tiny_panoptic")
    return {
        "tiny_source": write_dataset(root / "source", "tiny_source", 8, 48, 96, seed=0),
        "tiny_target": write_dataset(root / "target", "tiny_target", 5, 48, 96, seed=1),
    }


def make_cfg(**input_overrides):
    cfg = get_cfg()
    add_gbw_panoptic_config(cfg)
    cfg.DATASETS.TRAIN = ("tiny_source",)
    cfg.DATASETS.TARGET_TRAIN = ("tiny_target",)
    cfg.DATASETS.TEST = ("tiny_target",)
    cfg.INPUT.BASE_SIZE = [48, 96]
    cfg.INPUT.CROP.SIZE = [32, 48]
    cfg.DATALOADER.NUM_WORKERS = 0
    cfg.DATALOADER.RCS.MIN_PIXELS = 20
    # Detectron2's recipe: crowd keeps its class in sem_seg (as in the train-id PNGs the alignment
    # checks compare with).
    cfg.INPUT.IGNORE_CROWD_IN_SEMANTIC = False
    for key, value in input_overrides.items():
        cfg.merge_from_list([key, value])
    return cfg


# --------------------------------------------------------------------------------------------
# Target generator
# --------------------------------------------------------------------------------------------


def assert_same_targets(ours: Dict[str, torch.Tensor], reference: Dict[str, Any]) -> None:
    """Equal keys, dtypes, shapes and values, in our layout."""
    expected = from_detectron2_layout(reference)
    assert set(ours) == set(expected) | {"center_class"}
    for key, value in expected.items():
        assert ours[key].dtype == value.dtype, key
        assert ours[key].shape == value.shape, key
        assert torch.equal(ours[key], value), key


GENERATOR_OPTIONS = [
    {},
    {"ignore_stuff_in_offset": True},
    {"ignore_crowd_in_semantic": True, "small_instance_area": 60, "small_instance_weight": 3},
    {"sigma": 3},
]


@pytest.mark.parametrize("options", GENERATOR_OPTIONS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_target_generator_equals_detectron2(options, seed):
    rng = np.random.default_rng(seed)
    panoptic, segments = random_scene(rng, 70, 130, num_things=8)
    # A segment that no pixel carries (cropped away) and a thing touching the image corner.
    segments.append({"id": 33999, "category_id": 18, "iscrowd": 0})
    panoptic[:5, :7] = 24005
    segments.append({"id": 24005, "category_id": 11, "iscrowd": 0})
    kwargs = {"ignore_label": 255, "thing_ids": THING_TRAIN_IDS, **options}
    reference = PanopticDeepLabTargetGenerator(**kwargs)(panoptic, segments)
    assert_same_targets(PanopticTargetGenerator(**kwargs)(panoptic, segments), reference)


def test_target_generator_large_and_unlisted_ids():
    """Ids beyond the dense lookup table and pixels whose id is in no segment (unlabelled)."""
    rng = np.random.default_rng(5)
    panoptic, segments = random_scene(rng, 40, 60, num_things=4)
    big = 9_000_000
    panoptic[10:20, 10:30] = big
    segments.append({"id": big, "category_id": 14, "iscrowd": 0})
    panoptic[30:35, 40:50] = 777  # not in segments_info
    kwargs = {"ignore_label": 255, "thing_ids": THING_TRAIN_IDS}
    reference = PanopticDeepLabTargetGenerator(**kwargs)(panoptic, segments)
    ours = PanopticTargetGenerator(**kwargs)(panoptic, segments)
    assert_same_targets(ours, reference)
    assert (ours["sem_seg"][30:35, 40:50] == 255).all()


def test_target_generator_no_segments():
    panoptic = np.zeros((8, 9), dtype=np.int32)
    targets = PanopticTargetGenerator(255, THING_TRAIN_IDS)(panoptic, [])
    assert (targets["sem_seg"] == 255).all()
    assert targets["center"].abs().sum() == 0 and targets["center_weights"].sum() == 0


def test_target_generator_rejects_rgb_panoptic():
    with pytest.raises(ValueError, match="HxW"):
        PanopticTargetGenerator(255, THING_TRAIN_IDS)(np.zeros((4, 4, 3), dtype=np.uint8), [])


def test_target_recipe_semantics():
    """Gaussian peak 1 at the rounded mean of each thing, offsets point there, weights as specified."""
    panoptic = np.full((40, 50), LABEL_IDS[0], dtype=np.int32)
    panoptic[10:21, 5:16] = 26000  # car, mean (15, 10)
    panoptic[25:35, 30:50] = 26001  # crowd car
    segments = [
        {"id": LABEL_IDS[0], "category_id": 0, "iscrowd": 0},
        {"id": 26000, "category_id": 13, "iscrowd": 0},
        {"id": 26001, "category_id": 13, "iscrowd": 1},
    ]
    generator = PanopticTargetGenerator(255, THING_TRAIN_IDS, sigma=8, ignore_stuff_in_offset=True)
    targets = generator(panoptic, segments)
    assert targets["center"][0, 15, 10] == 1.0
    assert torch.allclose(targets["center"][0, 15, 10 + 8], torch.tensor(float(np.exp(-0.5))))
    assert targets["offset"][:, 10, 5].tolist() == [5.0, 5.0]
    assert targets["offset_weights"][15, 10] == 1 and targets["offset_weights"][0, 0] == 0
    assert targets["center_weights"][0, 0] == 1 and targets["center_weights"][30, 40] == 0
    assert targets["offset_weights"][30, 40] == 0


def test_center_peak_rounded_or_floored():
    """EDAPS puts the peak at int(mean) (floor), Panoptic-DeepLab at round(mean); offsets point to the mean."""
    panoptic = np.zeros((30, 40), dtype=np.int32)
    panoptic[10:13, 20:23] = 26000
    panoptic[14, 27] = 26000  # mean (11.3, 21.6)
    segments = [{"id": 26000, "category_id": 13, "iscrowd": 0}]
    peaks = {}
    for rounding in ("round", "floor"):
        targets = PanopticTargetGenerator(255, THING_TRAIN_IDS, sigma=2, center_rounding=rounding)(panoptic, segments)
        peaks[rounding] = divmod(int(targets["center"].argmax()), 40)
        assert torch.allclose(targets["offset"][:, 10, 20], torch.tensor([1.3, 1.6]))
    assert peaks == {"round": (11, 22), "floor": (11, 21)}
    with pytest.raises(ValueError, match="center_rounding must be one of"):
        PanopticTargetGenerator(255, THING_TRAIN_IDS, center_rounding="ceil")


def test_center_class_is_the_class_of_the_gaussian_that_sets_each_pixel():
    """Two things of different classes whose Gaussians overlap, one far from both."""
    panoptic = np.full((30, 80), LABEL_IDS[0], dtype=np.int32)
    panoptic[8:13, 8:13] = 24000  # person, mean (10, 10)
    panoptic[8:13, 18:23] = 26000  # car, mean (10, 20): its Gaussian overlaps the person's
    panoptic[20:25, 60:65] = 33000  # bicycle, mean (22, 62)
    segments = [
        {"id": LABEL_IDS[0], "category_id": 0, "iscrowd": 0},
        {"id": 24000, "category_id": 11, "iscrowd": 0},
        {"id": 26000, "category_id": 13, "iscrowd": 0},
        {"id": 33000, "category_id": 18, "iscrowd": 0},
    ]
    sigma = 2
    targets = PanopticTargetGenerator(255, THING_TRAIN_IDS, sigma=sigma)(panoptic, segments)
    rows, cols = np.mgrid[:30, :80]
    radius = 3 * sigma + 1
    values = []
    for y, x in ((10, 10), (10, 20), (22, 62)):
        inside = (np.abs(rows - y) <= radius) & (np.abs(cols - x) <= radius)
        values.append(np.where(inside, np.exp(-((rows - y) ** 2 + (cols - x) ** 2) / (2 * sigma**2)), -1.0))
    values = np.stack(values)
    expected = np.where(values.max(0) >= 0, np.array([11, 13, 18])[values.argmax(0)], 255)
    tie = np.isclose(values[0], values[1]) & (values[0] >= 0)  # equidistant: the first pasted keeps it
    assert tie.any()
    expected[tie] = 11
    assert targets["center_class"].dtype == torch.int64
    assert np.array_equal(targets["center_class"].numpy(), expected)
    assert targets["center_class"][10, 14] == 11 and targets["center_class"][10, 16] == 13
    assert targets["center_class"][0, 40] == 255 and targets["sem_seg"][0, 40] == 0


# --------------------------------------------------------------------------------------------
# Mapper
# --------------------------------------------------------------------------------------------


def palette_labels(image: torch.Tensor) -> np.ndarray:
    """Train id whose colour is nearest to each pixel of a 3xHxW image (255 for black)."""
    colours = np.concatenate([PALETTE, np.zeros((1, 3), dtype=np.uint8)]).astype(np.int64)
    pixels = image.permute(1, 2, 0).numpy().astype(np.int64)
    distance = ((pixels[:, :, None, :] - colours[None, None]) ** 2).sum(-1)
    labels = distance.argmin(-1)
    return np.where(labels == NUM_CLASSES, 255, labels)


def test_source_mapper_shapes_and_dtypes(tiny_datasets):
    cfg = make_cfg()
    mapper = GBWPanopticDatasetMapper(cfg, is_train=True, load_labels=True)
    np.random.seed(0)
    for record in tiny_datasets["tiny_source"][:4]:
        out = mapper(record)
        image = out["image"]
        assert image.dtype == torch.uint8 and image.ndim == 3 and image.shape[0] == 3
        height, width = image.shape[1:]
        assert height <= 32 and width <= 48
        assert out["sem_seg"].dtype == torch.int64 and out["sem_seg"].shape == (height, width)
        assert out["sem_seg_weights"].dtype == torch.float32 and out["sem_seg_weights"].shape == (height, width)
        if record["has_instances"]:
            assert out["center"].shape == (1, height, width) and out["center"].dtype == torch.float32
            assert out["offset"].shape == (2, height, width) and out["offset"].dtype == torch.float32
            for key in ("center_weights", "offset_weights"):
                assert out[key].shape == (height, width) and out[key].dtype == torch.float32
        else:
            assert not set(INSTANCE_KEYS) & set(out)
        assert out["file_name"] == record["file_name"]
        assert (out["height"], out["width"]) == (48, 96)
        assert "segments_info" not in out and "segments_info" in record  # input not modified


def test_mapper_semantic_only_model_has_no_instance_keys(tiny_datasets):
    cfg = make_cfg(**{"MODEL.INS_EMBED_HEAD.ENABLED": False})
    out = GBWPanopticDatasetMapper(cfg, is_train=True, load_labels=True)(tiny_datasets["tiny_source"][0])
    assert "sem_seg" in out and not set(INSTANCE_KEYS) & set(out)


@pytest.mark.parametrize("seed", range(6))
def test_augmentations_keep_image_and_labels_aligned(tiny_datasets, seed):
    """Random resize (both directions), crop and flip: the image colours still match the labels."""
    options = {"INPUT.RESIZE_RATIO_RANGE": [0.6, 2.0], "INPUT.CROP.SIZE": [40, 60]}
    mapper = GBWPanopticDatasetMapper(make_cfg(**options), is_train=True, load_labels=True)
    record = tiny_datasets["tiny_source"][seed % 3]
    np.random.seed(seed)
    out = mapper(record)
    agreement = (palette_labels(out["image"]) == out["sem_seg"].numpy()).mean()
    assert agreement > 0.93
    # The panoptic-derived and the train-id-derived labels follow the same transforms.
    semantic_cfg = make_cfg(**options, **{"MODEL.INS_EMBED_HEAD.ENABLED": False})
    semantic_only = GBWPanopticDatasetMapper(semantic_cfg, is_train=True, load_labels=True)
    np.random.seed(seed)
    assert torch.equal(semantic_only(record)["sem_seg"], out["sem_seg"])
    # Offsets of thing pixels point to their instance's mean position, whose floor is the Gaussian's peak.
    thing = out["offset_weights"] > 0
    if thing.any():
        ys, xs = torch.nonzero(thing, as_tuple=True)
        center_y = (ys + out["offset"][0][thing]).floor().long()
        center_x = (xs + out["offset"][1][thing]).floor().long()
        assert (out["center"][0, center_y, center_x] == 1).all()


def test_misaligned_labels_would_be_detected(tiny_datasets):
    """The alignment check above is meaningful: a horizontal flip of the labels alone breaks it."""
    cfg = make_cfg(**{"INPUT.CROP.ENABLED": False, "INPUT.RESIZE_RATIO_RANGE": [1.0, 1.0], "INPUT.RANDOM_FLIP": "none"})
    out = GBWPanopticDatasetMapper(cfg, is_train=True, load_labels=True)(tiny_datasets["tiny_source"][0])
    assert (palette_labels(out["image"]) == out["sem_seg"].numpy()).mean() == 1.0
    assert (palette_labels(out["image"]) == out["sem_seg"].flip(-1).numpy()).mean() < 0.8


def test_train_augmentation_types():
    cfg = make_cfg()
    with_labels = build_augmentations(cfg, is_train=True, load_labels=True)
    assert [type(a) for a in with_labels] == [T.ResizeScale, T.RandomCrop_CategoryAreaConstraint, T.RandomFlip]
    assert with_labels[1].single_category_max_area == 0.75 and with_labels[1].ignored_category == 255
    without_labels = build_augmentations(cfg, is_train=True, load_labels=False)
    assert [type(a) for a in without_labels] == [T.ResizeScale, T.RandomCrop, T.RandomFlip]


def test_crop_limits_the_area_of_a_single_class(tiny_datasets):
    """Small crops of sky/road scenes: the constraint avoids crops filled by one class."""

    def dominated_crops(max_area: float) -> int:
        cfg = make_cfg(**{"INPUT.CROP.SIZE": [12, 16], "INPUT.CROP.SINGLE_CATEGORY_MAX_AREA": max_area,
                          "INPUT.RESIZE_RATIO_RANGE": [1.0, 1.0]})
        mapper = GBWPanopticDatasetMapper(cfg, is_train=True, load_labels=True)
        np.random.seed(0)
        count = 0
        for record in tiny_datasets["tiny_source"][:4] * 10:
            labels = mapper(record)["sem_seg"]
            counts = torch.bincount(labels[labels != 255])
            count += int(counts.max() >= 0.75 * counts.sum())
        return count

    unconstrained, constrained = dominated_crops(1.0), dominated_crops(0.75)
    assert unconstrained >= 15 and constrained <= unconstrained // 3


def test_random_resize_follows_ratio_range(tiny_datasets):
    cfg = make_cfg(**{"INPUT.CROP.ENABLED": False, "INPUT.RESIZE_RATIO_RANGE": [0.5, 2.0]})
    mapper = GBWPanopticDatasetMapper(cfg, is_train=True, load_labels=False)
    np.random.seed(3)
    widths = [mapper(tiny_datasets["tiny_target"][0])["image"].shape[2] for _ in range(30)]
    assert 48 <= min(widths) < 70 and 150 < max(widths) <= 192


def test_domain_base_sizes():
    cfg = make_cfg(**{"INPUT.SOURCE_BASE_SIZE": [24, 48], "INPUT.RESIZE_RATIO_RANGE": [1.0, 1.0]})
    sizes = {}
    for domain in ("source", "target", None):
        resize = build_augmentations(cfg, is_train=True, domain=domain)[0]
        sizes[domain] = (resize.target_height, resize.target_width)
    assert sizes == {"source": (24, 48), "target": (48, 96), None: (48, 96)}
    cfg.INPUT.TARGET_BASE_SIZE = [12, 24]
    assert build_augmentations(cfg, is_train=True, domain="target")[0].target_height == 12
    evaluation = build_augmentations(cfg, is_train=False, domain="target")[0]
    assert (evaluation.target_height, evaluation.target_width) == (48, 96)  # always INPUT.BASE_SIZE
    with pytest.raises(ValueError, match=r"INPUT.SOURCE_BASE_SIZE=\[512\]"):
        build_augmentations(make_cfg(**{"INPUT.SOURCE_BASE_SIZE": [512]}), is_train=True, domain="source")
    with pytest.raises(ValueError, match="domain"):
        build_augmentations(cfg, is_train=True, domain="validation")


@pytest.mark.parametrize(
    "config, sizes",
    [
        # SYNTHIA 760x1280 stays as is, Cityscapes trains and tests at full size (EDAPS bottom-up).
        ("synthia2cityscapes/mit_b5_gbw.yaml", {"source": ((760, 1280), (760, 1280)), "target": ((1024, 2048), (1024, 2048)), None: ((1024, 2048), (1024, 2048))}),
        # GTA5 1914x1052 fits 1280x720 as 1280x704, as mmcv's rescale.
        ("gta2cityscapes/mit_b5_gbw.yaml", {"source": ((1052, 1914), (704, 1280)), "target": ((1024, 2048), (1024, 2048)), None: ((1024, 2048), (1024, 2048))}),
        # Mapillary is stored fitted into 768x1024 (EDAPS's ResizeWithPad box) and kept; SYNTHIA as is.
        ("synthia2mapillary/mit_b5_gbw.yaml", {"source": ((760, 1280), (760, 1280)), "target": ((768, 1024), (768, 1024)), None: ((576, 1024), (576, 1024))}),
        # The semantic DAFormer setting: Cityscapes at 512x1024 for training and testing.
        ("gta2cityscapes/semantic_mit_b5_gbw.yaml", {"source": ((1052, 1914), (704, 1280)), "target": ((1024, 2048), (512, 1024)), None: ((1024, 2048), (512, 1024))}),
    ],
)
def test_reference_configs_resize_each_dataset_to_its_reference_scale(repo_root, config, sizes):
    cfg = get_cfg()
    add_gbw_panoptic_config(cfg)
    cfg.merge_from_file(str(repo_root / "configs" / config))
    for domain, (input_size, output_size) in sizes.items():
        resize = build_augmentations(cfg, is_train=domain is not None, domain=domain)[0]
        transform = resize.get_transform(np.zeros((*input_size, 3), dtype=np.uint8))
        assert (transform.new_h, transform.new_w) == output_size, domain


def test_rcs_crop_is_redrawn_until_it_holds_the_drawn_class(tiny_datasets):
    cfg = make_cfg(**{"INPUT.CROP.SIZE": [12, 16], "INPUT.RESIZE_RATIO_RANGE": [1.0, 1.0], "INPUT.CROP.SINGLE_CATEGORY_MAX_AREA": 1.0})
    threshold = 20  # pixels of the rare class in a 12x16 crop

    def share_of_crops(labels: np.ndarray, c: int) -> float:
        """Fraction of the 12x16 crop positions holding more than ``threshold`` pixels of ``c``."""
        windows = np.lib.stride_tricks.sliding_window_view(labels == c, (12, 16))
        return float((windows.sum(axis=(-2, -1)) > threshold).mean())

    # An image and class that one random crop in about 3 catches (11 draws miss it with p < 0.05).
    record, rare_class = next(
        (record, c)
        for record in tiny_datasets["tiny_source"]
        for labels in [np.asarray(Image.open(record["sem_seg_file_name"]))]
        for c in np.unique(labels[labels != 255]).tolist()
        if 0.25 < share_of_crops(labels, c) < 0.45
    )

    def enough(mapper, fields) -> float:
        np.random.seed(5)
        outs = [mapper({**record, **fields}) for _ in range(40)]
        assert all("rcs_class" not in out for out in outs)
        return float(np.mean([int((out["sem_seg"] == rare_class).sum()) > threshold for out in outs]))

    mapper = GBWPanopticDatasetMapper(cfg, is_train=True, load_labels=True)
    mapper.rcs_min_crop_pixels = threshold
    without, with_class = enough(mapper, {}), enough(mapper, {"rcs_class": rare_class})
    assert without < 0.6 and with_class > 0.9, (without, with_class)
    # From the config: MIN_CROP_RATIO * MIN_PIXELS; an unreachable threshold stops after 1 + 10 draws.
    assert GBWPanopticDatasetMapper(cfg, is_train=True, load_labels=True).rcs_min_crop_pixels == 0.5 * 20
    draws = []
    mapper.augmentations = _counting(mapper.augmentations, draws)
    mapper.rcs_min_crop_pixels = 12 * 16
    mapper({**record, "rcs_class": rare_class})
    assert len(draws) == 11


def _counting(augmentations, draws):
    def call(aug_input):
        draws.append(1)
        return augmentations(aug_input)

    return call


def test_target_train_mapper_outputs_image_only(tiny_datasets):
    cfg = make_cfg()
    record = {k: v for k, v in tiny_datasets["tiny_target"][0].items() if k in ("file_name", "image_id", "height", "width")}
    out = GBWPanopticDatasetMapper(cfg, is_train=True, load_labels=False)(record)
    assert out["image"].dtype == torch.uint8 and out["image"].shape[0] == 3
    assert out["image"].shape[1] <= 32 and out["image"].shape[2] <= 48
    assert not {"sem_seg", "sem_seg_weights", *INSTANCE_KEYS} & set(out)


def test_evaluation_mapper_is_deterministic_and_full_size(tiny_datasets):
    cfg = make_cfg()
    mapper = GBWPanopticDatasetMapper(cfg, is_train=False, load_labels=True, dataset_name="tiny_target")
    record = tiny_datasets["tiny_target"][1]
    first, second = mapper(record), mapper(record)
    assert first["image"].shape == (3, 48, 96)
    assert torch.equal(first["image"], second["image"]) and torch.equal(first["sem_seg"], second["sem_seg"])
    expected = np.asarray(Image.open(record["sem_seg_file_name"]))
    assert np.array_equal(first["sem_seg"].numpy(), expected)
    assert first["segments_info"] == record["segments_info"]


def test_mapper_reports_missing_and_mismatched_labels(tiny_datasets, tmp_path):
    mapper = GBWPanopticDatasetMapper(make_cfg(), is_train=True, load_labels=True)
    record = dict(tiny_datasets["tiny_source"][0])
    del record["sem_seg_file_name"]
    with pytest.raises(KeyError, match="sem_seg_file_name"):
        mapper(record)
    small = tmp_path / "small_labels.png"
    Image.fromarray(np.zeros((10, 10), dtype=np.uint8)).save(small)
    record = dict(tiny_datasets["tiny_source"][0], sem_seg_file_name=str(small))
    with pytest.raises(ValueError, match="small_labels.png.*48x96"):
        mapper(record)


# --------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("rcs", [True, False])
def test_uda_loader_yields_paired_batches(tiny_datasets, rcs):
    cfg = make_cfg(**{"SOLVER.IMS_PER_BATCH": 2, "DATASETS.TARGET_IMS_PER_BATCH": 3, "DATALOADER.RCS.ENABLED": rcs})
    source_names = {d["file_name"] for d in tiny_datasets["tiny_source"]}
    target_names = {d["file_name"] for d in tiny_datasets["tiny_target"]}
    for source_batch, target_batch in itertools.islice(iter(build_uda_train_loader(cfg)), 4):
        assert len(source_batch) == 2 and len(target_batch) == 3
        assert all(d["file_name"] in source_names and "sem_seg" in d for d in source_batch)
        assert all(d["file_name"] in target_names and "sem_seg" not in d for d in target_batch)
        assert all(d["image"].shape[1:] == d["sem_seg"].shape for d in source_batch)


def test_uda_loader_requires_target_datasets(tiny_datasets):
    cfg = make_cfg(**{"DATASETS.TARGET_TRAIN": ()})
    with pytest.raises(ValueError, match="TARGET_TRAIN"):
        build_uda_train_loader(cfg)


def test_test_loader_visits_every_image_once(tiny_datasets):
    loader = build_test_loader(make_cfg(), "tiny_target")
    names = [batch[0]["file_name"] for batch in loader]
    assert sorted(names) == sorted(d["file_name"] for d in tiny_datasets["tiny_target"])
