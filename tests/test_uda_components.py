"""Unit tests of the UDA building blocks: optimizer groups, EMA teacher, pseudo-labels, ClassMix,
strong augmentation, feature-distance labels, entropy, discriminator, checkpoint files and RNG states,
and the config checks."""
import math
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
    blur_kernel_size,
    class_mix_masks,
    color_jitter,
    downscale_labels,
    ema_alpha,
    entropy_loss,
    entropy_map,
    gaussian_blur,
    get_rng_state,
    hsv_to_rgb,
    mix,
    preserved_rng_state,
    pseudo_labels,
    rgb_to_hsv,
    set_rng_state,
    strong_augment,
)


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


def test_teacher_averages_parameters_only_and_uses_batch_statistics():
    torch.manual_seed(0)
    student = _TinySegmentor()
    teacher = EMATeacher(student, alpha=0.99)
    teacher.train(False)
    batch_norm, dropout = teacher.model.head[1], teacher.model.head[2]
    assert batch_norm.training and not dropout.training and not teacher.model.training
    assert not any(p.requires_grad for p in teacher.parameters())
    with torch.no_grad():
        for param in student.parameters():
            param.add_(torch.randn_like(param))
        student.head[1].running_mean.add_(1.0)
    params_before = [p.clone() for p in teacher.model.parameters()]
    buffers_before = {k: v.clone() for k, v in teacher.model.named_buffers()}
    assert teacher.update(student, iteration=3) == pytest.approx(0.75)
    for value, before, current in zip(teacher.model.parameters(), params_before, student.parameters()):
        torch.testing.assert_close(value, 0.75 * before + 0.25 * current)
    for name, value in teacher.model.named_buffers():
        assert torch.equal(value, buffers_before[name])
    # Batch norm normalises with the statistics of the batch: each output channel has mean 0 (before
    # the affine part, which starts at weight 1, bias 0 in a fresh copy of the head).
    head = EMATeacher(nn.Sequential(nn.Conv2d(3, 2, 1), nn.BatchNorm2d(2), nn.Dropout(0.5)))
    with torch.no_grad():
        out = head(torch.randn(2, 3, 5, 5) * 3 + 7)
    torch.testing.assert_close(out.mean(dim=(0, 2, 3)), torch.zeros(2), atol=1e-5, rtol=0)


def test_pseudo_labels_weights_and_margins():
    logits = torch.full((2, 3, 10, 4), -10.0)
    logits[0, 1] = 10.0  # image 0: every pixel confident, class 1
    logits[1, 2, :5] = 10.0  # image 1: top half confident class 2, bottom half uniform
    logits[1, :, 5:] = 0.0
    pseudo = pseudo_labels(logits, threshold=0.968, ignore_top=2, ignore_bottom=3)
    assert pseudo.labels.dtype == torch.int64 and pseudo.labels.shape == (2, 10, 4)
    assert (pseudo.labels[0] == 1).all() and (pseudo.labels[1, :5] == 2).all()
    # As the reference: one weight for the whole batch, 60 confident pixels of 80.
    torch.testing.assert_close(pseudo.confidence, torch.tensor([0.75, 0.75]))
    assert (pseudo.weights[:, :2] == 0).all() and (pseudo.weights[:, -3:] == 0).all()
    assert (pseudo.weights[:, 2:7] == 0.75).all()
    # Margins larger than the crop are clipped, not an error.
    assert (pseudo_labels(logits, 0.5, ignore_top=50, ignore_bottom=50).weights == 0).all()
    # Padding counts in neither the confident pixels nor the total.
    valid = torch.ones(2, 10, 4, dtype=torch.bool)
    valid[1, 5:] = False
    padded = pseudo_labels(logits, threshold=0.968, valid=valid)
    torch.testing.assert_close(padded.confidence, torch.tensor([1.0, 1.0]))
    assert (padded.weights[1, 5:] == 0).all()


