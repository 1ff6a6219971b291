"""DAFormer heads: registries, output shapes at stride 4, offsets in input pixels, config errors."""
import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_sem_seg_head

from gbw_panoptic.config import add_gbw_panoptic_config
from gbw_panoptic.modeling import DAFormerInstanceHead, DAFormerSemSegHead, build_ins_embed_head

INPUT_SHAPE = {
    "res2": ShapeSpec(channels=8, stride=4),
    "res3": ShapeSpec(channels=16, stride=8),
    "res4": ShapeSpec(channels=24, stride=16),
    "res5": ShapeSpec(channels=32, stride=32),
}


def _cfg(embed_dim: int = 12):
    cfg = get_cfg()
    add_gbw_panoptic_config(cfg)
    cfg.MODEL.SEM_SEG_HEAD.EMBED_DIM = embed_dim
    cfg.MODEL.INS_EMBED_HEAD.EMBED_DIM = embed_dim
    return cfg


def _features(batch: int = 2, height: int = 64, width: int = 96):
    torch.manual_seed(0)
    return {
        name: torch.randn(batch, shape.channels, -(-height // shape.stride), -(-width // shape.stride))
        for name, shape in INPUT_SHAPE.items()
    }


def test_heads_from_registries_and_shapes():
    cfg = _cfg()
    semantic = build_sem_seg_head(cfg, INPUT_SHAPE).eval()
    instance = build_ins_embed_head(cfg, INPUT_SHAPE).eval()
    assert isinstance(semantic, DAFormerSemSegHead) and isinstance(instance, DAFormerInstanceHead)
    assert len(semantic.decoder.aspp) == 4 and semantic.decoder.bottleneck.out_channels == 12
    features = _features()
    with torch.no_grad():
        logits = semantic(features)
        center, offsets = instance(features)
        raw = instance.predictor(instance.decoder(features))
    assert logits.shape == (2, 19, 16, 24)
    assert center.shape == (2, 1, 16, 24) and offsets.shape == (2, 2, 16, 24)
    torch.testing.assert_close(center, raw[:, :1])
    torch.testing.assert_close(offsets, raw[:, 1:] * 4)
    # Independent decoders: the instance head does not share the semantic head's weights.
    semantic_ids = {id(p) for p in semantic.parameters()}
    assert not any(id(p) in semantic_ids for p in instance.parameters())


def test_decoder_fuses_every_level():
    """Changing the coarsest level changes the output (it is embedded, upsampled and fused)."""
    head = build_sem_seg_head(_cfg(), INPUT_SHAPE).eval()
    features = _features()
    with torch.no_grad():
        before = head(features)
        features["res5"] = features["res5"] + 1.0
        after = head(features)
    assert not torch.allclose(before, after)


def test_missing_backbone_level_is_reported():
    cfg = _cfg()
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["res2", "res6"]
    with pytest.raises(ValueError, match="res6"):
        build_sem_seg_head(cfg, INPUT_SHAPE)
