"""GBWPanopticSegmentor: configs, losses, gradients, GBW logging, inference outputs, training."""
import itertools
import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.data import MetadataCatalog
from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY, SEM_SEG_HEADS_REGISTRY, build_model
from detectron2.projects.deeplab.loss import DeepLabCE
from detectron2.structures import Instances

from gbw_panoptic.config import add_gbw_panoptic_config
from gbw_panoptic.gbw import GBWRegressionLoss
from gbw_panoptic.data.datasets import DATASET_NAMES
from gbw_panoptic.data.datasets.builtin_meta import panoptic_metadata
from gbw_panoptic.modeling import GBWPanopticSegmentor, MixVisionTransformer
from gbw_panoptic.modeling.backbone import MIT_VARIANTS
from gbw_panoptic.uda import check_uda_config

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted(str(p.relative_to(REPO_ROOT)) for p in (REPO_ROOT / "configs").rglob("*.yaml"))
SMALL_CONFIG = "configs/synthetic/mit_b0_source_only_gbw.yaml"
THINGS = list(range(11, 19))  # Cityscapes thing train ids
CITYSCAPES_CLASSES = "test_modeling_cityscapes_classes"  # metadata only, no dataset
if CITYSCAPES_CLASSES not in MetadataCatalog.list():
    MetadataCatalog.get(CITYSCAPES_CLASSES).set(**panoptic_metadata(list(range(19))))


def _cfg(config: str = SMALL_CONFIG, opts: List = ()):
    cfg = get_cfg()
    add_gbw_panoptic_config(cfg)
    cfg.merge_from_file(str(REPO_ROOT / config))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.MIT.PRETRAINED", "", "MODEL.WEIGHTS", "", *opts])
    return cfg


def _small_model(opts: List = ()) -> GBWPanopticSegmentor:
    """MiT-B0 with 16-channel decoders, no dropout (deterministic training forward)."""
    torch.manual_seed(0)
    base = [
        "MODEL.SEM_SEG_HEAD.EMBED_DIM", 16, "MODEL.INS_EMBED_HEAD.EMBED_DIM", 16,
        "MODEL.SEM_SEG_HEAD.DROPOUT", 0.0, "MODEL.INS_EMBED_HEAD.DROPOUT", 0.0,
        "DATASETS.TRAIN", "()", "DATASETS.TEST", f"('{CITYSCAPES_CLASSES}',)",
    ]  # fmt: skip
    return build_model(_cfg(opts=[*base, *opts]))


