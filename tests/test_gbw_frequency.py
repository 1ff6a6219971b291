"""Median frequency class weighting: the formula, the loss it weights, and the config path that
reads the source class statistics the prepare scripts write."""
import json

import pytest
import torch
import torch.nn.functional as F
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from gbw_panoptic.config import add_gbw_panoptic_config
from gbw_panoptic.gbw import GBWCrossEntropyLoss, median_frequency_weights
from gbw_panoptic.uda import check_uda_config


def test_median_frequency_weights_follow_the_formula_and_sum_to_c():
    pixels = torch.tensor([600.0, 300.0, 100.0, 0.0])  # frequencies 0.6, 0.3, 0.1; class 3 absent
    weights = median_frequency_weights(pixels)
    # median of (0.1, 0.3, 0.6) = 0.3: raw weights 0.5, 1, 3, and 3 for the absent class.
    raw = torch.tensor([0.5, 1.0, 3.0, 3.0])
    torch.testing.assert_close(weights, raw * 4 / raw.sum())
    # An even number of present classes: the median is the mean of the two middle frequencies.
    even = median_frequency_weights([10, 20, 30, 40])
    raw = 0.25 / torch.tensor([0.1, 0.2, 0.3, 0.4])
    torch.testing.assert_close(even, (raw * 4 / raw.sum()).float())
    for bad in ([], [0, 0], [1, -1], [1, float("nan")]):
        with pytest.raises(ValueError, match="class_pixels"):
            median_frequency_weights(bad)


def test_fixed_class_weights_scale_each_pixel_loss_by_its_class():
    torch.manual_seed(0)
    logits, labels = torch.randn(2, 3, 4, 5), torch.randint(0, 3, (2, 4, 5))
    labels[0, 0] = 255
    weights = torch.tensor([0.5, 2.0, 0.5])
    pixel_weights = torch.rand(2, 4, 5)
    loss = GBWCrossEntropyLoss(3, enabled=False, fixed_class_weights=weights)(logits, labels, pixel_weights)
    expected = F.cross_entropy(logits, labels, weight=None, ignore_index=255, reduction="none")
    expected = expected * weights[labels.clamp(max=2)] * pixel_weights * (labels != 255)
    torch.testing.assert_close(loss, expected.mean())
    with pytest.raises(ValueError, match="enabled=False"):
        GBWCrossEntropyLoss(3, enabled=True, fixed_class_weights=weights)
    with pytest.raises(ValueError, match="3 finite weights"):
        GBWCrossEntropyLoss(3, enabled=False, fixed_class_weights=[1.0, 2.0])


def _cfg(repo_root, config: str, *opts):
    cfg = get_cfg()
    add_gbw_panoptic_config(cfg)
    cfg.merge_from_file(str(repo_root / "configs" / "synthetic" / config))
    cfg.merge_from_list(["MODEL.WEIGHTS", "", *opts])
    return cfg


def test_frequency_weighting_config_uses_the_source_class_statistics(repo_root, synthetic_datasets):
    cfg = _cfg(repo_root, "mit_b0_source_only_freq.yaml")
    check_uda_config(cfg)
    model = build_model(cfg)
    stats = json.loads((synthetic_datasets / "synthetic" / "source" / "class_stats.json").read_text())
    pixels = torch.tensor(list(stats["images"].values()), dtype=torch.float64).sum(dim=0)
    expected = median_frequency_weights(pixels)
    torch.testing.assert_close(model.sem_seg_loss.fixed_class_weights, expected)
    rare, frequent = pixels.argmin(), pixels.argmax()
    assert expected[rare] > 1.0 > expected[frequent]
    # The plain config has none; with GBW on the same loss the config is refused, naming both keys.
    assert build_model(_cfg(repo_root, "mit_b0_source_only.yaml")).sem_seg_loss.fixed_class_weights is None
    with pytest.raises(ValueError, match="MODEL.SEM_SEG_HEAD.CLASS_WEIGHTING.*MODEL.GBW.SEM_SEG.ENABLED"):
        check_uda_config(_cfg(repo_root, "mit_b0_source_only_freq.yaml", "MODEL.GBW.SEM_SEG.ENABLED", True))
    with pytest.raises(ValueError, match="'inverse'"):
        check_uda_config(_cfg(repo_root, "mit_b0_source_only.yaml", "MODEL.SEM_SEG_HEAD.CLASS_WEIGHTING", "inverse"))
