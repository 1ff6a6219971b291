"""Unit tests of the UDA building blocks: optimizer groups, EMA teacher, pseudo-labels, ClassMix,
strong augmentation, feature-distance labels, entropy, discriminator, checkpoint files and RNG states,
and the config checks."""
import os
import random

import numpy as np
import pytest
import torch
from torch import nn

from detectron2.config import get_cfg

from gbw_panoptic.config import add_gbw_panoptic_config
from gbw_panoptic.uda import (
    EMATeacher,
    OutputSpaceDiscriminator,
    build_param_groups,
    check_uda_config,
    class_mix_masks,
    downscale_labels,
    ema_alpha,
    entropy_loss,
    entropy_map,
    get_rng_state,
    mix,
    preserved_rng_state,
    pseudo_labels,
    set_rng_state,
    strong_augment,
    uda_method_names,
)
from gbw_panoptic.uda.checkpoint import atomic_write


class _TinySegmentor(nn.Module):
    """A backbone with a norm layer and a position embedding, and a head with batch norm."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.LayerNorm([4]))
        self.backbone.pos_embed = nn.Parameter(torch.zeros(4))
        self.head = nn.Sequential(nn.Conv2d(4, 2, 1), nn.BatchNorm2d(2), nn.Dropout(0.5))


def _uda_cfg(**overrides):
    cfg = get_cfg()
    add_gbw_panoptic_config(cfg)
    cfg.DATASETS.TRAIN = ("synthetic_source_panoptic_train",)
    cfg.DATASETS.TARGET_TRAIN = ("synthetic_target_panoptic_train",)
    for key, value in overrides.items():
        node = cfg
        *parents, leaf = key.split(".")
        for parent in parents:
            node = node[parent]
        node[leaf] = value
    return cfg


def test_param_groups_split_heads_and_no_decay():
    model = _TinySegmentor()
    groups = {g["name"]: g for g in build_param_groups(model, 1e-3, 0.01, 0.0, 10.0)}
    assert set(groups) == {"backbone", "backbone_no_decay", "head", "head_no_decay"}
    ids = lambda params: {id(p) for p in params}  # noqa: E731
    assert ids(groups["backbone"]["params"]) == ids(model.backbone[0].parameters())
    no_decay = [*model.backbone[1].parameters(), model.backbone.pos_embed]
    assert ids(groups["backbone_no_decay"]["params"]) == ids(no_decay)
    assert ids(groups["head"]["params"]) == ids(model.head[0].parameters())
    assert ids(groups["head_no_decay"]["params"]) == ids(model.head[1].parameters())
    assert groups["backbone"]["lr"] == pytest.approx(1e-3) and groups["head"]["lr"] == pytest.approx(1e-2)
    assert groups["backbone"]["weight_decay"] == 0.01 and groups["head_no_decay"]["weight_decay"] == 0.0
    assert sum(len(g["params"]) for g in groups.values()) == len(list(model.parameters()))


def test_ema_alpha_ramp():
    assert ema_alpha(0, 0.999) == 0.0
    assert ema_alpha(1, 0.999) == 0.5
    assert ema_alpha(9, 0.999) == pytest.approx(0.9)
    assert ema_alpha(100000, 0.999) == 0.999


def test_teacher_follows_ema_formula_and_stays_in_eval():
    torch.manual_seed(0)
    student = _TinySegmentor()
    teacher = EMATeacher(student, alpha=0.99)
    teacher.train()
    assert not teacher.model.training and not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        for param in student.parameters():
            param.add_(torch.randn_like(param))
        student.head[1].running_mean.add_(1.0)
    before = {k: v.clone() for k, v in teacher.model.state_dict().items()}
    coefficient = teacher.update(student, iteration=3)
    assert coefficient == pytest.approx(0.75)
    for name, value in teacher.model.state_dict().items():
        expected = student.state_dict()[name]
        if value.dtype.is_floating_point:
            expected = 0.75 * before[name] + 0.25 * expected
        torch.testing.assert_close(value, expected)
    assert not torch.equal(teacher.model.backbone[0].weight, student.backbone[0].weight)


def test_pseudo_labels_weights_and_margins():
    logits = torch.full((2, 3, 10, 4), -10.0)
    logits[0, 1] = 10.0  # image 0: every pixel confident, class 1
    logits[1, 2, :5] = 10.0  # image 1: top half confident class 2, bottom half uniform
    logits[1, :, 5:] = 0.0
    pseudo = pseudo_labels(logits, threshold=0.968, ignore_top=2, ignore_bottom=3)
    assert pseudo.labels.dtype == torch.int64 and pseudo.labels.shape == (2, 10, 4)
    assert (pseudo.labels[0] == 1).all() and (pseudo.labels[1, :5] == 2).all()
    torch.testing.assert_close(pseudo.confidence, torch.tensor([1.0, 0.5]))
    assert (pseudo.weights[:, :2] == 0).all() and (pseudo.weights[:, -3:] == 0).all()
    assert (pseudo.weights[0, 2:7] == 1.0).all() and (pseudo.weights[1, 2:7] == 0.5).all()
    assert ((pseudo.weights >= 0) & (pseudo.weights <= 1)).all()
    # Margins larger than the crop are clipped, not an error.
    assert (pseudo_labels(logits, 0.5, ignore_top=50, ignore_bottom=50).weights == 0).all()


def test_class_mix_takes_half_the_classes_and_keeps_images_and_labels_consistent():
    torch.manual_seed(1)
    labels = torch.randint(0, 6, (3, 16, 16))
    labels[0, :4] = 255
    labels[2] = 255  # all void: nothing pasted
    masks = class_mix_masks(labels)
    for index in range(2):
        present = set(labels[index].unique().tolist()) - {255}
        pasted = set(labels[index][masks[index]].unique().tolist())
        assert len(pasted) == (len(present) + 1) // 2
        assert masks[index].equal(torch.isin(labels[index], torch.tensor(sorted(pasted))))
    assert not masks[2].any()
    source_images, target_images = torch.rand(3, 3, 16, 16), torch.rand(3, 3, 16, 16)
    target_labels = torch.randint(0, 6, (3, 16, 16))
    mixed_images, mixed_labels = mix(masks, source_images, target_images), mix(masks, labels, target_labels)
    for pixel_mask, image_source in ((masks, source_images), (~masks, target_images)):
        channels_first = (mixed_images.permute(1, 0, 2, 3), image_source.permute(1, 0, 2, 3))
        assert torch.equal(channels_first[0][:, pixel_mask], channels_first[1][:, pixel_mask])
    assert torch.equal(mixed_labels[masks], labels[masks]) and torch.equal(mixed_labels[~masks], target_labels[~masks])
    with pytest.raises(ValueError, match="shapes"):
        mix(masks, labels, target_labels[:, :8])


def test_strong_augment_range_and_determinism():
    images = torch.rand(2, 3, 20, 30) * 255
    assert torch.equal(strong_augment(images, 0.0, 0.0, blur=False), images)
    torch.manual_seed(3)
    first = strong_augment(images, 0.2, 1.0, blur=True)
    torch.manual_seed(3)
    second = strong_augment(images, 0.2, 1.0, blur=True)
    assert torch.equal(first, second) and first.shape == images.shape
    assert first.min() >= 0 and first.max() <= 255 and not torch.allclose(first, images)


def test_downscale_labels_majority_and_min_ratio():
    labels = torch.full((1, 4, 8), 255, dtype=torch.long)
    labels[0, :2, :2] = 3  # cell (0,0): 4/4 class 3
    labels[0, :2, 2:4] = torch.tensor([[5, 5], [5, 1]])  # cell (0,1): 3/4 class 5
    labels[0, :2, 4:6] = torch.tensor([[5, 5], [1, 1]])  # cell (0,2): 2/4, below 0.75
    cells = downscale_labels(labels, factor=2, num_classes=6, min_ratio=0.75)
    assert cells.shape == (1, 2, 4)
    assert cells[0, 0].tolist() == [3, 5, 255, 255] and (cells[0, 1] == 255).all()
    with pytest.raises(ValueError, match="divisible"):
        downscale_labels(labels, factor=3, num_classes=6, min_ratio=0.75)


def test_entropy_map_and_loss():
    uniform = torch.zeros(1, 4, 3, 3)
    assert entropy_loss(uniform).item() == pytest.approx(1.0)
    confident = torch.zeros(1, 4, 3, 3)
    confident[:, 0] = 50.0
    assert entropy_loss(confident).item() == pytest.approx(0.0, abs=1e-6)
    maps = entropy_map(torch.randn(2, 5, 4, 4).half())
    assert maps.dtype == torch.float32 and (maps >= 0).all()
    assert (maps.sum(1) <= 1 + 1e-6).all()


def test_discriminator_output_shape():
    disc = OutputSpaceDiscriminator(num_classes=19, channels=8)
    assert disc(torch.rand(2, 19, 64, 96)).shape == (2, 1, 2, 3)


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = tmp_path / "last_checkpoint"
    with atomic_write(str(path), "w") as f:
        f.write("model_0000001.pth")
    with pytest.raises(RuntimeError):
        with atomic_write(str(path), "w") as f:
            f.write("partial")
            raise RuntimeError("killed")
    assert path.read_text() == "model_0000001.pth"
    assert os.listdir(tmp_path) == ["last_checkpoint"]


def test_rng_state_round_trip_and_preservation():
    state = get_rng_state()
    draws = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(state)
    with preserved_rng_state():
        torch.rand(100), np.random.rand(5), random.random()
    assert torch.equal(torch.rand(3), draws[0])
    assert np.array_equal(np.random.rand(3), draws[1])
    assert random.random() == draws[2]


def test_registered_methods():
    assert uda_method_names() == ["advent", "advseg", "dacs", "minent", "source_only"]


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"UDA.METHOD": "fixmatch"}, "UDA.METHOD='fixmatch' is unknown"),
        ({"UDA.PSEUDO_THRESHOLD": 1.0}, "UDA.PSEUDO_THRESHOLD=1.0 must lie strictly between 0 and 1"),
        ({"UDA.PSEUDO_THRESHOLD": 0.0}, "UDA.PSEUDO_THRESHOLD=0.0"),
        ({"DATASETS.TARGET_TRAIN": ()}, "DATASETS.TARGET_TRAIN is empty"),
        ({"UDA.METHOD": "advent", "DATASETS.TARGET_TRAIN": ()}, "UDA.METHOD='advent' trains on target images"),
        ({"UDA.EMA_ALPHA": 1.0}, "UDA.EMA_ALPHA=1.0"),
        ({"UDA.PSEUDO_WEIGHT_IGNORE_TOP": -1}, "UDA.PSEUDO_WEIGHT_IGNORE_TOP=-1"),
        ({"DATASETS.TRAIN": ()}, "DATASETS.TRAIN is empty"),
    ],
)
def test_bad_configs_raise_clear_errors(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_uda_config(_uda_cfg(**overrides))


def test_valid_configs_pass():
    check_uda_config(_uda_cfg())
    check_uda_config(_uda_cfg(**{"UDA.METHOD": "source_only", "DATASETS.TARGET_TRAIN": ()}))


@pytest.mark.parametrize("clip_type", ["value", "norm"])
def test_gradient_clipping(clip_type):
    from gbw_panoptic.uda.trainer import _clip_gradients

    clip_cfg = get_cfg().SOLVER.CLIP_GRADIENTS.clone()
    clip_cfg.CLIP_TYPE, clip_cfg.CLIP_VALUE = clip_type, 0.5
    param = nn.Parameter(torch.zeros(4))
    param.grad = torch.tensor([3.0, -4.0, 0.1, 0.0])
    _clip_gradients([param], clip_cfg)
    if clip_type == "value":
        assert param.grad.tolist() == pytest.approx([0.5, -0.5, 0.1, 0.0])
    else:
        assert param.grad.norm().item() == pytest.approx(0.5, rel=1e-4)
    clip_cfg.CLIP_TYPE = "full_model"
    with pytest.raises(ValueError, match="CLIP_TYPE='full_model'"):
        _clip_gradients([param], clip_cfg)