def _batch(seed: int = 0, height: int = 48, width: int = 64, instance_targets=(True, True)) -> List[Dict]:
    """Training dicts of the source mapper's format: blocky labels with thing classes, targets."""
    generator = torch.Generator().manual_seed(seed)
    batch = []
    for has_instances in instance_targets:
        coarse = torch.randint(0, 19, (1, 1, height // 8, width // 8), generator=generator).float()
        labels = torch.nn.functional.interpolate(coarse, size=(height, width), mode="nearest")[0, 0].long()
        labels[:4] = 255
        is_thing = (labels >= 11) & (labels <= 18)
        record = {
            "image": torch.randint(0, 256, (3, height, width), dtype=torch.uint8, generator=generator),
            "sem_seg": labels,
            "sem_seg_weights": torch.rand((height, width), generator=generator) + 0.5,
            "height": height,
            "width": width,
        }
        if has_instances:
            record.update(
                center=torch.rand((1, height, width), generator=generator) ** 4,
                center_weights=(labels != 255).float(),
                offset=torch.randn((2, height, width), generator=generator) * 5,
                offset_weights=is_thing.float(),
            )
        batch.append(record)
    return batch


def _flatten(node, prefix: str = "") -> Dict[str, object]:
    """``{"MODEL.GBW.SEM_SEG.ENABLED": True, ...}`` of a config node."""
    flat = {}
    for key, value in node.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


@pytest.mark.parametrize("config", CONFIGS)
def test_every_config_merges_and_validates(config):
    """Every key exists (merging raises otherwise); the training configs name registered datasets, a
    registered meta-architecture, backbone and head, pass the UDA checks, and switch GBW on exactly when
    their name says ``_gbw``."""
    cfg = _cfg(config)
    if Path(config).name.startswith("Base-"):
        return
    check_uda_config(cfg)
    for name in (*cfg.DATASETS.TRAIN, *cfg.DATASETS.TARGET_TRAIN, *cfg.DATASETS.TEST):
        assert name in DATASET_NAMES, f"{config}: dataset {name!r} is not registered"
    assert cfg.DATASETS.TEST, f"{config}: no DATASETS.TEST"
    assert cfg.MODEL.META_ARCHITECTURE in META_ARCH_REGISTRY and cfg.MODEL.BACKBONE.NAME in BACKBONE_REGISTRY
    assert cfg.MODEL.SEM_SEG_HEAD.NAME in SEM_SEG_HEADS_REGISTRY
    if cfg.MODEL.BACKBONE.NAME == "build_mit_backbone":
        assert cfg.MODEL.MIT.VARIANT in MIT_VARIANTS
    gbw_losses = ["SEM_SEG", "CENTER", "OFFSET"] if cfg.MODEL.INS_EMBED_HEAD.ENABLED else ["SEM_SEG"]
    gbw_named = "_gbw" in Path(config).stem
    expected = {loss: gbw_named for loss in gbw_losses}
    # The GBW ablation under DACS names the losses it weights: *_gbw_semantic, *_gbw_semantic_center.
    ablation = re.search(r"_gbw_(semantic(?:_center)?)$", Path(config).stem)
    if ablation:
        expected = {"SEM_SEG": True, "CENTER": ablation.group(1).endswith("center"), "OFFSET": False}
    assert {loss: cfg.MODEL.GBW[loss].ENABLED for loss in gbw_losses} == expected


GBW_PAIRS = [
    (config.replace("_gbw.yaml", ".yaml"), config)
    for config in CONFIGS
    if config.endswith("_gbw.yaml") and (REPO_ROOT / config.replace("_gbw.yaml", ".yaml")).is_file()
]


@pytest.mark.parametrize("baseline, gbw_config", GBW_PAIRS)
def test_gbw_config_is_its_baseline_plus_gbw(baseline, gbw_config):
    """A ``*_gbw.yaml`` with a baseline next to it takes it as ``_BASE_`` and changes MODEL.GBW keys only
    (and OUTPUT_DIR: each real-data config writes to its own folder)."""
    with open(REPO_ROOT / gbw_config) as f:
        assert f"_BASE_: \"{Path(baseline).name}\"" in f.read()
    base, gbw = _flatten(_cfg(baseline)), _flatten(_cfg(gbw_config))
    changed = sorted(key for key in gbw if gbw[key] != base[key] and key != "OUTPUT_DIR")
    assert changed and all(key.startswith("MODEL.GBW.") for key in changed), changed


def _check_builds_and_predicts(config: str) -> None:
    cfg = _cfg(config)
    model = build_model(cfg).eval()
    with torch.no_grad():
        (output,) = model([{"image": torch.zeros(3, 64, 64), "height": 32, "width": 48}])
    assert output["sem_seg"].shape == (19, 32, 48)
    assert ("panoptic_seg" in output) == cfg.MODEL.INS_EMBED_HEAD.ENABLED


# The top-down (Mask R-CNN) configs build another meta-architecture: tests/test_top_down.py builds them.
SYNTHETIC_CONFIGS = [
    c for c in CONFIGS
    if c.startswith("configs/synthetic/") and not Path(c).name.startswith(("Base-", "maskrcnn_"))
]


@pytest.mark.parametrize("config", SYNTHETIC_CONFIGS)
def test_every_synthetic_config_builds_and_predicts(config, request):
    if _cfg(config).MODEL.SEM_SEG_HEAD.CLASS_WEIGHTING != "none":
        # Frequency weights are read from the source class statistics: the generated test benchmark's.
        request.getfixturevalue("synthetic_datasets")
    _check_builds_and_predicts(config)


@pytest.mark.slow
@pytest.mark.parametrize("config", ["configs/synthia2cityscapes/mit_b5_gbw.yaml", "configs/gta2cityscapes/r101.yaml"])
def test_full_size_model_builds_and_predicts(config):
    """One full-size MiT-B5 and one ResNet-101 model (the other full-size configs differ in data and
    GBW keys only, checked by merging them)."""
    _check_builds_and_predicts(config)


def test_train_losses_finite_and_every_parameter_gets_a_gradient():
    model = _small_model().train()
    losses = model(_batch())
    assert set(losses) == {"loss_sem_seg", "loss_center", "loss_offset"}
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    no_gradient = [
        name
        for name, parameter in model.named_parameters()
        if parameter.requires_grad and (parameter.grad is None or not parameter.grad.abs().sum() > 0)
    ]
    assert not no_gradient
    groups = {name.split(".")[0] for name, _ in model.named_parameters()}
    assert groups == {"backbone", "sem_seg_head", "ins_embed_head"}


def test_semantic_only_mode():
    model = _small_model(["MODEL.INS_EMBED_HEAD.ENABLED", False]).train()
    assert model.ins_embed_head is None and not any("ins_embed" in n for n, _ in model.named_parameters())
    losses = model(_batch())
    assert set(losses) == {"loss_sem_seg"}
    losses["loss_sem_seg"].backward()
    images = model.preprocess_image(_batch())
    assert set(model.predict_dense(images.tensor)) == {"sem_seg"}
    model.eval()
    with torch.no_grad():
        (output,) = model(_batch()[:1])
    assert set(output) == {"sem_seg"}


def test_losses_without_gbw_match_the_reference_formulas():
    """EDAPS divides the offset L1 by the weights expanded over (dy, dx), 2 * sum(w)."""
    model = _small_model(
        ["MODEL.GBW.SEM_SEG.ENABLED", False, "MODEL.GBW.CENTER.ENABLED", False, "MODEL.GBW.OFFSET.ENABLED", False]
        + ["MODEL.INS_EMBED_HEAD.CENTER_LOSS_ZERO_ABOVE", 0.0]
    ).train()
    batch = _batch(height=64, width=96)  # multiples of 32: no padding
    torch.manual_seed(1)
    losses = model(batch)
    images = model.preprocess_image(batch)
    torch.manual_seed(1)
    dense = model.predict_dense(images.tensor)
    labels = torch.stack([x["sem_seg"] for x in batch])
    pixel_weights = torch.stack([x["sem_seg_weights"] for x in batch])
    expected_sem_seg = DeepLabCE(ignore_label=255)(dense["sem_seg"], labels, pixel_weights)
    center_weights = torch.stack([x["center_weights"] for x in batch])
    offset_weights = torch.stack([x["offset_weights"] for x in batch])
    center_error = (dense["center"] - torch.stack([x["center"] for x in batch])) ** 2
    offset_error = (dense["offset"] - torch.stack([x["offset"] for x in batch])).abs()
    expected_center = 10.0 * (center_error * center_weights[:, None]).sum() / center_weights.sum()
    expected_offset = 0.1 * (offset_error * offset_weights[:, None]).sum() / (2 * offset_weights.sum())
    torch.testing.assert_close(losses["loss_sem_seg"], expected_sem_seg)
    torch.testing.assert_close(losses["loss_center"], expected_center)
    torch.testing.assert_close(losses["loss_offset"], expected_offset)


def test_center_loss_above_the_limit_is_zero_and_gives_no_gradient():
    batch = _batch(height=64, width=96)
    torch.manual_seed(1)
    loss_center = _small_model(["MODEL.INS_EMBED_HEAD.CENTER_LOSS_ZERO_ABOVE", 0.0]).train()(batch)["loss_center"]
    above = float(loss_center.detach()) * 1.01
    torch.manual_seed(1)
    kept = _small_model(["MODEL.INS_EMBED_HEAD.CENTER_LOSS_ZERO_ABOVE", above]).train()(batch)["loss_center"]
    assert torch.equal(kept, loss_center)
    model = _small_model(["MODEL.INS_EMBED_HEAD.CENTER_LOSS_ZERO_ABOVE", float(loss_center.detach()) * 0.99]).train()
    torch.manual_seed(1)
    dropped = model(batch)["loss_center"]
    assert float(dropped) == 0.0
    dropped.backward()
    assert all(p.grad is None or not p.grad.any() for p in model.parameters())


def test_center_pixels_grouped_by_instance_class():
    """With PIXEL_CLASS "instance" the center loss groups pixels by ``center_class`` where an input has
    it (255 = fall back to the semantic label) and by the semantic label elsewhere."""
    opts = ["MODEL.GBW.CENTER.ENABLED", True, "MODEL.GBW.CENTER.LAMBDA_MODE", "relative"]
    opts += ["MODEL.GBW.CENTER.PIXEL_CLASS", "instance", "MODEL.INS_EMBED_HEAD.CENTER_LOSS_ZERO_ABOVE", 0.0]
    model = _small_model(opts).train()
    batch = _batch(height=64, width=96)
    center_class = torch.full((64, 96), 255, dtype=torch.long)
    center_class[10:40, 20:60] = 13
    batch[0]["center_class"] = center_class
    torch.manual_seed(1)
    loss_center = model(batch)["loss_center"]
    torch.manual_seed(1)
    dense = model.predict_dense(model.preprocess_image(batch).tensor)
    labels = torch.stack([x["sem_seg"] for x in batch])
    pixel_class = labels.clone()
    pixel_class[0, 10:40, 20:60] = 13
    reference = GBWRegressionLoss(19, kind="mse", lam_mode="relative")
    center_weights = torch.stack([x["center_weights"] for x in batch])
    expected = reference(dense["center"], torch.stack([x["center"] for x in batch]), pixel_class, center_weights)
    torch.testing.assert_close(loss_center, 10.0 * expected)
    torch.testing.assert_close(model.center_loss.last_weights, reference.last_weights)
    semantic = GBWRegressionLoss(19, kind="mse", lam_mode="relative")
    semantic(dense["center"], torch.stack([x["center"] for x in batch]), labels, center_weights)
    assert not torch.allclose(semantic.last_weights, reference.last_weights, rtol=1e-3)


def _gbw_opts(enabled: bool, lam: float, mode: str) -> List:
    return list(
        itertools.chain.from_iterable(
            [f"MODEL.GBW.{loss}.ENABLED", enabled, f"MODEL.GBW.{loss}.LAMBDA", lam]
            + [f"MODEL.GBW.{loss}.LAMBDA_MODE", mode]
            for loss in ("SEM_SEG", "CENTER", "OFFSET")
        )
    )


def _losses_and_class_weights(model: GBWPanopticSegmentor):
    """The losses of a training pass on :func:`_batch` and the GBW class weights it used."""
    losses = model(_batch())
    weights = {name: float(value) for name, value in model.gbw_class_weights().items()}
    return {k: v.detach() for k, v in losses.items()}, weights


def test_gbw_on_vs_off_and_the_class_weights_of_the_pass():
    off = _small_model(_gbw_opts(False, 1.0, "absolute")).train()
    state = off.state_dict()
    off_losses, off_weights = _losses_and_class_weights(off)
    assert off_weights == {}

    # A huge lambda pins every weight to 1: the same losses as without GBW.
    uniform = _small_model(_gbw_opts(True, 1e12, "absolute")).train()
    uniform.load_state_dict(state)
    uniform_losses, uniform_weights = _losses_and_class_weights(uniform)
    for name in off_losses:
        torch.testing.assert_close(uniform_losses[name], off_losses[name], rtol=1e-5, atol=1e-7)
    assert uniform_weights and all(abs(v - 1.0) < 1e-6 for v in uniform_weights.values())

    weighted = _small_model(_gbw_opts(True, 0.1, "relative")).train()
    weighted.load_state_dict(state)
    weighted_losses, weights = _losses_and_class_weights(weighted)
    for name in off_losses:
        assert not torch.allclose(weighted_losses[name], off_losses[name], rtol=1e-3), name
    names = weighted.class_names
    # Each loss's classes, by name; the offset loss covers the thing classes only.
    covered = (("sem_seg", range(19)), ("center", range(19)), ("offset", THINGS))
    assert list(weights) == [f"{loss}/{names[c]}" for loss, classes in covered for c in classes]
    for loss, classes in covered:
        loss_weights = [weights[f"{loss}/{names[c]}"] for c in classes]
        assert sum(loss_weights) == pytest.approx(len(classes), rel=1e-5), loss
        assert min(loss_weights) >= 0 and max(loss_weights) > 1.01
    assert [weights[f"sem_seg/{name}"] for name in names] == weighted.sem_seg_loss.last_weights.tolist()


def test_losses_and_features_in_one_backbone_pass():
    model = _small_model(["MODEL.MIT.DROP_PATH_RATE", 0.0]).train()
    batch = _batch()
    losses, features = model.losses_and_features(batch)
    expected_losses = model(batch)
    expected_features = model.extract_features(model.preprocess_image(batch).tensor)
    for name, value in expected_losses.items():
        torch.testing.assert_close(losses[name], value)
    assert set(features) == {"res2", "res3", "res4", "res5"}
    for name, value in expected_features.items():
        torch.testing.assert_close(features[name], value)
    assert features["res5"].requires_grad


def test_uint8_and_float_images_give_the_same_predictions():
    model = _small_model().eval()
    image = _batch()[0]["image"]
    with torch.no_grad():
        as_uint8 = model([{"image": image}])[0]["sem_seg"]
        as_float = model([{"image": image.float()}])[0]["sem_seg"]
    assert torch.equal(as_uint8, as_float)


def test_images_without_instance_targets_skip_the_instance_losses():
    model = _small_model().train()
    losses = model(_batch(instance_targets=(True, False)))
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    losses = model(_batch(instance_targets=(False, False)))
    assert losses["loss_center"] == 0 and losses["loss_offset"] == 0
    assert losses["loss_sem_seg"] > 0
    with pytest.raises(ValueError, match="sem_seg"):
        model([{"image": torch.zeros(3, 32, 32, dtype=torch.uint8)}])


def test_inference_returns_a_valid_panoptic_segmentation():
    """Crafted dense predictions with two cars, a person and stuff, through the model's postprocess."""
    model = _small_model(["MODEL.POST_PROCESSING.STUFF_AREA", 50]).eval()
    height, width = 40, 60
    logits = torch.zeros((1, 19, height, width))
    logits[0, 0] = 5.0  # road everywhere
    logits[0, 10, :3] = 10.0  # a 180-px sky band
    logits[0, 2, 35:, :5] = 10.0  # 25 px of building: below STUFF_AREA -> void
    blobs = [((10, 20, 5, 15), 13), ((10, 20, 40, 50), 13), ((25, 35, 20, 30), 11)]
    center = torch.zeros((1, 1, height, width))
    offset = torch.zeros((1, 2, height, width))
    ys, xs = torch.meshgrid(
        torch.arange(height, dtype=torch.float32), torch.arange(width, dtype=torch.float32), indexing="ij"
    )
    for (y0, y1, x0, x1), class_id in blobs:
        logits[0, class_id, y0:y1, x0:x1] = 10.0
        cy, cx = (y0 + y1) // 2, (x0 + x1) // 2
        gaussian = torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / (2 * 3.0**2))
        center[0, 0] = torch.maximum(center[0, 0], gaussian)
        offset[0, 0, y0:y1, x0:x1] = cy - ys[y0:y1, x0:x1]
        offset[0, 1, y0:y1, x0:x1] = cx - xs[y0:y1, x0:x1]
    predictions = {"sem_seg": logits, "center": center, "offset": offset}
    (output,) = model.postprocess(predictions, [{"height": height, "width": width}], [(height, width)])
    png, segments = output["panoptic_seg"]
    assert png.shape == (height, width)
    ids = set(png.unique().tolist())
    assert ids == {0} | {s["id"] for s in segments}
    for segment in segments:
        mask = png == segment["id"]
        assert int(mask.sum()) == segment["area"]
        assert segment["isthing"] == (segment["category_id"] in THINGS)
        assert (output["sem_seg"].argmax(0)[mask] == segment["category_id"]).all()
    assert sorted(s["category_id"] for s in segments) == [0, 10, 11, 13, 13]
    assert (png[35:, :5] == 0).all()
    instances = output["instances"]
    assert isinstance(instances, Instances) and len(instances) == 3
    assert sorted(instances.pred_classes.tolist()) == [11, 13, 13]
    assert ((instances.scores > 0) & (instances.scores <= 1)).all()
    boxes = sorted(instances.pred_boxes.tensor.tolist())
    assert boxes[0] == [5.0, 10.0, 15.0, 20.0]


def test_outputs_are_resized_and_offsets_rescaled():
    dense = {
        "sem_seg": torch.randn(19, 40, 64),
        "center": torch.rand(1, 40, 64),
        "offset": torch.stack([torch.full((40, 64), 3.0), torch.full((40, 64), -5.0)]),
    }
    resized = GBWPanopticSegmentor.resize_to_output(dense, (32, 48), 64, 144)
    assert resized["sem_seg"].shape == (19, 64, 144) and resized["center"].shape == (1, 64, 144)
    torch.testing.assert_close(resized["offset"][0], torch.full((64, 144), 6.0))
    torch.testing.assert_close(resized["offset"][1], torch.full((64, 144), -15.0))


def test_classes_come_from_the_dataset_metadata():
    name = "test_modeling_made_up_panoptic"
    MetadataCatalog.get(name).set(
        stuff_classes=[f"class{i}" for i in range(19)],
        thing_dataset_id_to_contiguous_id={100: 3, 101: 4},
        label_divisor=256,
    )
    model = build_model(_cfg(opts=["DATASETS.TEST", f"('{name}',)", "MODEL.MIT.VARIANT", "b0"]))
    assert model.thing_ids == [3, 4] and model.label_divisor == 256 and model.class_names[0] == "class0"
    assert model.offset_loss.fixed_active.nonzero().flatten().tolist() == [3, 4]
    with pytest.raises(ValueError, match="NUM_CLASSES"):
        build_model(_cfg(opts=["DATASETS.TEST", f"('{name}',)", "MODEL.SEM_SEG_HEAD.NUM_CLASSES", 7]))
    with pytest.raises(ValueError, match="no registered panoptic dataset among .*'not_registered'"):
        build_model(_cfg(opts=["DATASETS.TEST", "()", "DATASETS.TRAIN", "('not_registered',)"]))


def test_importing_the_model_registers_no_dataset():
    """The model reads class metadata from the MetadataCatalog at build time; importing it leaves the
    catalogs as Detectron2 alone leaves them."""
    script = (
        "import sys, json\n"
        "from detectron2.data import DatasetCatalog, MetadataCatalog\n"
        "before = (DatasetCatalog.list(), MetadataCatalog.list())\n"
        "import gbw_panoptic.modeling\n"
        "after = (DatasetCatalog.list(), MetadataCatalog.list())\n"
        "print(json.dumps([before == after, 'gbw_panoptic.data' in sys.modules]))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert json.loads(result.stdout.splitlines()[-1]) == [True, False]


def test_mit_pretrained_path_from_config(tmp_path):
    encoder = MixVisionTransformer("b0")
    encoder.encoder.save_pretrained(tmp_path / "mit_b0")
    model = build_model(_cfg(opts=["MODEL.MIT.PRETRAINED", str(tmp_path / "mit_b0")]))
    for key, value in encoder.encoder.state_dict().items():
        assert torch.equal(model.backbone.encoder.state_dict()[key], value), key
    with pytest.raises(FileNotFoundError, match="nvidia/mit-b0"):
        build_model(_cfg(opts=["MODEL.MIT.PRETRAINED", str(tmp_path / "missing")]))


@pytest.mark.slow
def test_semantic_model_learns_on_synthetic_data(synthetic_datasets):
    """20 AdamW steps on synthetic source batches lower the loss of a held-out batch."""
    from detectron2.utils.env import seed_all_rng
    from gbw_panoptic.data import build_source_train_loader

    cfg = _cfg(
        "configs/synthetic/semantic_mit_b0_source_only_gbw.yaml",
        [
            "MODEL.SEM_SEG_HEAD.EMBED_DIM", 32, "MODEL.SEM_SEG_HEAD.DROPOUT", 0.0,
            "DATALOADER.RCS.ENABLED", False, "INPUT.CROP.SIZE", [96, 96],
        ],
    )  # fmt: skip
    seed_all_rng(0)  # model init, and the sampler / augmentations of the loader (NumPy)
    model = build_model(cfg).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    batches = iter(build_source_train_loader(cfg))
    held_out = next(batches)
    with torch.no_grad():
        before = float(model(held_out)["loss_sem_seg"])
    for _ in range(20):
        loss = model(next(batches))["loss_sem_seg"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        assert torch.isfinite(loss)
    with torch.no_grad():
        after = float(model(held_out)["loss_sem_seg"])
    assert after < 0.85 * before, (before, after)
