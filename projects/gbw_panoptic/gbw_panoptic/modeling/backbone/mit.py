"""Mix Transformer (MiT, the SegFormer encoder) B0 ... B5 as a Detectron2 backbone.

The encoder is ``transformers``' ``SegformerModel``; this module adds the Detectron2 interface
(``res2`` ... ``res5`` feature maps at strides 4/8/16/32 with their ``ShapeSpec``) and loading of
pretrained weights from a local file or directory in any of the usual key conventions:

- ``transformers`` (current names ``stages.{i}...`` or the hub's ``encoder.block.{i}...``, with or
  without a ``segformer.`` prefix), as ``model.safetensors`` / ``pytorch_model.bin`` or a
  ``save_pretrained`` directory;
- the original SegFormer / mmsegmentation ``mit_b*.pth`` (``patch_embed1``, ``block1``, ``norm1``,
  with or without ``backbone.`` prefix, optionally under a ``state_dict`` key).
"""
import logging
import os
import re
from typing import Callable, Dict, List, Tuple, Union

import torch
from detectron2.config import CfgNode
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone import Backbone
from transformers import SegformerConfig, SegformerModel

__all__ = [
    "MixVisionTransformer",
    "MIT_VARIANTS",
    "build_mit_backbone",
    "convert_mit_state_dict",
    "load_mit_weights",
    "mit_download_hint",
]

logger = logging.getLogger(__name__)

_STAGE_NAMES = ("res2", "res3", "res4", "res5")
_STAGE_STRIDES = (4, 8, 16, 32)

# Stage widths and depths of the variants (SegFormer paper, Table 6).
MIT_VARIANTS: Dict[str, Dict[str, Tuple[int, ...]]] = {
    "b0": {"hidden_sizes": (32, 64, 160, 256), "depths": (2, 2, 2, 2)},
    "b1": {"hidden_sizes": (64, 128, 320, 512), "depths": (2, 2, 2, 2)},
    "b2": {"hidden_sizes": (64, 128, 320, 512), "depths": (3, 4, 6, 3)},
    "b3": {"hidden_sizes": (64, 128, 320, 512), "depths": (3, 4, 18, 3)},
    "b4": {"hidden_sizes": (64, 128, 320, 512), "depths": (3, 8, 27, 3)},
    "b5": {"hidden_sizes": (64, 128, 320, 512), "depths": (3, 6, 40, 3)},
}

# (pattern, replacement) pairs that rename one checkpoint convention into the current
# ``SegformerModel`` parameter names; applied in order to every key.
_Renames = List[Tuple[str, Union[str, Callable[[re.Match], str]]]]
_HUB_RENAMES: _Renames = [
    (r"^encoder\.patch_embeddings\.(\d+)\.", r"stages.\1.patch_embeddings."),
    (r"^encoder\.block\.(\d+)\.(\d+)\.", r"stages.\1.blocks.\2."),
    (r"^encoder\.layer_norm\.(\d+)\.", r"stages.\1.layer_norm."),
    (r"\.attention\.self\.(query|key|value)\.", lambda m: f".attention.{m.group(1)[0]}_proj."),
    (r"\.attention\.self\.sr\.", ".attention.sequence_reduction.sequence_reduction."),
    (r"\.attention\.self\.layer_norm\.", ".attention.sequence_reduction.layer_norm."),
    (r"\.attention\.output\.dense\.", ".attention.o_proj."),
    (r"\.mlp\.dense([12])\.", r".mlp.fc\1."),
    (r"\.layer_norm_1\.", ".layernorm_before."),
    (r"\.layer_norm_2\.", ".layernorm_after."),
]
_MMSEG_RENAMES: _Renames = [
    (r"^patch_embed(\d)\.proj\.", lambda m: f"stages.{int(m.group(1)) - 1}.patch_embeddings.proj."),
    (r"^patch_embed(\d)\.norm\.", lambda m: f"stages.{int(m.group(1)) - 1}.patch_embeddings.layer_norm."),
    (r"^block(\d)\.(\d+)\.", lambda m: f"stages.{int(m.group(1)) - 1}.blocks.{m.group(2)}."),
    (r"^norm(\d)\.", lambda m: f"stages.{int(m.group(1)) - 1}.layer_norm."),
    (r"\.norm1\.", ".layernorm_before."),
    (r"\.norm2\.", ".layernorm_after."),
    (r"\.attn\.q\.", ".attention.q_proj."),
    (r"\.attn\.proj\.", ".attention.o_proj."),
    (r"\.attn\.sr\.", ".attention.sequence_reduction.sequence_reduction."),
    (r"\.attn\.norm\.", ".attention.sequence_reduction.layer_norm."),
]
_PREFIXES = ("module.", "backbone.", "segformer.")