@pytest.mark.parametrize("pixel_weights_in_norms", [False, True])
def test_padding_is_no_pseudo_label_and_leaves_the_gbw_weights_unchanged(pixel_weights_in_norms):
    """A target batch padded to a common size (one crop shorter than the other) gives the same
    pseudo-labels on the real pixels, ignore on the padding, and the same GBW class weights of the
    mixed-batch loss as the unpadded crops; the teacher's confident padding does not count."""
    from gbw_panoptic.gbw import GBWCrossEntropyLoss

    torch.manual_seed(0)
    num_classes, height, width, short = 5, 12, 8, 7
    teacher = torch.randn(2, num_classes, height, width) * 4
    student = torch.randn(2, num_classes, height, width)
    # The padded batch: image 1 has only `short` real rows; the teacher sees black padding below and
    # predicts class 3 there with full confidence.
    valid = torch.ones(2, height, width, dtype=torch.bool)
    valid[1, short:] = False
    padded_teacher = teacher.clone()
    padded_teacher[1, :, short:] = -20.0
    padded_teacher[1, 3, short:] = 20.0
    padded = pseudo_labels(padded_teacher, threshold=0.968, valid=valid, ignore_value=255)
    assert (padded.labels[1, short:] == 255).all() and (padded.weights[1, short:] == 0).all()
    # Unpadded reference: each crop alone at its own size, one confident fraction for both.
    crops = [teacher[0:1], teacher[1:2, :, :short]]
    real = [pseudo_labels(crop, threshold=0.968) for crop in crops]
    assert torch.equal(padded.labels[0], real[0].labels[0])
    assert torch.equal(padded.labels[1, :short], real[1].labels[0])
    confident = sum(float((p.max_probs >= 0.968).sum()) for p in real)
    torch.testing.assert_close(padded.confidence, torch.full((2,), confident / (height * width + short * width)))

    def gbw_weights(logits: torch.Tensor, labels: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        loss = GBWCrossEntropyLoss(num_classes, lam=1.0, lam_mode="relative", pixel_weights_in_norms=pixel_weights_in_norms)
        loss(logits, labels, weights)
        return loss.last_weights

    with_padding = gbw_weights(student, padded.labels, padded.weights)
    # The same pixels without the padded rows: both crops cut to `short` rows would lose image 0's
    # rows, so compare against the batch whose padded pixels are simply absent (flattened real pixels).
    real_logits = torch.cat([student[0].flatten(1), student[1, :, :short].flatten(1)], dim=1)
    real_labels = torch.cat([padded.labels[0].flatten(), padded.labels[1, :short].flatten()])
    real_weights = torch.cat([padded.weights[0].flatten(), padded.weights[1, :short].flatten()])
    without_padding = gbw_weights(real_logits[None, :, None], real_labels[None, None], real_weights[None, None])
    torch.testing.assert_close(with_padding, without_padding, rtol=1e-6, atol=1e-7)
    # Padding labelled with the teacher's class 3 (weight 0): N_3 grows, so the authors' rule (every
    # labelled pixel counts) gives other weights; with the pixel weights in the norms it did not matter.
    labelled = padded.labels.clone()
    labelled[1, short:] = 3
    changed = not torch.allclose(gbw_weights(student, labelled, padded.weights), without_padding, atol=1e-4)
    assert changed != pixel_weights_in_norms


def test_class_mix_pastes_whole_classes_and_keeps_images_and_labels_consistent():
    torch.manual_seed(1)
    labels = torch.randint(0, 6, (3, 16, 16))
    labels[0, :4] = 255
    masks = class_mix_masks(labels)
    for index in range(3):
        pasted = labels[index][masks[index]].unique()
        assert masks[index].equal(torch.isin(labels[index], pasted))
    source_images, target_images = torch.rand(3, 3, 16, 16), torch.rand(3, 3, 16, 16)
    target_labels = torch.randint(0, 6, (3, 16, 16))
    mixed_images, mixed_labels = mix(masks, source_images, target_images), mix(masks, labels, target_labels)
    for pixel_mask, image_source in ((masks, source_images), (~masks, target_images)):
        channels_first = (mixed_images.permute(1, 0, 2, 3), image_source.permute(1, 0, 2, 3))
        assert torch.equal(channels_first[0][:, pixel_mask], channels_first[1][:, pixel_mask])
    assert torch.equal(mixed_labels[masks], labels[masks]) and torch.equal(mixed_labels[~masks], target_labels[~masks])
    with pytest.raises(ValueError, match="shapes"):
        mix(masks, labels, target_labels[:, :8])


def test_class_mix_batch_candidates_are_the_label_values_of_the_whole_batch():
    labels = torch.zeros(2, 4, 4, dtype=torch.long)
    labels[0, :2] = 1
    labels[1, :, :2] = 2
    labels[1, 0, 0] = 255  # void is a candidate as well, as in the reference
    batch_values = {0, 1, 2, 255}
    drawn = []
    for seed in range(40):
        torch.manual_seed(seed)
        masks = class_mix_masks(labels)
        for index in range(2):
            # ceil(4 / 2) = 2 of the batch's values per image, possibly absent from it: the mask is
            # the image's pixels of those values.
            pasted = set(labels[index][masks[index]].tolist())
            assert pasted <= batch_values and len(pasted) <= 2
            drawn.append(frozenset(pasted))
    assert frozenset({1}) in drawn and frozenset({2, 255}) in drawn  # values absent from one image


def test_hsv_conversion_on_hand_computed_colours():
    rgb = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.5, 0.0], [0.0, 0.5, 1.0], [0.4, 0.4, 0.4], [0.0, 0.0, 0.0], [0.5, 0.0, 0.25]])
    hsv = torch.tensor(
        [[0.0, 1.0, 1.0], [30 / 360, 1.0, 1.0], [210 / 360, 1.0, 1.0], [0.0, 0.0, 0.4], [0.0, 0.0, 0.0], [330 / 360, 1.0, 0.5]]
    )
    as_image = lambda x: x.T.reshape(3, 1, -1)  # noqa: E731
    torch.testing.assert_close(rgb_to_hsv(as_image(rgb)), as_image(hsv))
    torch.testing.assert_close(hsv_to_rgb(as_image(hsv)), as_image(rgb))
    # Hue is taken modulo one turn: +1/3 of a turn takes red to green, -1/3 to blue.
    shifted = hsv_to_rgb(torch.tensor([[[1 / 3]], [[1.0]], [[1.0]]])), hsv_to_rgb(torch.tensor([[[-1 / 3]], [[1.0]], [[1.0]]]))
    torch.testing.assert_close(shifted[0].flatten(), torch.tensor([0.0, 1.0, 0.0]))
    torch.testing.assert_close(shifted[1].flatten(), torch.tensor([0.0, 0.0, 1.0]))
    colours = torch.rand(2, 3, 8, 8)
    torch.testing.assert_close(hsv_to_rgb(rgb_to_hsv(colours)), colours)


