"""HRDA: crop geometry, scale fusion, sliding windows, losses and gradients, pseudo-label margins, and
training, evaluation and resume through the UDA trainer on the synthetic benchmark."""
import importlib
import json
import math
import sys
from pathlib import Path
from typing import Dict, List

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from detectron2.data import transforms as T
from detectron2.engine import default_argument_parser
from detectron2.modeling import build_model
from detectron2.projects.deeplab.loss import DeepLabCE
from PIL import Image
from test_modeling_meta_arch import CITYSCAPES_CLASSES, _batch, _cfg
from test_uda_training import _Killed, _train, assert_same_training_state

from gbw_panoptic.data.mapper import GBWPanopticDatasetMapper
from gbw_panoptic.modeling import HRDASegmentor
from gbw_panoptic.modeling.hrda import (
    CropBox,
    average_windows,
    crop,
    fuse_scales,
    random_crop_box,
    scale_box,
    sliding_windows,
)
from gbw_panoptic.uda import UDATrainer
from gbw_panoptic.uda.cli import main, setup

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIG = "configs/synthetic/hrda_source_only.yaml"


def _model(opts: List = ()) -> HRDASegmentor:
    """MiT-B0, 16-channel decoders, no dropout; 32x32 detail crops, whole-image test."""
    torch.manual_seed(0)
    base = [
        "MODEL.SEM_SEG_HEAD.EMBED_DIM", 16, "MODEL.HRDA.ATTENTION_EMBED_DIM", 16, "MODEL.SEM_SEG_HEAD.DROPOUT", 0.0,
        "MODEL.HRDA.DETAIL_CROP_SIZE", [32, 32], "MODEL.HRDA.TEST_WINDOW_SIZE", [], "MODEL.HRDA.TEST_WINDOW_STRIDE", [],
        "DATASETS.TRAIN", "()", "DATASETS.TEST", f"('{CITYSCAPES_CLASSES}',)",
    ]  # fmt: skip
    return build_model(_cfg(CONFIG, [*base, *opts]))


def _no_gradient(model) -> List[str]:
    """Trainable parameters without a non-zero gradient."""
    return [
        name
        for name, parameter in model.named_parameters()
        if parameter.requires_grad and (parameter.grad is None or not parameter.grad.abs().sum() > 0)
    ]


# ---------------------------------------------------------------------- geometry
def test_random_crop_box_is_inside_aligned_and_reaches_every_position():
    generator = torch.Generator().manual_seed(0)
    boxes = {random_crop_box(96, 160, (48, 64), 8, generator) for _ in range(2000)}
    for box in boxes:
        assert 0 <= box.top and box.bottom <= 96 and 0 <= box.left and box.right <= 160
        assert (box.bottom - box.top, box.right - box.left) == (48, 64)
        assert box.top % 8 == 0 and box.left % 8 == 0
    # Every aligned position, including the last one flush with the border.
    assert {box.top for box in boxes} == set(range(0, 49, 8))
    assert {box.left for box in boxes} == set(range(0, 97, 8))
    # A crop larger than the image covers the axis.
    assert random_crop_box(32, 160, (48, 64), 8, generator)[:2] == (0, 32)


def test_scale_box_maps_exactly_or_refuses():
    assert scale_box(CropBox(8, 56, 16, 80), 8) == CropBox(1, 7, 2, 10)
    assert scale_box(CropBox(8, 56, 16, 80), 4) == CropBox(2, 14, 4, 20)
    with pytest.raises(ValueError, match="does not map exactly"):
        scale_box(CropBox(4, 52, 16, 80), 8)