def _strip_prefixes(key: str) -> str:
    stripped = True
    while stripped:
        stripped = False
        for prefix in _PREFIXES:
            if key.startswith(prefix):
                key, stripped = key[len(prefix):], True
    return key


def convert_mit_state_dict(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Rename a MiT checkpoint into ``SegformerModel`` parameter names.

    Detects the convention (current ``transformers``, hub ``encoder.*`` or mmseg ``patch_embed*``),
    strips ``module.`` / ``backbone.`` / ``segformer.`` prefixes, splits mmseg's fused ``attn.kv``
    projection into ``k_proj`` and ``v_proj``, and drops keys of other parts (classifier, decoder).
    """
    stripped = {_strip_prefixes(key): value for key, value in state_dict.items()}
    if any(key.startswith("patch_embed1.") for key in stripped):
        renames = _MMSEG_RENAMES
    elif any(key.startswith("encoder.") for key in stripped):
        renames = _HUB_RENAMES
    else:
        renames = []
    converted: Dict[str, torch.Tensor] = {}
    for key, value in stripped.items():
        for pattern, replacement in renames:
            key = re.sub(pattern, replacement, key)
        if not key.startswith("stages."):
            continue
        if key.endswith((".attn.kv.weight", ".attn.kv.bias")):
            prefix, suffix = key.split(".attn.kv.")
            key_part, value_part = value.chunk(2, dim=0)
            converted[f"{prefix}.attention.k_proj.{suffix}"] = key_part
            converted[f"{prefix}.attention.v_proj.{suffix}"] = value_part
            continue
        converted[key] = value
    return converted


def _read_checkpoint(path: str) -> Dict[str, torch.Tensor]:
    """Read a state dict from a ``.safetensors`` / ``.pth`` / ``.bin`` file or a ``save_pretrained``
    directory (``model.safetensors`` or ``pytorch_model.bin`` inside)."""
    if os.path.isdir(path):
        for name in ("model.safetensors", "pytorch_model.bin"):
            if os.path.isfile(os.path.join(path, name)):
                return _read_checkpoint(os.path.join(path, name))
        raise FileNotFoundError(
            f"MODEL.MIT.PRETRAINED directory {path} holds neither model.safetensors nor pytorch_model.bin"
        )
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(checkpoint, dict) and isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
    if not isinstance(checkpoint, dict):
        raise ValueError(f"MODEL.MIT.PRETRAINED file {path} does not hold a state dict")
    return checkpoint


def mit_download_hint(path: str, variant: str) -> str:
    """How to get the ImageNet MiT weights that ``MODEL.MIT.PRETRAINED`` = ``path`` names: the Hugging Face
    folder (``hf download``, from huggingface_hub, installed with transformers) or SegFormer's ``.pth``."""
    folder = path if not os.path.splitext(path)[1] else os.path.join(os.path.dirname(path) or ".", f"mit-{variant}")
    return (
        f"Download the ImageNet MiT-{variant.upper()} weights once (on a machine with internet, e.g. a login node): "
        f"`hf download nvidia/mit-{variant} --local-dir {folder}` (a folder with config.json and the weights) and "
        f"set MODEL.MIT.PRETRAINED {folder}; or SegFormer's mit_{variant}.pth (NVlabs/SegFormer, mmsegmentation) "
        f"as MODEL.MIT.PRETRAINED /path/to/mit_{variant}.pth; or MODEL.MIT.PRETRAINED '' for a random "
        "initialisation."
    )


def load_mit_weights(encoder: SegformerModel, path: str, variant: str) -> None:
    """Load pretrained MiT weights from ``path`` into ``encoder`` (every encoder weight required).

    Raises:
        FileNotFoundError: ``path`` does not exist (the message says what to download).
        ValueError: the checkpoint misses encoder weights or has other shapes (wrong variant).
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"MODEL.MIT.PRETRAINED={path!r} does not exist. {mit_download_hint(path, variant)}")
    weights = convert_mit_state_dict(_read_checkpoint(path))
    expected = encoder.state_dict()
    missing = sorted(set(expected) - set(weights))
    if missing:
        raise ValueError(
            f"{path} is not a MiT-{variant.upper()} checkpoint: {len(missing)} encoder weights missing, "
            f"e.g. {missing[:3]}"
        )
    wrong_shape = [k for k in expected if tuple(weights[k].shape) != tuple(expected[k].shape)]
    if wrong_shape:
        key = wrong_shape[0]
        raise ValueError(
            f"{path} does not match MiT-{variant.upper()}: {key} has shape {tuple(weights[key].shape)}, "
            f"expected {tuple(expected[key].shape)} (is MODEL.MIT.VARIANT right?)"
        )
    encoder.load_state_dict({k: weights[k] for k in expected}, strict=True)
    logger.info("Loaded MiT-%s weights from %s", variant.upper(), path)


class MixVisionTransformer(Backbone):
    """MiT encoder returning ``res2`` ... ``res5`` (B x C_i x H/s_i x W/s_i, s_i = 4, 8, 16, 32)."""

    def __init__(
        self,
        variant: str = "b5",
        drop_path_rate: float = 0.1,
        out_features: Tuple[str, ...] = _STAGE_NAMES,
        pretrained: str = "",
        in_channels: int = 3,
    ):
        """
        Args:
            variant: "b0" ... "b5".
            drop_path_rate: stochastic depth rate of the last block (linearly increasing).
            out_features: subset of "res2" ... "res5".
            pretrained: local checkpoint file or directory ("" = random initialisation).
            in_channels: image channels.
        """
        super().__init__()
        if variant not in MIT_VARIANTS:
            raise ValueError(f"MODEL.MIT.VARIANT must be one of {sorted(MIT_VARIANTS)}, got {variant!r}")
        unknown = [name for name in out_features if name not in _STAGE_NAMES]
        if unknown:
            raise ValueError(f"MODEL.MIT.OUT_FEATURES: unknown {unknown}, expected a subset of {_STAGE_NAMES}")
        config = SegformerConfig(
            num_channels=in_channels, drop_path_rate=drop_path_rate, **MIT_VARIANTS[variant]
        )
        self.encoder = SegformerModel(config)
        if pretrained:
            load_mit_weights(self.encoder, pretrained, variant)
        self._out_features = list(out_features)
        self._out_feature_channels = dict(zip(_STAGE_NAMES, config.hidden_sizes))
        self._out_feature_strides = dict(zip(_STAGE_NAMES, _STAGE_STRIDES))
        self._num_stages = max(_STAGE_NAMES.index(name) for name in self._out_features) + 1

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """x: B x 3 x H x W normalised image -> {name: B x C x ceil(H/s) x ceil(W/s)}."""
        if x.dim() != 4:
            raise ValueError(f"MiT expects a B x C x H x W tensor, got shape {tuple(x.shape)}")
        outputs = {}
        hidden = x
        for name, stage in zip(_STAGE_NAMES[: self._num_stages], self.encoder.stages):
            hidden = stage(hidden)
            if name in self._out_features:
                outputs[name] = hidden
        return outputs

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {
            name: ShapeSpec(channels=self._out_feature_channels[name], stride=self._out_feature_strides[name])
            for name in self._out_features
        }

    @property
    def size_divisibility(self) -> int:
        return 32


@BACKBONE_REGISTRY.register()
def build_mit_backbone(cfg: CfgNode, input_shape: ShapeSpec) -> MixVisionTransformer:
    """MiT from ``MODEL.MIT.{VARIANT, DROP_PATH_RATE, OUT_FEATURES, PRETRAINED}``."""
    return MixVisionTransformer(
        variant=cfg.MODEL.MIT.VARIANT,
        drop_path_rate=cfg.MODEL.MIT.DROP_PATH_RATE,
        out_features=tuple(cfg.MODEL.MIT.OUT_FEATURES),
        pretrained=cfg.MODEL.MIT.PRETRAINED,
        in_channels=input_shape.channels,
    )