def _jitter_draws(seed: int, batch: int, strength: float = 0.2):
    """The draws color_jitter makes after torch.manual_seed(seed): the batch's uniform draw, then per
    image brightness shift, contrast, saturation, hue shift and the order of the four operations."""
    torch.manual_seed(seed)
    uniform = lambda low, high: float(torch.empty(()).uniform_(low, high))  # noqa: E731
    batch_draw = uniform(0.0, 1.0)
    images = []
    for _ in range(batch):
        brightness = uniform(1 - strength, 1 + strength) - 1
        contrast, saturation = uniform(1 - strength, 1 + strength), uniform(1 - strength, 1 + strength)
        hue = uniform(-strength, strength)
        images.append((brightness, contrast, saturation, hue, torch.randperm(4).tolist()))
    return batch_draw, images


def test_color_jitter_brightness_is_additive_and_contrast_scales_about_zero():
    # Black and mid-grey images: saturation and hue leave grey unchanged, so each output is the
    # hand-computed brightness shift and contrast factor in the drawn order, clamped to [0, 1].
    images = torch.zeros(2, 3, 4, 4)
    images[1] = 0.5 * 255
    checked = 0
    for seed in range(30):
        batch_draw, draws = _jitter_draws(seed, batch=2)
        torch.manual_seed(seed)
        out = color_jitter(images, strength=0.2, probability=0.8) / 255
        if batch_draw >= 0.8:
            assert torch.equal(out * 255, images)
            continue
        for image, grey, (brightness, contrast, _, _, order) in zip(out, (0.0, 0.5), draws):
            value = grey
            for operation in order:
                if operation == 0:
                    value = min(max(value + brightness, 0.0), 1.0)
                elif operation == 1:
                    value = min(max(value * contrast, 0.0), 1.0)
            torch.testing.assert_close(image, torch.full_like(image, value), atol=1e-6, rtol=0)
        checked += 1
    assert checked >= 15


def test_color_jitter_hue_range_is_plus_minus_strength_turns():
    red = torch.zeros(1, 3, 2, 2)
    red[:, 0] = 255.0
    largest_shift = 0.0
    for seed in range(60):
        batch_draw, [(_, _, _, hue, order)] = _jitter_draws(seed, batch=1)
        if batch_draw >= 0.8 or order[-1] != 3:
            continue
        # Brightness, contrast and saturation keep red's hue 0; the hue shift comes last.
        torch.manual_seed(seed)
        out = rgb_to_hsv(color_jitter(red, strength=0.2, probability=0.8)[0] / 255)
        torch.testing.assert_close(out[0], torch.full((2, 2), hue % 1.0), atol=1e-5, rtol=0)
        largest_shift = max(largest_shift, abs(hue))
    assert 0.1 < largest_shift <= 0.2  # beyond s/2, within s