def test_training_detail_crop_lies_inside_the_context_crop_and_maps_back():
    model = _model().train()
    batch = _batch(height=64, width=96)
    images = model.preprocess_image(batch).tensor
    torch.manual_seed(3)
    predictions = model.training_predictions(images)
    box = predictions["detail_box"]
    torch.manual_seed(3)
    assert box == random_crop_box(64, 96, (32, 32), 8)
    assert 0 <= box.top < box.bottom <= 64 and 0 <= box.left < box.right <= 96
    assert predictions["fused"]["sem_seg"].shape == (2, 19, 64, 96)
    assert predictions["detail"]["sem_seg"].shape == (2, 19, 32, 32)
    assert predictions["features"]["res2"].shape[-2:] == (8, 12)  # the context crop: 32x48 at stride 4

    # The detail logits are those of the image region of the box, and the labels of the detail loss
    # are that region's labels.
    detail = model.sem_seg_head(model.backbone(images[..., box.top : box.bottom, box.left : box.right]))
    torch.testing.assert_close(
        predictions["detail"]["sem_seg"], F.interpolate(detail, size=(32, 32), mode="bilinear", align_corners=False)
    )
    targets = model._detail_targets(batch, (64, 96), box)
    labels, weights = targets["sem_seg"], targets["sem_seg_weights"]
    region = (slice(None), slice(box.top, box.bottom), slice(box.left, box.right))
    assert torch.equal(labels, torch.stack([x["sem_seg"] for x in batch])[region])
    assert torch.equal(weights, torch.stack([x["sem_seg_weights"] for x in batch])[region])


# ---------------------------------------------------------------------- fusion
def test_fusion_equals_a_hand_computation():
    # Context grid 2 x 4, detail grid 4 x 8 (upsample 2); the detail box covers detail columns 0-3
    # (context columns 0-1). Attention 1 and context c = 8 everywhere, detail d = 2.
    context = torch.full((1, 1, 2, 4), 8.0)
    attention = torch.ones((1, 1, 2, 4))
    detail = torch.full((1, 1, 4, 4), 2.0)
    fused = fuse_scales(context, attention, detail, upsample=2, detail_box=CropBox(0, 4, 0, 4))
    # Masked attention [1 1 0 0] per row, upsampled bilinearly (half-pixel centres) to
    # a = [1 1 1 0.75 0.25 0 0 0]; fused = a * d + (1 - a) * c with d = 0 outside the box:
    # [2, 2, 2, 0.75 * 2 + 0.25 * 8, 0.75 * 8, 8, 8, 8].
    expected = torch.tensor([2.0, 2.0, 2.0, 3.5, 6.0, 8.0, 8.0, 8.0])
    assert torch.equal(fused[0, 0], expected.expand(4, 8))

    # Without a box (inference): fused = a * d + (1 - a) * c with a = 0.25 everywhere.
    whole = fuse_scales(context, torch.full((1, 1, 2, 4), 0.25), torch.full((1, 1, 4, 8), 2.0), upsample=2)
    assert torch.equal(whole, torch.full((1, 1, 4, 8), 0.25 * 2.0 + 0.75 * 8.0))


def test_class_wise_attention_weights_each_class():
    context = torch.zeros((1, 2, 2, 2))
    attention = torch.stack([torch.ones(2, 2), torch.zeros(2, 2)])[None]  # class 0: detail, class 1: context
    detail = torch.ones((1, 2, 4, 4))
    fused = fuse_scales(context, attention, detail, upsample=2)
    assert torch.equal(fused[0, 0], torch.ones(4, 4)) and torch.equal(fused[0, 1], torch.zeros(4, 4))


# ---------------------------------------------------------------------- sliding windows
def test_sliding_windows_cover_the_image():
    boxes = sliding_windows(96, 160, (64, 64), (32, 32))
    assert [(b.top, b.left) for b in boxes] == [(t, l) for t in (0, 32) for l in (0, 32, 64, 96)]
    assert all(b.bottom - b.top == 64 and b.right - b.left == 64 for b in boxes)
    assert sliding_windows(48, 80, (64, 64), (32, 32)) == [CropBox(0, 48, 0, 64), CropBox(0, 48, 16, 80)]
    assert sliding_windows(32, 32, (64, 64), (32, 32)) == [CropBox(0, 32, 0, 32)]


