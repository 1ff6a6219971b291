"""GBWTopDownPanopticSegmentor (DAFormer semantic head + Detectron2's Mask R-CNN): the data targets, GBW on
the box classifier and the mask loss against the GBW core, EDAPS's panoptic fusion, the UDA interface, and
DACS + GBW training, resuming and evaluation through tools/train_net.py's code path."""
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from detectron2.config import get_cfg
from detectron2.modeling import build_model
from detectron2.modeling.roi_heads.mask_head import mask_rcnn_loss
from detectron2.structures import BitMasks, Boxes, Instances
from detectron2.utils.events import EventStorage

from gbw_panoptic.config import add_gbw_panoptic_config
from gbw_panoptic.data.instance_masks import InstanceMaskTargetGenerator
from gbw_panoptic.gbw import ce_grad_sq_norms, qp_class_weights
from gbw_panoptic.modeling.post_processing import merge_semantic_and_instances
from gbw_panoptic.modeling.roi_heads import GBWFastRCNNOutputLayers, class_weighted_mask_loss
from gbw_panoptic.modeling.top_down import paint_instance_masks
from gbw_panoptic.uda.cli import main, setup
from gbw_panoptic.uda.validate import check_uda_config
from test_uda_training import _Killed, _args, _metrics, _train, assert_same_training_state

REPO_ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC = "configs/synthetic/maskrcnn_dacs_gbw.yaml"
THING_IDS = list(range(11, 19))


def _cfg(config: str = SYNTHETIC, *opts: str):
    cfg = get_cfg()
    add_gbw_panoptic_config(cfg)
    cfg.merge_from_file(str(REPO_ROOT / config))
    cfg.merge_from_list(list(opts))
    return cfg


def _gt_instances(height: int, width: int, boxes, classes) -> Instances:
    """Instances with one rectangular mask per (x0, y0, x1, y1) box."""
    masks = torch.zeros((len(boxes), height, width), dtype=torch.bool)
    for mask, (x0, y0, x1, y1) in zip(masks, boxes):
        mask[y0:y1, x0:x1] = True
    instances = Instances((height, width))
    instances.gt_masks = BitMasks(masks)
    instances.gt_boxes = instances.gt_masks.get_bounding_boxes()
    instances.gt_classes = torch.as_tensor(classes, dtype=torch.int64)
    return instances