def test_jitter_and_blur_are_decided_once_per_batch():
    images = torch.rand(4, 3, 32, 32) * 255  # blur kernels of 3 pixels
    jittered = blurred = 0
    for seed in range(200):
        torch.manual_seed(seed)
        changed = [not torch.equal(a, b) for a, b in zip(color_jitter(images, 0.2, 0.8), images)]
        assert len(set(changed)) == 1
        jittered += changed[0]
        torch.manual_seed(seed)
        changed = [not torch.equal(a, b) for a, b in zip(gaussian_blur(images), images)]
        assert len(set(changed)) == 1
        blurred += changed[0]
    assert 0.7 < jittered / 200 < 0.9 and 0.4 < blurred / 200 < 0.6
    torch.manual_seed(0)
    assert torch.equal(color_jitter(images, 0.2, 0.0), images)


def test_blur_kernel_size_and_values():
    assert [blur_kernel_size(size) for size in (512, 1024, 128, 100, 101, 5)] == [51, 103, 13, 9, 11, 1]
    impulse = torch.zeros(1, 3, 41, 61)
    impulse[:, :, 20, 30] = 1.0
    for seed in range(20):
        torch.manual_seed(seed)
        if float(torch.empty(()).uniform_(0.0, 1.0)) < 0.5:
            break
    sigma = float(torch.empty(()).uniform_(0.15, 1.15))
    torch.manual_seed(seed)
    out = gaussian_blur(impulse)
    # A sampled, normalised Gaussian of the drawn sigma along each axis (kernels 5 x 7 here).
    def kernel(length):
        values = torch.tensor([math.exp(-0.5 * (x / sigma) ** 2) for x in range(-(length // 2), length // 2 + 1)])
        return values / values.sum()
    expected = torch.zeros(41, 61)
    expected[18:23, 27:34] = torch.outer(kernel(5), kernel(7))
    torch.testing.assert_close(out[0, 0], expected.double().float(), atol=1e-6, rtol=0)


def test_strong_augment_range_and_determinism():
    images = torch.rand(2, 3, 20, 30) * 255
    torch.manual_seed(3)
    first = strong_augment(images, 0.2, 1.0)
    torch.manual_seed(3)
    second = strong_augment(images, 0.2, 1.0)
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


def test_rng_state_round_trip_and_preservation():
    state = get_rng_state()
    draws = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(state)
    with preserved_rng_state():
        torch.rand(100), np.random.rand(5), random.random()
    assert torch.equal(torch.rand(3), draws[0])
    assert np.array_equal(np.random.rand(3), draws[1])
    assert random.random() == draws[2]


@pytest.mark.parametrize(
    "overrides, named",
    [
        ({"UDA.METHOD": "fixmatch"}, "UDA.METHOD='fixmatch'"),
        ({"UDA.PSEUDO_THRESHOLD": 1.0}, "UDA.PSEUDO_THRESHOLD=1.0"),
        ({"UDA.PSEUDO_THRESHOLD": 0.0}, "UDA.PSEUDO_THRESHOLD=0.0"),
        ({"DATASETS.TARGET_TRAIN": ()}, "DATASETS.TARGET_TRAIN"),
        ({"UDA.METHOD": "advent", "DATASETS.TARGET_TRAIN": ()}, "UDA.METHOD='advent'"),
        ({"UDA.EMA_ALPHA": 1.0}, "UDA.EMA_ALPHA=1.0"),
        ({"UDA.PSEUDO_WEIGHT_IGNORE_TOP": -1}, "UDA.PSEUDO_WEIGHT_IGNORE_TOP=-1"),
        ({"DATASETS.TRAIN": ()}, "DATASETS.TRAIN"),
        ({"DATALOADER.RCS.MIN_CROP_RATIO": -1.0}, "DATALOADER.RCS.MIN_CROP_RATIO=-1.0"),
        ({"UDA.PSEUDO_LABEL_MARGINS": [1, 2]}, "UDA.PSEUDO_LABEL_MARGINS=[1, 2]"),
        ({"MODEL.SYNC_BN": True, "MODEL.INS_EMBED_HEAD.NORM": "GN"}, "MODEL.INS_EMBED_HEAD.NORM='GN'"),
    ],
)
def test_bad_configs_name_the_key_and_value(overrides, named):
    with pytest.raises(ValueError) as error:
        check_uda_config(_uda_cfg(**overrides))
    assert named in str(error.value)


def test_valid_configs_pass():
    check_uda_config(_uda_cfg())
    check_uda_config(_uda_cfg(**{"UDA.METHOD": "source_only", "DATASETS.TARGET_TRAIN": ()}))
    # The semantic-only model's unused instance decoder may keep another norm.
    check_uda_config(
        _uda_cfg(**{"MODEL.SYNC_BN": True, "MODEL.INS_EMBED_HEAD.ENABLED": False, "MODEL.INS_EMBED_HEAD.NORM": "GN"})
    )


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