def test_average_windows_of_consistent_windows_give_back_the_whole():
    whole = torch.randn(2, 3, 24, 40)
    boxes = sliding_windows(96, 160, (64, 64), (32, 32))  # input pixels; outputs at stride 4
    windows = torch.cat([crop(whole, scale_box(box, 4)) for box in boxes])
    torch.testing.assert_close(average_windows(windows, boxes, (24, 40), downsample=4), whole)
    # Overlaps are averaged: window values 0 and 1 give 0.5 where both cover.
    two = [CropBox(0, 8, 0, 8), CropBox(0, 8, 4, 12)]
    averaged = average_windows(torch.stack([torch.zeros(1, 8, 8), torch.ones(1, 8, 8)]), two, (8, 12))
    assert torch.equal(averaged[0, 0, 0], torch.tensor([0, 0, 0, 0, 0.5, 0.5, 0.5, 0.5, 1, 1, 1, 1]))


def test_sliding_inference_equals_whole_image_inference_when_the_window_covers_the_image():
    model = _model(["MODEL.HRDA.DETAIL_CROP_SIZE", [64, 96]]).eval()
    whole = _model(["MODEL.HRDA.DETAIL_CROP_SIZE", [64, 96], "MODEL.HRDA.DETAIL_SLIDE_INFERENCE", False]).eval()
    whole.load_state_dict(model.state_dict())
    images = model.preprocess_image(_batch(height=64, width=96)).tensor
    with torch.no_grad():
        torch.testing.assert_close(model.predict_dense(images)["sem_seg"], whole.predict_dense(images)["sem_seg"])
        # Test-time windows covering the image: the same as one pass.
        model.test_window_size, model.test_window_stride = (64, 128), (32, 32)
        torch.testing.assert_close(model.predict_windows(images)["sem_seg"], model.predict_dense(images)["sem_seg"])


def test_dense_prediction_of_an_unaligned_image_is_that_of_the_padded_image():
    # The DACS teacher predicts on target crops stacked without padding (e.g. 60 x 90 here).
    model = _model().eval()
    images = model.preprocess_image(_batch(height=64, width=96)).tensor
    unaligned = images[..., :60, :90]
    padded = torch.nn.functional.pad(unaligned, (0, 6, 0, 4))
    with torch.no_grad():
        dense = model.predict_dense(unaligned)["sem_seg"]
        torch.testing.assert_close(dense, model.predict_dense(padded)["sem_seg"][..., :60, :90])
    assert dense.shape == (2, 19, 60, 90)


def test_sliding_detail_windows_average_the_per_window_predictions():
    model = _model().eval()  # 32x32 detail windows, stride 16, on a 64x96 image
    images = model.preprocess_image(_batch(height=64, width=96)).tensor
    with torch.no_grad():
        prediction = model.predict_dense(images)["sem_seg"]
        context = model.extract_features(images)
        context_logits, attention = model.sem_seg_head(context), model.scale_attention(context)
        boxes = sliding_windows(64, 96, (32, 32), (16, 16))
        assert len(boxes) == 3 * 5
        summed, count = torch.zeros(2, 19, 16, 24), torch.zeros(16, 24)
        for box in boxes:
            cell = scale_box(box, 4)
            logits = model.sem_seg_head(model.backbone(crop(images, box)))
            summed[..., cell.top : cell.bottom, cell.left : cell.right] += logits
            count[cell.top : cell.bottom, cell.left : cell.right] += 1
        size = (16, 24)
        up = lambda x: F.interpolate(x, size=size, mode="bilinear", align_corners=False)  # noqa: E731
        fused = up(attention) * summed / count + up((1 - attention) * context_logits)
    torch.testing.assert_close(prediction, F.interpolate(fused, size=(64, 96), mode="bilinear", align_corners=False))