def _source_batch(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    instances = [
        _gt_instances(96, 128, [(10, 10, 40, 60), (70, 30, 120, 70)], [0, 2]),
        _gt_instances(96, 128, [(5, 40, 30, 90)], [7]),
    ]
    return [
        {
            "image": torch.randint(0, 256, (3, 96, 128), generator=generator, dtype=torch.uint8),
            "sem_seg": torch.randint(0, 19, (96, 128), generator=generator),
            "instances": x,
        }
        for x in instances
    ]


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model(_cfg(SYNTHETIC))


# --- data ---------------------------------------------------------------------------------------------


def test_instance_targets_from_panoptic_labels():
    """Thing segments become instances (classes from 0, Detectron2 boxes); crowd is ignored in the
    semantic labels and is no instance; a thing only 1 pixel wide is dropped (as EDAPS); stuff is no instance."""
    panoptic = np.zeros((20, 30), dtype=np.int64)
    panoptic[:, :10] = 1  # road (stuff)
    panoptic[2:8, 12:20] = 2  # car
    panoptic[10:18, 22:26] = 3  # person
    panoptic[12:16, 27] = 4  # bicycle, one pixel wide
    panoptic[0:4, 25:30] = 5  # crowd of persons
    segments = [
        {"id": 1, "category_id": 0, "iscrowd": 0},
        {"id": 2, "category_id": 13, "iscrowd": 0},
        {"id": 3, "category_id": 11, "iscrowd": 0},
        {"id": 4, "category_id": 18, "iscrowd": 0},
        {"id": 5, "category_id": 11, "iscrowd": 1},
        {"id": 6, "category_id": 14, "iscrowd": 0},  # cropped away
    ]
    targets = InstanceMaskTargetGenerator(THING_IDS, 255, ignore_crowd_in_semantic=True)(panoptic, segments)
    instances = targets["instances"]
    assert instances.image_size == (20, 30)
    assert instances.gt_classes.tolist() == [2, 0]
    assert instances.gt_boxes.tensor.tolist() == [[12, 2, 20, 8], [22, 10, 26, 18]]
    assert torch.equal(instances.gt_masks.tensor[0], torch.as_tensor(panoptic == 2))
    semantic = targets["sem_seg"]
    assert (semantic[:, :10] == 0).all() and (semantic[2:8, 12:20] == 13).all() and (semantic[12:16, 27] == 18).all()
    assert (semantic[0:4, 25:30] == 255).all() and semantic[19, 29] == 255
    assert torch.equal(targets["sem_seg_weights"], torch.ones(20, 30))
    kept = InstanceMaskTargetGenerator(THING_IDS, 255, ignore_crowd_in_semantic=False)(panoptic, segments)
    assert (kept["sem_seg"][0:4, 25:30] == 11).all() and len(kept["instances"]) == 2


def test_source_mapper_gives_instances(synthetic_datasets):
    from detectron2.data import DatasetCatalog

    from gbw_panoptic.data.mapper import GBWPanopticDatasetMapper

    cfg = _cfg(
        SYNTHETIC, "INPUT.RANDOM_FLIP", "none", "INPUT.RESIZE_RATIO_RANGE", "[1.0, 1.0]", "INPUT.CROP.ENABLED", "False"
    )
    record = DatasetCatalog.get("synthetic_source_panoptic_train")[0]
    mapped = GBWPanopticDatasetMapper(cfg, is_train=True, domain="source")(record)
    assert "center" not in mapped and mapped["sem_seg"].shape == mapped["image"].shape[1:]
    instances = mapped["instances"]
    assert len(instances) > 0 and instances.image_size == tuple(mapped["image"].shape[1:])
    for mask, label in zip(instances.gt_masks.tensor, instances.gt_classes.tolist()):
        assert (mapped["sem_seg"][mask] == THING_IDS[label]).all()
    target = GBWPanopticDatasetMapper(cfg, is_train=True, load_labels=False, domain="target")(record)
    assert "instances" not in target and "sem_seg" not in target


# --- GBW on the box classifier and the mask loss ------------------------------------------------------


def _proposals(num: int, num_classes: int, seed: int):
    generator = torch.Generator().manual_seed(seed)
    proposals = Instances((64, 64))
    proposals.proposal_boxes = Boxes(torch.tensor([[0.0, 0.0, 20.0, 20.0]]).repeat(num, 1))
    proposals.gt_boxes = Boxes(torch.tensor([[2.0, 1.0, 22.0, 18.0]]).repeat(num, 1))
    # Background (num_classes) most frequent, one class absent.
    foreground = torch.randint(0, num_classes - 1, (num - num // 2,), generator=generator)
    proposals.gt_classes = torch.cat([torch.full((num // 2,), num_classes), foreground])
    return proposals


@pytest.mark.parametrize("lam_mode", ["relative", "absolute"])
def test_box_classifier_gbw_weights_are_the_core_weights(lam_mode):
    cfg = _cfg(SYNTHETIC, "MODEL.GBW.BOX_CLS.LAMBDA_MODE", lam_mode, "MODEL.GBW.BOX_CLS.LAMBDA", "0.5")
    torch.manual_seed(0)
    predictor = GBWFastRCNNOutputLayers(cfg, build_model(cfg).roi_heads.box_head.output_shape)
    proposals = [_proposals(40, 8, 1), _proposals(30, 8, 2)]
    scores = torch.randn(70, 9) * 3
    deltas = torch.randn(70, 32)
    with EventStorage(0):
        losses = predictor.losses((scores, deltas), proposals)
    labels = torch.cat([p.gt_classes for p in proposals])
    # The GBW core on the same samples: the proposals as the pixels of a [1, 9, 70, 1] logit map.
    sq_norms = ce_grad_sq_norms(scores.t()[None, :, :, None], labels[None, :, None])
    expected = qp_class_weights(sq_norms, 0.5, lam_mode)
    torch.testing.assert_close(predictor.cls_loss.last_weights, expected)
    assert not torch.allclose(expected, torch.ones(9))
    per_sample = F.cross_entropy(scores, labels, reduction="none")
    torch.testing.assert_close(losses["loss_cls"], (per_sample * expected[labels]).mean())

    predictor.cls_loss.enabled = False
    with EventStorage(0):
        plain = predictor.losses((scores, deltas), proposals)
    torch.testing.assert_close(plain["loss_cls"], F.cross_entropy(scores, labels))
    torch.testing.assert_close(plain["loss_box_reg"], losses["loss_box_reg"])


def _mask_proposals():
    """Two images' positive proposals with ground-truth masks (classes 0, 2, 2 and 5)."""
    first = Instances((40, 40))
    first.proposal_boxes = Boxes(torch.tensor([[0.0, 0.0, 20.0, 20.0], [5.0, 5.0, 35.0, 30.0], [10.0, 0, 40, 40]]))
    first.gt_classes = torch.tensor([0, 2, 2])
    masks = torch.zeros((3, 40, 40), dtype=torch.bool)
    masks[0, 2:15, 3:18] = True
    masks[1, 8:28, 10:30] = True
    masks[2, 0:35, 15:25] = True
    first.gt_masks = BitMasks(masks)
    second = Instances((40, 40))
    second.proposal_boxes = Boxes(torch.tensor([[4.0, 4.0, 36.0, 36.0]]))
    second.gt_classes = torch.tensor([5])
    second.gt_masks = BitMasks(torch.zeros((1, 40, 40), dtype=torch.bool).index_fill_(1, torch.arange(10, 30), True))
    return [first, second]


def test_mask_gbw_weights_are_the_norms_of_the_bce_gradient():
    """The mask loss's class weights: g_c^2 of the gradient (autograd) of sum_c L_c, L_c the mean binary
    cross-entropy of the mask pixels of class-c proposals (N_c + 1 in the denominator), then the QP."""
    cfg = _cfg(SYNTHETIC, "MODEL.GBW.MASK.LAMBDA", "0.3")
    torch.manual_seed(0)
    head = build_model(cfg).roi_heads.mask_head
    instances = _mask_proposals()
    logits = torch.randn(4, 8, 28, 28) * 2
    loss = class_weighted_mask_loss(logits, instances, head.class_weighting)

    classes = torch.tensor([0, 2, 2, 5])
    targets = torch.cat([x.gt_masks.crop_and_resize(x.proposal_boxes.tensor, 28) for x in instances]).float()
    selected = logits[torch.arange(4), classes].clone().requires_grad_(True)
    pixel_losses = F.binary_cross_entropy_with_logits(selected, targets, reduction="none")
    counts = torch.bincount(classes, minlength=8).float() * 28 * 28
    total = sum(pixel_losses[classes == c].sum() / (counts[c] + 1) for c in range(8))
    (gradient,) = torch.autograd.grad(total, selected)
    sq_norms = torch.stack([gradient[classes == c].square().sum() for c in range(8)])
    expected = qp_class_weights(sq_norms, 0.3, "relative")
    torch.testing.assert_close(head.class_weighting.last_weights, expected, rtol=1e-5, atol=1e-6)
    assert expected[[0, 2, 5]].min() > expected[[1, 3, 4, 6, 7]].max()  # present classes outweigh absent ones
    torch.testing.assert_close(loss, (pixel_losses.detach() * expected[classes].view(4, 1, 1)).mean())

    head.class_weighting.enabled = False
    with EventStorage(0):
        head.train()
        plain = head(torch.randn(4, 64, 14, 14), instances)["loss_mask"]
        features = torch.randn(4, 64, 14, 14)
        detectron2_loss = mask_rcnn_loss(head.layers(features), instances)
        torch.testing.assert_close(head(features, instances)["loss_mask"], detectron2_loss)
    assert math.isfinite(float(plain))


def test_mask_loss_without_positive_proposals_is_zero_and_connected():
    cfg = _cfg(SYNTHETIC)
    head = build_model(cfg).roi_heads.mask_head
    logits = torch.randn(0, 8, 28, 28, requires_grad=True)
    no_positives = [Instances((40, 40), gt_classes=torch.zeros(0, dtype=torch.long))]
    loss = class_weighted_mask_loss(logits, no_positives, head.class_weighting)
    assert float(loss) == 0.0 and loss.requires_grad
    torch.testing.assert_close(head.class_weighting.last_weights, torch.ones(8))


# --- panoptic fusion ----------------------------------------------------------------------------------


def test_paint_instance_masks_class_order_score_order_and_threshold():
    masks = torch.zeros((4, 4, 6), dtype=torch.bool)
    masks[0, :, 0:3] = True  # class 13, score 0.99
    masks[1, :, 2:5] = True  # class 11, score 0.97
    masks[2, :, 1:4] = True  # class 13, score 0.96: painted after mask 0 (same class, lower score)
    masks[3, :, 5] = True  # class 11, score 0.5: below the threshold
    classes = torch.tensor([13, 11, 13, 11])
    scores = torch.tensor([0.99, 0.97, 0.96, 0.5])
    painted = paint_instance_masks(masks, classes, scores, 0.95)
    # Order: mask 1 (class 11) -> 1, mask 0 -> 2, mask 2 -> 3.
    assert painted[0].tolist() == [2, 3, 3, 3, 1, 0]
    assert paint_instance_masks(masks, classes, scores, 1.0).eq(0).all()


def _edaps_merge(sem_seg, instance_ids, thing_ids, label_divisor, stuff_area, void_label):
    """EDAPS's merge_semantic_and_instance, loop by loop (tools/panoptic_deeplab/post_processing)."""
    panoptic = torch.full_like(sem_seg, void_label)
    thing_seg = instance_ids > 0
    semantic_thing = torch.zeros_like(sem_seg, dtype=torch.bool)
    for thing in thing_ids:
        semantic_thing |= sem_seg == thing
    tracker = {}
    for instance in torch.unique(instance_ids).tolist():
        if instance == 0:
            continue
        thing_mask = (instance_ids == instance) & semantic_thing
        if not thing_mask.any():
            continue
        class_id = int(torch.mode(sem_seg[thing_mask].view(-1)).values)
        tracker[class_id] = tracker.get(class_id, 0) + 1
        panoptic[thing_mask] = class_id * label_divisor + tracker[class_id]
    for class_id in torch.unique(sem_seg).tolist():
        if class_id in thing_ids:
            continue
        stuff_mask = (sem_seg == class_id) & ~thing_seg
        if stuff_mask.sum() >= stuff_area:
            panoptic[stuff_mask] = class_id * label_divisor
    return panoptic


@pytest.mark.parametrize("seed", range(5))
def test_merge_semantic_and_instances_matches_edaps(seed):
    generator = torch.Generator().manual_seed(seed)
    # Blocky maps, so that classes form regions and instances overlap stuff and several things.
    sem_seg = torch.randint(0, 19, (6, 8), generator=generator).repeat_interleave(4, 0).repeat_interleave(4, 1)
    sem_seg[torch.rand(sem_seg.shape, generator=generator) < 0.2] = 12
    instance_ids = torch.randint(0, 7, (4, 5), generator=generator).repeat_interleave(6, 0).repeat_interleave(7, 1)
    instance_ids = instance_ids[:24, :32]
    expected = _edaps_merge(sem_seg, instance_ids, THING_IDS, 1000, 20, -1)
    torch.testing.assert_close(merge_semantic_and_instances(sem_seg, instance_ids, THING_IDS, 1000, 20, -1), expected)


# --- the model ----------------------------------------------------------------------------------------

TOP_DOWN_CONFIGS = sorted(str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "configs").rglob("maskrcnn_*.yaml"))


def _check_builds_and_predicts(config: str) -> None:
    cfg = _cfg(config, "MODEL.DEVICE", "cpu", "MODEL.MIT.PRETRAINED", "", "MODEL.WEIGHTS", "")
    model = build_model(cfg).eval()
    with torch.no_grad():
        (output,) = model([{"image": torch.zeros(3, 64, 64), "height": 32, "width": 48}])
    assert output["sem_seg"].shape == (19, 32, 48) and output["panoptic_seg"][0].shape == (32, 48)


def test_top_down_configs_exist():
    names = {Path(c).relative_to("configs").as_posix() for c in TOP_DOWN_CONFIGS}
    expected = [f"{folder}/maskrcnn_{name}.yaml" for folder in ("synthia2cityscapes", "synthia2mapillary")
                for name in ("mit_b5", "mit_b5_gbw")]  # fmt: skip
    synthetic = [f"synthetic/maskrcnn_{name}.yaml" for name in ("source_only", "dacs", "dacs_gbw")]
    assert {*synthetic, *expected} <= names


@pytest.mark.parametrize("config", [c for c in TOP_DOWN_CONFIGS if c.startswith("configs/synthetic/")])
def test_synthetic_top_down_configs_build_and_predict(config):
    _check_builds_and_predicts(config)


@pytest.mark.slow
def test_full_size_top_down_model_builds_and_predicts():
    """MiT-B5 + Mask R-CNN as EDAPS (the other full-size top-down configs differ in data and GBW keys only,
    checked by merging them in tests/test_modeling_meta_arch.py)."""
    _check_builds_and_predicts("configs/synthia2cityscapes/maskrcnn_mit_b5_gbw.yaml")


def test_config_errors_name_the_key():
    with pytest.raises(ValueError, match="MODEL.MASK_ON"):
        build_model(_cfg(SYNTHETIC, "MODEL.MASK_ON", "False"))
    with pytest.raises(ValueError, match="MODEL.INS_EMBED_HEAD.ENABLED"):
        build_model(_cfg(SYNTHETIC, "MODEL.INS_EMBED_HEAD.ENABLED", "True"))
    with pytest.raises(ValueError, match="MODEL.ROI_HEADS.NUM_CLASSES is 7"):
        build_model(_cfg(SYNTHETIC, "MODEL.ROI_HEADS.NUM_CLASSES", "7"))
    with pytest.raises(ValueError, match="UDA.METHOD='advent': MODEL.META_ARCHITECTURE 'GBWTopDownPanopticSegmentor'"):
        check_uda_config(_cfg(SYNTHETIC, "UDA.METHOD", "advent"))
    check_uda_config(_cfg(SYNTHETIC, "UDA.METHOD", "source_only"))
    with pytest.raises(ValueError, match="MODEL.FPN.IN_FEATURES"):
        build_model(_cfg(SYNTHETIC, "MODEL.FPN.IN_FEATURES", "['res1', 'res2']"))


def test_source_losses_gradients_and_gbw_class_weights(model):
    model.train()
    batch = _source_batch()
    model.zero_grad()
    with EventStorage(0):
        losses = model(batch)
        sum(losses.values()).backward()
    assert set(losses) == {"loss_sem_seg", "loss_rpn_cls", "loss_rpn_loc", "loss_cls", "loss_box_reg", "loss_mask"}
    assert all(math.isfinite(float(v)) and float(v) > 0 for v in losses.values())
    without_grad = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not without_grad
    class_weights = {name: float(value) for name, value in model.gbw_class_weights().items()}
    for loss, count in (("sem_seg", 19), ("box_cls", 9), ("mask", 8)):
        weights = [v for k, v in class_weights.items() if k.startswith(f"{loss}/")]
        assert len(weights) == count and sum(weights) == pytest.approx(count, rel=1e-4), loss
    assert "box_cls/background" in class_weights and "mask/bicycle" in class_weights
    assert len(class_weights) == 19 + 9 + 8


def test_mixed_images_train_the_semantic_branch_only(model):
    """DACS's mixed dicts carry no instances: only the semantic loss, whose graph reaches every parameter
    (DDP runs without its unused-parameter search) with zero gradients on the instance branch; a batch
    where one image has instances trains the instance branch on that image only."""
    model.train()
    mixed = [{k: v for k, v in x.items() if k != "instances"} for x in _source_batch()]
    model.zero_grad()
    with EventStorage(0):
        model(_source_batch())  # a pass that computes box and mask weights
        losses = model(mixed)
        assert set(losses) == {"loss_sem_seg"}
        # Only the semantic loss ran: the box and mask weights of the earlier pass are not this pass's.
        assert {name.split("/")[0] for name in model.gbw_class_weights()} == {"sem_seg"}
        losses["loss_sem_seg"].backward()
        assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
        instance_branch = (model.neck, model.proposal_generator, model.roi_heads)
        assert all(not p.grad.any() for module in instance_branch for p in module.parameters())
        assert any(p.grad.any() for p in model.sem_seg_head.parameters())
        partial = model([_source_batch()[0], mixed[1]])
    assert "loss_mask" in partial and math.isfinite(float(partial["loss_mask"]))


def test_an_image_without_instances_zeroes_the_instance_losses(model):
    model.train()
    batch = _source_batch()
    batch[1]["instances"] = batch[1]["instances"][:0]
    with EventStorage(0):
        losses = model(batch)
    assert float(losses["loss_sem_seg"]) > 0
    assert all(float(v) == 0.0 for k, v in losses.items() if k != "loss_sem_seg")


def test_uda_interface(model):
    model.train()
    batch = _source_batch()
    images = model.preprocess_image(batch)
    assert images.tensor.shape == (2, 3, 96, 128)
    normalised = (batch[0]["image"][:, 0, 0].float() - model.pixel_mean[:, 0, 0]) / model.pixel_std[:, 0, 0]
    torch.testing.assert_close(images.tensor[0, :, 0, 0], normalised)
    with EventStorage(0):
        losses, features = model.losses_and_features(batch)
    assert "loss_mask" in losses and set(features) == {"res2", "res3", "res4", "res5"}
    assert features["res5"].shape[-2:] == (3, 4)
    model.eval()  # no dropout, fixed batch-norm statistics: repeatable predictions
    with torch.no_grad():
        dense = model.predict_dense(images.tensor)
        assert set(dense) == {"sem_seg"} and dense["sem_seg"].shape == (2, 19, 96, 128)
        semantic_only = model.predict_dense(images.tensor, outputs=("sem_seg",))
        torch.testing.assert_close(semantic_only["sem_seg"], dense["sem_seg"])
    with pytest.raises(ValueError, match="outputs must be"):
        model.predict_dense(images.tensor, outputs=("center",))


def test_inference_contract(model):
    model.eval()
    with torch.no_grad():
        image = torch.randint(0, 256, (3, 64, 128), dtype=torch.uint8)
        (result,) = model([{"image": image, "height": 32, "width": 64}])
    assert result["sem_seg"].shape == (19, 32, 64)
    png, segments = result["panoptic_seg"]
    assert png.shape == (32, 64) and png.dtype == torch.int32
    assert sorted(torch.unique(png[png > 0]).tolist()) == [s["id"] for s in segments]
    for segment in segments:
        assert segment["area"] == int((png == segment["id"]).sum())
        assert segment["isthing"] == (segment["category_id"] in THING_IDS)
    instances = result["instances"]
    assert instances.image_size == (32, 64) and instances.pred_masks.shape[1:] == (32, 64)
    assert set(instances.pred_classes.tolist()) <= set(THING_IDS)
    # With every mask pasted, each thing segment holds thing-class pixels only and takes their majority class.
    model.mask_score_threshold = 0.0
    with torch.no_grad():
        image = torch.randint(0, 256, (3, 64, 128), dtype=torch.uint8, generator=torch.Generator().manual_seed(3))
        (low,) = model([{"image": image}])
    model.mask_score_threshold = 0.95
    assert len(low["instances"]) > 0
    labels = low["sem_seg"].argmax(dim=0)
    things = [s for s in low["panoptic_seg"][1] if s["isthing"]]
    assert things
    for segment in things:
        votes = torch.bincount(labels[low["panoptic_seg"][0] == segment["id"]], minlength=19)
        assert votes[:11].sum() == 0 and int(votes.argmax()) == segment["category_id"]


# --- training through tools/train_net.py's code path ---------------------------------------------------

# test_uda_training's tiny settings (MiT-B0, 32-channel semantic decoder, 64x64 crops, seed 7), evaluated on
# the target val set only.
TEST_SETS = ["DATASETS.TEST", "('synthetic_target_panoptic_val',)"]


@pytest.mark.slow
def test_dacs_gbw_trains_resumes_and_evaluates(synthetic_datasets, tmp_path):
    """DACS + GBW (semantic, box, mask) through train_net's code path: the losses and GBW weights it logs,
    a run killed and resumed equal to the uninterrupted one (Detectron2's samplers included), and the
    evaluation's PQ per class."""
    config = Path(SYNTHETIC).name

    def train(output_dir, resume, kill_before=None):
        extra = [*TEST_SETS, "SOLVER.MAX_ITER", "3", "SOLVER.CHECKPOINT_PERIOD", "2"]
        return _train(setup(_args(REPO_ROOT, output_dir, config, extra=extra)), resume, kill_before)

    straight = train(tmp_path / "straight", resume=False)
    records = [r for r in _metrics(tmp_path / "straight") if "total_loss" in r]
    assert [r["iteration"] for r in records] == [0, 1, 2]
    for name in ("loss_sem_seg", "loss_rpn_cls", "loss_cls", "loss_mask", "loss_mix_sem_seg"):
        assert math.isfinite(records[-1][name]), name
    assert not any(k.startswith("loss_mix_") and k != "loss_mix_sem_seg" for k in records[-1])
    for loss, count in (("sem_seg", 19), ("box_cls", 9), ("mask", 8)):
        assert len([k for k in records[-1] if k.startswith(f"gbw/source/{loss}/")]) == count
    assert len([k for k in records[-1] if k.startswith("gbw/mixed/sem_seg/")]) == 19
    assert not any(k.startswith(("gbw/mixed/box_cls/", "gbw/mixed/mask/")) for k in records[-1])

    with pytest.raises(_Killed):
        train(tmp_path / "resumed", resume=False, kill_before=2)
    assert (tmp_path / "resumed" / "last_checkpoint").read_text() == "model_0000001.pth"
    resumed = train(tmp_path / "resumed", resume=True)
    assert resumed.start_iter == 2
    assert_same_training_state(straight, resumed)

    weights = ["MODEL.WEIGHTS", str(tmp_path / "straight" / "model_final.pth")]
    results = main(_args(REPO_ROOT, tmp_path / "eval", config, extra=[*TEST_SETS, *weights], flags=["--eval-only"]))
    panoptic = results["synthetic_target_panoptic_val"]["panoptic_seg"]
    assert all(math.isfinite(panoptic[k]) for k in ("PQ", "SQ", "RQ"))
    assert "PQ-road" in panoptic and "PQ-person" in panoptic
