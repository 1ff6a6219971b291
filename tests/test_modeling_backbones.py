"""Backbones: MiT (SegFormer encoder) weights round trips in every checkpoint convention, ResNet shapes."""
import re
from pathlib import Path
from typing import Dict

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from safetensors.torch import save_file

from gbw_panoptic.config import add_gbw_panoptic_config
from gbw_panoptic.modeling.backbone import MixVisionTransformer, convert_mit_state_dict


def _to_mmseg_names(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Current SegformerModel names -> the original SegFormer / mmseg ``mit_b*.pth`` names
    (1-based stages, fused key/value projection)."""
    renames = [
        (r"^stages\.(\d)\.patch_embeddings\.proj\.", lambda m: f"patch_embed{int(m.group(1)) + 1}.proj."),
        (r"^stages\.(\d)\.patch_embeddings\.layer_norm\.", lambda m: f"patch_embed{int(m.group(1)) + 1}.norm."),
        (r"^stages\.(\d)\.blocks\.(\d+)\.", lambda m: f"block{int(m.group(1)) + 1}.{m.group(2)}."),
        (r"^stages\.(\d)\.layer_norm\.", lambda m: f"norm{int(m.group(1)) + 1}."),
        (r"\.layernorm_before\.", ".norm1."),
        (r"\.layernorm_after\.", ".norm2."),
        (r"\.attention\.q_proj\.", ".attn.q."),
        (r"\.attention\.o_proj\.", ".attn.proj."),
        (r"\.attention\.sequence_reduction\.sequence_reduction\.", ".attn.sr."),
        (r"\.attention\.sequence_reduction\.layer_norm\.", ".attn.norm."),
    ]
    converted = {}
    for key, value in state_dict.items():
        if ".attention.v_proj." in key:
            continue
        if ".attention.k_proj." in key:
            value = torch.cat([value, state_dict[key.replace(".k_proj.", ".v_proj.")]], dim=0)
            key = key.replace(".attention.k_proj.", ".attn.kv.")
        for pattern, replacement in renames:
            key = re.sub(pattern, replacement, key)
        converted[key] = value
    return converted


def _to_hub_names(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Current SegformerModel names -> those of the checkpoints on the Hugging Face hub (``nvidia/mit-b*``,
    a ``SegformerForImageClassification`` saved by transformers 4: ``segformer.encoder.block.{i}.{j}...``)."""
    renames = [
        (r"^stages\.(\d)\.patch_embeddings\.", r"encoder.patch_embeddings.\1."),
        (r"^stages\.(\d)\.blocks\.(\d+)\.", r"encoder.block.\1.\2."),
        (r"^stages\.(\d)\.layer_norm\.", r"encoder.layer_norm.\1."),
        (r"\.attention\.q_proj\.", ".attention.self.query."),
        (r"\.attention\.k_proj\.", ".attention.self.key."),
        (r"\.attention\.v_proj\.", ".attention.self.value."),
        (r"\.attention\.sequence_reduction\.sequence_reduction\.", ".attention.self.sr."),
        (r"\.attention\.sequence_reduction\.layer_norm\.", ".attention.self.layer_norm."),
        (r"\.attention\.o_proj\.", ".attention.output.dense."),
        (r"\.mlp\.fc([12])\.", r".mlp.dense\1."),
        (r"\.layernorm_before\.", ".layer_norm_1."),
        (r"\.layernorm_after\.", ".layer_norm_2."),
    ]
    converted = {}
    for key, value in state_dict.items():
        for pattern, replacement in renames:
            key = re.sub(pattern, replacement, key)
        converted[f"segformer.{key}"] = value
    return converted


@pytest.fixture(scope="module")
def mit_b0() -> MixVisionTransformer:
    torch.manual_seed(0)
    model = MixVisionTransformer("b0", drop_path_rate=0.0).eval()
    with torch.no_grad():  # non-default LayerNorm parameters, so that a skipped key would show
        for parameter in model.parameters():
            parameter.add_(0.01 * torch.randn_like(parameter))
    return model


def _outputs(model: MixVisionTransformer) -> Dict[str, torch.Tensor]:
    image = torch.linspace(-2, 2, 2 * 3 * 64 * 96).view(2, 3, 64, 96)
    with torch.no_grad():
        return model(image)


def _save(kind: str, model: MixVisionTransformer, tmp_path: Path) -> str:
    state = model.encoder.state_dict()
    if kind == "save_pretrained":
        model.encoder.save_pretrained(tmp_path / "mit")
        return str(tmp_path / "mit")
    if kind == "safetensors_segformer_prefix":
        save_file({f"segformer.{k}": v.contiguous() for k, v in state.items()}, tmp_path / "mit.safetensors")
        return str(tmp_path / "mit.safetensors")
    if kind == "hf_download_folder":  # what `hf download nvidia/mit-b0 --local-dir DIR` gives
        folder = tmp_path / "mit-b0"
        folder.mkdir()
        model.encoder.config.to_json_file(folder / "config.json")
        hub = _to_hub_names(state)
        hub.update({"classifier.weight": torch.zeros(1000, 256), "classifier.bias": torch.zeros(1000)})
        torch.save(hub, folder / "pytorch_model.bin")
        return str(folder)
    if kind == "mmseg_pth":
        mmseg = _to_mmseg_names(state)
        mmseg["head.weight"] = torch.zeros(1000, 256)  # ImageNet classifier, not part of the encoder
        torch.save({"state_dict": mmseg}, tmp_path / "mit_b0.pth")
        return str(tmp_path / "mit_b0.pth")
    if kind == "mmseg_segmentor_bin":
        torch.save({f"backbone.{k}": v for k, v in _to_mmseg_names(state).items()}, tmp_path / "daformer.bin")
        return str(tmp_path / "daformer.bin")
    raise AssertionError(kind)


@pytest.mark.parametrize(
    "kind",
    ["save_pretrained", "hf_download_folder", "safetensors_segformer_prefix", "mmseg_pth", "mmseg_segmentor_bin"],
)
def test_mit_weights_round_trip_exact(mit_b0, tmp_path, kind):
    path = _save(kind, mit_b0, tmp_path)
    reloaded = MixVisionTransformer("b0", drop_path_rate=0.0, pretrained=path).eval()
    expected, actual = _outputs(mit_b0), _outputs(reloaded)
    for name in ("res2", "res3", "res4", "res5"):
        assert torch.equal(expected[name], actual[name]), name
    fresh = MixVisionTransformer("b0", drop_path_rate=0.0).eval()
    assert not torch.equal(_outputs(fresh)["res5"], expected["res5"])


def test_mit_mmseg_names_cover_every_weight(mit_b0):
    converted = convert_mit_state_dict(_to_mmseg_names(mit_b0.encoder.state_dict()))
    assert set(converted) == set(mit_b0.encoder.state_dict())


def test_mit_missing_path_says_what_to_download(tmp_path):
    folder = tmp_path / "pretrained" / "mit-b0"
    with pytest.raises(FileNotFoundError, match=rf"`hf download nvidia/mit-b0 --local-dir {re.escape(str(folder))}`.*mit_b0\.pth"):
        MixVisionTransformer("b0", pretrained=str(tmp_path / "pretrained" / "mit_b0.pth"))
    with pytest.raises(FileNotFoundError, match=rf"`hf download nvidia/mit-b0 --local-dir {re.escape(str(folder))}`"):
        MixVisionTransformer("b0", pretrained=str(folder))


def test_mit_wrong_variant_is_reported(mit_b0, tmp_path):
    path = _save("save_pretrained", mit_b0, tmp_path)
    with pytest.raises(ValueError, match="MiT-B1"):
        MixVisionTransformer("b1", pretrained=path)


def test_mit_not_a_checkpoint(tmp_path):
    torch.save({"something": torch.zeros(3)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="not a MiT-B0 checkpoint"):
        MixVisionTransformer("b0", pretrained=str(tmp_path / "other.pth"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        MixVisionTransformer("b0", pretrained=str(tmp_path / "empty"))


def test_mit_shapes_and_bad_variant():
    model = MixVisionTransformer("b0", out_features=("res2", "res4"))
    features = model(torch.zeros(1, 3, 64, 96))
    assert {k: tuple(v.shape) for k, v in features.items()} == {"res2": (1, 32, 16, 24), "res4": (1, 160, 4, 6)}
    assert model.output_shape() == {
        "res2": ShapeSpec(channels=32, stride=4),
        "res4": ShapeSpec(channels=160, stride=16),
    }
    with pytest.raises(ValueError, match="MODEL.MIT.VARIANT"):
        MixVisionTransformer("b9")


@pytest.mark.parametrize("depth, channels", [(18, (64, 128, 256, 512)), (50, (256, 512, 1024, 2048))])
def test_resnet_deeplab_stem_shapes(depth, channels):
    cfg = get_cfg()
    add_gbw_panoptic_config(cfg)
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = 64 if depth < 50 else 128
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64 if depth < 50 else 256
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    backbone = BACKBONE_REGISTRY.get("build_resnet_deeplab_stem_backbone")(cfg, ShapeSpec(channels=3))
    assert type(backbone.stem).__name__ == "DeepLabStem"
    features = backbone(torch.zeros(1, 3, 64, 64))
    for (name, feature), stride, width in zip(sorted(features.items()), (4, 8, 16, 32), channels):
        assert feature.shape == (1, width, 64 // stride, 64 // stride), name
        assert backbone.output_shape()[name] == ShapeSpec(channels=width, stride=stride)
    cfg.MODEL.RESNETS.DEPTH = 18
    cfg.MODEL.RESNETS.STEM_OUT_CHANNELS = 128
    with pytest.raises(ValueError, match="STEM_OUT_CHANNELS"):
        BACKBONE_REGISTRY.get("build_resnet_deeplab_stem_backbone")(cfg, ShapeSpec(channels=3))