# ---------------------------------------------------------------------- losses and gradients
def test_losses_follow_hrda_weights_and_every_head_gets_a_gradient():
    model = _model().train()
    batch = _batch(height=64, width=96)
    torch.manual_seed(5)
    losses = model(batch)
    assert set(losses) == {"loss_sem_seg", "loss_sem_seg_detail"}
    images = model.preprocess_image(batch).tensor
    torch.manual_seed(5)
    predictions = model.training_predictions(images)
    labels = torch.stack([x["sem_seg"] for x in batch])
    weights = torch.stack([x["sem_seg_weights"] for x in batch])
    box = predictions["detail_box"]
    ce = DeepLabCE(ignore_label=255)
    fused, detail = predictions["fused"]["sem_seg"], predictions["detail"]["sem_seg"]
    torch.testing.assert_close(losses["loss_sem_seg"], 0.9 * ce(fused, labels, weights))
    torch.testing.assert_close(losses["loss_sem_seg_detail"], 0.1 * ce(detail, crop(labels, box), crop(weights, box)))

    sum(losses.values()).backward()
    assert not _no_gradient(model)
    assert {name.split(".")[0] for name, _ in model.named_parameters()} == {
        "backbone",
        "sem_seg_head",
        "scale_attention",
    }


def test_gbw_weights_the_fused_and_the_detail_loss_separately():
    model = _model(["MODEL.GBW.SEM_SEG.ENABLED", True, "MODEL.GBW.SEM_SEG.LAMBDA", 0.1]).train()
    losses = model(_batch(height=64, width=96))
    weights = {name: float(value) for name, value in model.gbw_class_weights().items()}
    assert all(torch.isfinite(v) for v in losses.values())
    fused = [weights.pop(f"sem_seg/{name}") for name in model.class_names]
    detail = [weights.pop(f"sem_seg_detail/{name}") for name in model.class_names]
    assert not weights  # a semantic-only model: no other GBW loss
    assert sum(fused) == pytest.approx(19, rel=1e-5) and sum(detail) == pytest.approx(19, rel=1e-5)
    assert fused != detail


def test_feature_distance_compares_the_context_features():
    model = _model().train()
    batch = _batch(height=64, width=96)
    losses, features = model.losses_and_features(batch)
    images = model.preprocess_image(batch).tensor
    half = F.interpolate(images, scale_factor=0.5, mode="bilinear", align_corners=False)
    torch.testing.assert_close(features["res5"], model.backbone(half)["res5"])
    assert features["res5"].shape[-2:] == (1, 2)  # 64x96 input: 32x48 context at stride 32


def test_panoptic_hrda_fuses_and_supervises_center_and_offset():
    model = _model(["MODEL.INS_EMBED_HEAD.ENABLED", True, "MODEL.INS_EMBED_HEAD.EMBED_DIM", 16]).train()
    batch = _batch(height=64, width=96)
    torch.manual_seed(5)
    losses = model(batch)
    assert set(losses) == {f"loss_{name}{part}" for name in ("sem_seg", "center", "offset") for part in ("", "_detail")}
    torch.manual_seed(5)
    predictions = model.training_predictions(model.preprocess_image(batch).tensor)
    box = predictions["detail_box"]
    assert predictions["fused"]["offset"].shape == (2, 2, 64, 96) and predictions["detail"]["center"].shape[1] == 1

    def stacked(key):
        return torch.stack([x[key] for x in batch])

    # EDAPS: MSE x 10 / sum of center weights, 0 above 14; L1 x 0.1 / (2 x sum of offset weights).
    def center_loss(prediction, target, weights):
        loss = 10.0 * ((prediction - target) ** 2 * weights[:, None]).sum() / weights.sum()
        return torch.where(loss > 14.0, 0.0, loss)

    def offset_loss(prediction, target, weights):
        return 0.1 * ((prediction - target).abs() * weights[:, None]).sum() / (2 * weights.sum())

    fused, detail = predictions["fused"], predictions["detail"]
    center, center_weights = stacked("center"), stacked("center_weights")
    offset, offset_weights = stacked("offset"), stacked("offset_weights")
    torch.testing.assert_close(losses["loss_center"], 0.9 * center_loss(fused["center"], center, center_weights))
    torch.testing.assert_close(
        losses["loss_center_detail"], 0.1 * center_loss(detail["center"], crop(center, box), crop(center_weights, box))
    )
    torch.testing.assert_close(losses["loss_offset"], 0.9 * offset_loss(fused["offset"], offset, offset_weights))
    torch.testing.assert_close(
        losses["loss_offset_detail"], 0.1 * offset_loss(detail["offset"], crop(offset, box), crop(offset_weights, box))
    )
    sum(losses.values()).backward()
    assert not _no_gradient(model)
    assert {name.split(".")[0] for name, _ in model.named_parameters()} == {
        "backbone", "sem_seg_head", "ins_embed_head", "scale_attention", "instance_attention"
    }  # fmt: skip

    model.eval()
    with torch.no_grad():
        (output,) = model(_batch(height=64, width=96)[:1])
    assert set(output) == {"sem_seg", "panoptic_seg", "instances"}


def test_panoptic_hrda_offsets_of_the_context_are_converted_to_input_pixels():
    opts = ["MODEL.INS_EMBED_HEAD.ENABLED", True, "MODEL.INS_EMBED_HEAD.EMBED_DIM", 16]
    model = _model([*opts, "MODEL.HRDA.DETAIL_SLIDE_INFERENCE", False]).eval()
    images = model.preprocess_image(_batch(height=64, width=96)).tensor
    with torch.no_grad():
        dense = model.predict_dense(images)
        context = model.extract_features(images)
        _, context_offset = model.ins_embed_head(context)  # in pixels of the half-size context image
        _, detail_offset = model.ins_embed_head(model.backbone(images))
        attention = model.instance_attention(context)[:, 1:]
    up = lambda x, size: F.interpolate(x, size=size, mode="bilinear", align_corners=False)  # noqa: E731
    fused = up(attention, (16, 24)) * detail_offset + up((1 - attention) * 2 * context_offset, (16, 24))
    torch.testing.assert_close(dense["offset"], up(fused, (64, 96)))


@pytest.mark.parametrize(
    "opts, message",
    [
        (
            ["MODEL.INS_EMBED_HEAD.ENABLED", True, "MODEL.HRDA.DETAIL_SCALE", 2.0],
            "DETAIL_SCALE=2.0: with the instance head",
        ),
        (["MODEL.HRDA.CROP_COORD_DIVISIBLE", 4], "CROP_COORD_DIVISIBLE=4 must be a multiple"),
        (["MODEL.HRDA.DETAIL_CROP_SIZE", [36, 36]], r"DETAIL_CROP_SIZE=\[36, 36\] must be multiples"),
        (["MODEL.HRDA.CONTEXT_SCALE", 1.0], "CONTEXT_SCALE=1.0 must be > 0 and below"),
        (["MODEL.HRDA.TEST_WINDOW_SIZE", [64, 64]], "TEST_WINDOW_SIZE"),
    ],
)
def test_bad_hrda_configs_are_rejected(opts, message):
    with pytest.raises(ValueError, match=message):
        _model(opts)


def test_every_hrda_config_builds_hrda_with_the_published_settings():
    for config in ("gta2cityscapes", "synthia2cityscapes"):
        for suffix, gbw in (("", False), ("_gbw", True)):
            cfg = _cfg(f"configs/{config}/semantic_hrda_mit_b5{suffix}.yaml")
            hrda = cfg.MODEL.HRDA
            assert (hrda.CONTEXT_SCALE, hrda.DETAIL_SCALE, hrda.DETAIL_CROP_SIZE) == (0.5, 1.0, [512, 512])
            assert (hrda.DETAIL_LOSS_WEIGHT, hrda.CROP_COORD_DIVISIBLE, hrda.ATTENTION_CLASSWISE) == (0.1, 8, True)
            assert (list(cfg.INPUT.CROP.SIZE), list(cfg.UDA.PSEUDO_LABEL_MARGINS)) == ([1024, 1024], [30, 240, 30, 30])
            assert cfg.MODEL.GBW.SEM_SEG.ENABLED == gbw and cfg.MODEL.META_ARCHITECTURE == "HRDASegmentor"
            source = [1440, 2560] if config == "gta2cityscapes" else [1520, 2560]
            assert (list(cfg.INPUT.SOURCE_BASE_SIZE), list(cfg.INPUT.TARGET_BASE_SIZE)) == (source, [1024, 2048])
            assert cfg.DATALOADER.RCS.MIN_CROP_RATIO == 2.0


# ---------------------------------------------------------------------- pseudo-label margins
def test_mapper_marks_pseudo_label_margins_of_the_whole_image_before_the_crop(tmp_path):
    path = tmp_path / "image.png"
    Image.fromarray(np.zeros((40, 60, 3), dtype=np.uint8)).save(path)
    crop_transform = T.CropTransform(x0=30, y0=8, w=30, h=32)  # the bottom-right part of the image
    mapper = GBWPanopticDatasetMapper(
        is_train=True,
        augmentations=[crop_transform],
        image_format="RGB",
        load_labels=False,
        pseudo_label_margins=(3, 5, 7, 2),
    )
    record = mapper({"file_name": str(path), "height": 40, "width": 60, "image_id": "a"})
    valid = record["pseudo_label_valid"]
    assert valid.shape == record["image"].shape[-2:] == (32, 30) and valid.dtype == torch.bool
    # Image rows 8..39 -> crop rows 0..31: rows 35.. of the image (the bottom 5) are margins;
    # image columns 30..59: the right 2 columns are margins, the left 7 are outside the crop.
    expected = torch.ones(32, 30, dtype=torch.bool)
    expected[27:] = False
    expected[:, 28:] = False
    assert torch.equal(valid, expected)
    without = GBWPanopticDatasetMapper(
        is_train=True, augmentations=[crop_transform], image_format="RGB", load_labels=False
    )
    assert "pseudo_label_valid" not in without({"file_name": str(path), "height": 40, "width": 60, "image_id": "a"})


# ---------------------------------------------------------------------- end to end
# Tiny synthetic HRDA: MiT-B0, 16-channel decoders, 64x64 crops of the 128x256 test images, 32x32
# detail crops, 64x64 test windows.
TINY = [
    "MODEL.DEVICE", "cpu",
    "MODEL.SEM_SEG_HEAD.EMBED_DIM", "16",
    "MODEL.HRDA.ATTENTION_EMBED_DIM", "16",
    "MODEL.HRDA.DETAIL_CROP_SIZE", "[32, 32]",
    "MODEL.HRDA.TEST_WINDOW_SIZE", "[64, 64]",
    "MODEL.HRDA.TEST_WINDOW_STRIDE", "[32, 32]",
    "INPUT.BASE_SIZE", "[128, 256]",
    "INPUT.CROP.SIZE", "[64, 64]",
    "SOLVER.WARMUP_ITERS", "2",
    "TEST.EVAL_PERIOD", "0",
    "UDA.LOG_PERIOD", "1",
    "SEED", "7",
]  # fmt: skip


def _args(output_dir, config="hrda_dacs_gbw.yaml", extra=(), flags=()):
    argv = [*flags, "--config-file", str(REPO_ROOT / "configs" / "synthetic" / config)]
    return default_argument_parser().parse_args(argv + TINY + ["OUTPUT_DIR", str(output_dir), *extra])


@pytest.mark.slow
@pytest.mark.parametrize(
    "config, outputs, task",
    [
        ("hrda_dacs_gbw.yaml", ["sem_seg"], "sem_seg"),
        ("hrda_panoptic_dacs_gbw.yaml", ["sem_seg", "center", "offset"], "panoptic_seg"),
    ],
)
def test_hrda_dacs_gbw_trains_and_evaluates_through_train_net(synthetic_datasets, tmp_path, config, outputs, task):
    main(_args(tmp_path, config, extra=["SOLVER.MAX_ITER", "2"]))
    with open(tmp_path / "metrics.json") as f:
        records = [r for r in map(json.loads, f) if "total_loss" in r]
    assert [r["iteration"] for r in records] == [0, 1]
    for record in records:
        for output in outputs:
            for name in (f"loss_{output}", f"loss_{output}_detail", f"loss_mix_{output}", f"loss_mix_{output}_detail"):
                assert math.isfinite(record[name]), (name, record)
        for loss in ("source/sem_seg", "source/sem_seg_detail", "mixed/sem_seg", "mixed/sem_seg_detail"):
            weights = [v for k, v in record.items() if k.startswith(f"gbw/{loss}/")]
            assert len(weights) == 19 and sum(weights) == pytest.approx(19, rel=1e-4)
        assert 0.0 <= record["dacs/pseudo_confidence"] <= 1.0

    weights = str(tmp_path / "model_final.pth")
    results = main(_args(tmp_path, config, flags=["--eval-only"], extra=["MODEL.WEIGHTS", weights]))
    metrics = results["synthetic_target_panoptic_val"][task]
    assert 0.0 <= metrics["mIoU" if task == "sem_seg" else "PQ"] <= 100.0


@pytest.mark.slow
def test_pseudo_label_margins_zero_the_mixed_weights(synthetic_datasets, tmp_path, monkeypatch):
    margins = ["UDA.PSEUDO_LABEL_MARGINS", "[16, 40, 16, 16]"]
    cfg = setup(_args(tmp_path, extra=["SOLVER.MAX_ITER", "1", *margins]))
    trainer = UDATrainer(cfg)
    seen = []
    mixed_batch = trainer.method.mixed_batch

    def recording_mixed_batch(source_batch, target_images, labels, weights):
        seen.append(weights.clone())
        return mixed_batch(source_batch, target_images, labels, weights)

    monkeypatch.setattr(trainer.method, "mixed_batch", recording_mixed_batch)
    source_batch, target_batch = next(iter(trainer.data_loader))
    trainer.method.run_step(trainer.runner, source_batch, target_batch, 0)
    valid = torch.stack([x["pseudo_label_valid"] for x in target_batch])
    assert not valid.all()
    assert (seen[0][~valid] == 0).all()


@pytest.mark.slow
def test_killed_and_resumed_hrda_run_equals_uninterrupted(synthetic_datasets, tmp_path):
    def train(output_dir, resume, kill_before=None, seed="7"):
        extra = ["SOLVER.MAX_ITER", "4", "SOLVER.CHECKPOINT_PERIOD", "2", "SEED", seed, "DATASETS.TEST", "()"]
        return _train(setup(_args(output_dir, "hrda_panoptic_dacs_gbw.yaml", extra=extra)), resume, kill_before)

    straight = train(tmp_path / "straight", resume=False)
    with pytest.raises(_Killed):
        train(tmp_path / "resumed", resume=False, kill_before=3)
    assert (tmp_path / "resumed" / "last_checkpoint").read_text() == "model_0000001.pth"
    # The random detail crops and everything else come from the checkpoint's generators.
    resumed = train(tmp_path / "resumed", resume=True, seed="-1")
    assert resumed.start_iter == 2
    assert_same_training_state(straight, resumed)


@pytest.mark.slow
def test_bench_hrda_writes_table_and_json(tmp_path, monkeypatch, capsys):
    # The tool's main in this process, at this process's threads (its CPU memory measurement still starts a
    # process per arm).
    out = tmp_path / "bench.json"
    monkeypatch.syspath_prepend(str(REPO_ROOT / "tools"))
    bench_hrda = importlib.import_module("bench_hrda")
    argv = ["bench_hrda.py", "--methods", "source_only", "--steps", "1", "--warmup", "0"]
    monkeypatch.setattr(sys, "argv", [*argv, "--threads", str(torch.get_num_threads()), "--out", str(out)])
    bench_hrda.main()
    assert "ratio HRDA / single-scale" in capsys.readouterr().out
    report = json.loads(out.read_text())
    arms = report["results"]["source_only"]["arms"]
    assert set(arms) == {"single-scale", "HRDA"}
    for stats in arms.values():
        assert stats["min_s"] <= stats["median_s"] <= stats["max_s"] and stats["step_memory_mib"] > 0
    ratios = report["results"]["source_only"]["ratios"]
    assert ratios["time_hrda_over_single_scale"] > 0 and ratios["step_memory_hrda_over_single_scale"] > 0
