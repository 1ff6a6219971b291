"""Checks of the config keys, run before anything is built or written, with errors that name the full
key, its value and what is expected. The allowed values come from the code that uses them."""
import os
from typing import Any, Sequence

from detectron2.config import CfgNode

from ..gbw.grad_norms import CE_MODES
from ..gbw.qp import LAMBDA_MODES, SOLVERS
from ..data.mapper import FLIP_DIRECTIONS
from ..modeling.backbone.mit import mit_download_hint
from ..modeling.meta_arch import CENTER_PIXEL_CLASSES, CLASS_WEIGHTINGS
from ..modeling.top_down import UDA_METHODS as TOP_DOWN_UDA_METHODS
from .method import UDA_METHOD_REGISTRY, uda_method_names
from .optim import CLIP_TYPES, OPTIMIZERS

__all__ = ["check_gbw_config", "check_uda_config", "check_weights_config"]

GBW_LOSSES = ("SEM_SEG", "CENTER", "OFFSET")

#: Where Detectron2's ``detectron2://`` model-zoo names are served from.
DETECTRON2_MODEL_ZOO = "https://dl.fbaipublicfiles.com/detectron2/"


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def _require_choice(key: str, value: Any, choices: Sequence[str]) -> None:
    _require(value in choices, f"{key}={value!r} is unknown; expected one of {tuple(choices)}")


def check_gbw_config(cfg: CfgNode) -> None:
    """Raise ``ValueError`` naming the key (e.g. ``MODEL.GBW.CENTER.LAMBDA_MODE``), its value and the
    allowed values for an invalid ``MODEL.GBW.<LOSS>`` node, ``MODEL.GBW.CENTER.PIXEL_CLASS`` or
    ``MODEL.SEM_SEG_HEAD.CLASS_WEIGHTING``; the checks the model and its GBW losses make when they are
    built, done before anything is written."""
    for loss in GBW_LOSSES:
        node, prefix = cfg.MODEL.GBW[loss], f"MODEL.GBW.{loss}"
        _require_choice(f"{prefix}.LAMBDA_MODE", node.LAMBDA_MODE, LAMBDA_MODES)
        _require_choice(f"{prefix}.SOLVER", node.SOLVER, SOLVERS)
        _require(node.LAMBDA > 0, f"{prefix}.LAMBDA={node.LAMBDA} must be > 0 (reference 1.0)")
    _require_choice("MODEL.GBW.SEM_SEG.MODE", cfg.MODEL.GBW.SEM_SEG.MODE, CE_MODES)
    _require_choice("MODEL.GBW.CENTER.PIXEL_CLASS", cfg.MODEL.GBW.CENTER.PIXEL_CLASS, CENTER_PIXEL_CLASSES)
    weighting = cfg.MODEL.SEM_SEG_HEAD.CLASS_WEIGHTING
    _require_choice("MODEL.SEM_SEG_HEAD.CLASS_WEIGHTING", weighting, CLASS_WEIGHTINGS)
    _require(
        weighting == "none" or not cfg.MODEL.GBW.SEM_SEG.ENABLED,
        f"MODEL.SEM_SEG_HEAD.CLASS_WEIGHTING={weighting!r} replaces GBW's class weights of the cross-entropy; "
        "set it to 'none' or MODEL.GBW.SEM_SEG.ENABLED False",
    )


def check_uda_config(cfg: CfgNode) -> None:
    """Raise ``ValueError`` naming the key, its value and what is expected for an invalid config
    (``UDA.*``, ``MODEL.SYNC_BN`` with the decoders' ``NORM``, ``SOLVER.MAX_ITER`` / ``OPTIMIZER`` /
    ``CLIP_GRADIENTS.CLIP_TYPE``, ``INPUT.RANDOM_FLIP``,
    ``DATALOADER.RCS.MIN_CROP_RATIO`` and, through :func:`check_gbw_config`, ``MODEL.GBW.*``)."""
    check_gbw_config(cfg)
    _require_choice("UDA.METHOD", cfg.UDA.METHOD, uda_method_names())
    method = {cls.config_name: cls for _, cls in UDA_METHOD_REGISTRY}[cfg.UDA.METHOD]
    _require(
        cfg.MODEL.META_ARCHITECTURE != "GBWTopDownPanopticSegmentor" or cfg.UDA.METHOD in TOP_DOWN_UDA_METHODS,
        f"UDA.METHOD={cfg.UDA.METHOD!r}: MODEL.META_ARCHITECTURE 'GBWTopDownPanopticSegmentor' trains with one of "
        f"{TOP_DOWN_UDA_METHODS}",
    )
    _require(len(cfg.DATASETS.TRAIN) > 0, "DATASETS.TRAIN is empty; name the labelled source dataset(s)")
    _require(
        not method.uses_target or len(cfg.DATASETS.TARGET_TRAIN) > 0,
        f"UDA.METHOD={cfg.UDA.METHOD!r} trains on target images but DATASETS.TARGET_TRAIN is empty; name the "
        "unlabelled target dataset(s) (e.g. 'cityscapes_panoptic_train') or use UDA.METHOD 'source_only'",
    )
    _require(
        0.0 < cfg.UDA.PSEUDO_THRESHOLD < 1.0,
        f"UDA.PSEUDO_THRESHOLD={cfg.UDA.PSEUDO_THRESHOLD} must lie strictly between 0 and 1 (reference 0.968)",
    )
    _require(0.0 <= cfg.UDA.EMA_ALPHA < 1.0, f"UDA.EMA_ALPHA={cfg.UDA.EMA_ALPHA} must lie in [0, 1) (reference 0.999)")
    for key in ("PSEUDO_WEIGHT_IGNORE_TOP", "PSEUDO_WEIGHT_IGNORE_BOTTOM"):
        value = cfg.UDA[key]
        _require(isinstance(value, int) and value >= 0, f"UDA.{key}={value!r} must be a number of rows >= 0")
    _require(
        0.0 <= cfg.UDA.COLOR_JITTER_PROB <= 1.0, f"UDA.COLOR_JITTER_PROB={cfg.UDA.COLOR_JITTER_PROB} must lie in [0, 1]"
    )
    strength = cfg.UDA.COLOR_JITTER_STRENGTH
    _require(strength >= 0, f"UDA.COLOR_JITTER_STRENGTH={strength} must be >= 0")
    for key in (
        "FD.WEIGHT", "ADVENT.LOSS_WEIGHT", "ADVENT.DISC_LR", "ADVSEG.LOSS_WEIGHT", "ADVSEG.DISC_LR",
        "ADVSEG.DISC_LR_POWER", "MINENT.LOSS_WEIGHT",
    ):  # fmt: skip
        group, name = key.split(".")
        value = cfg.UDA[group][name]
        _require(value >= 0, f"UDA.{key}={value} must be >= 0")
    _require(
        0.0 < cfg.UDA.FD.SCALE_MIN_RATIO <= 1.0,
        f"UDA.FD.SCALE_MIN_RATIO={cfg.UDA.FD.SCALE_MIN_RATIO} must lie in (0, 1]",
    )
    decoders = ("SEM_SEG_HEAD", "INS_EMBED_HEAD") if cfg.MODEL.INS_EMBED_HEAD.ENABLED else ("SEM_SEG_HEAD",)
    for head in decoders if cfg.MODEL.SYNC_BN else ():
        norm = cfg.MODEL[head].NORM
        _require(
            norm == "BN",
            f"MODEL.SYNC_BN=True synchronises the decoders' BatchNorm ('BN') over the processes, but "
            f"MODEL.{head}.NORM={norm!r}; set it to 'BN', or MODEL.SYNC_BN to False to keep {norm!r}",
        )
    margins = cfg.UDA.PSEUDO_LABEL_MARGINS
    _require(
        len(margins) == 4 and min(margins) >= 0,
        f"UDA.PSEUDO_LABEL_MARGINS={list(margins)} must be 4 pixel counts >= 0 (top, bottom, left, right)",
    )
    ratio = cfg.DATALOADER.RCS.MIN_CROP_RATIO
    _require(ratio >= 0, f"DATALOADER.RCS.MIN_CROP_RATIO={ratio} must be >= 0 (0.5 DAFormer, 2.0 HRDA, 0 off)")
    _require(cfg.SOLVER.MAX_ITER > 0, f"SOLVER.MAX_ITER={cfg.SOLVER.MAX_ITER} must be > 0")
    _require_choice("INPUT.RANDOM_FLIP", cfg.INPUT.RANDOM_FLIP, FLIP_DIRECTIONS)
    _require(
        str(cfg.SOLVER.OPTIMIZER).upper() in OPTIMIZERS,
        f"SOLVER.OPTIMIZER={cfg.SOLVER.OPTIMIZER!r} is unknown; expected one of {OPTIMIZERS} (any case)",
    )
    if cfg.SOLVER.CLIP_GRADIENTS.ENABLED:
        _require_choice("SOLVER.CLIP_GRADIENTS.CLIP_TYPE", cfg.SOLVER.CLIP_GRADIENTS.CLIP_TYPE, CLIP_TYPES)


def _download_command(url: str, path: str) -> str:
    return f"`mkdir -p {os.path.dirname(path) or '.'} && wget -O {path} {url}`"


def check_weights_config(cfg: CfgNode) -> None:
    """The weights a run loads are local files that exist, checked before anything is built: ``MODEL.WEIGHTS``
    (a checkpoint, or the ImageNet weights of the ResNet configs, ``pretrained/R-103.pkl``) and, for a MiT
    backbone, ``MODEL.MIT.PRETRAINED`` (a file or a ``hf download`` folder).

    Raises:
        ValueError: ``MODEL.WEIGHTS`` is a URL (downloaded at run time, which fails on compute nodes without
            internet); the message gives the command that downloads it once and the local path to set.
        FileNotFoundError: a weights path does not exist; the message names the key, the path and, for the
            ImageNet weights, how to download them.
    """
    weights = cfg.MODEL.WEIGHTS
    if "://" in weights:
        url = weights.replace("detectron2://", DETECTRON2_MODEL_ZOO, 1)
        local = os.path.join("pretrained", os.path.basename(url))
        raise ValueError(
            f"MODEL.WEIGHTS={weights!r} is a URL, which would be downloaded when the run starts (compute nodes "
            f"without internet fail there): download it once where there is internet, e.g. on a login node, "
            f"{_download_command(url, local)}, and set MODEL.WEIGHTS {local}"
        )
    if weights and not os.path.isfile(weights):
        hint = "a checkpoint of tools/train_net.py (OUTPUT_DIR/model_final.pth) or ImageNet weights"
        if os.path.basename(weights) == "R-103.pkl":
            hint = (
                "Detectron2's ImageNet ResNet-101 with the DeepLab stem; download it once on a machine with "
                f"internet (e.g. a login node): {_download_command(DETECTRON2_MODEL_ZOO + 'DeepLab/R-103.pkl', weights)}"
            )
        raise FileNotFoundError(f"MODEL.WEIGHTS={weights!r}: no such file ({hint})")
    pretrained = cfg.MODEL.MIT.PRETRAINED
    if cfg.MODEL.BACKBONE.NAME == "build_mit_backbone" and pretrained and not os.path.exists(pretrained):
        raise FileNotFoundError(
            f"MODEL.MIT.PRETRAINED={pretrained!r} does not exist. {mit_download_hint(pretrained, cfg.MODEL.MIT.VARIANT)}"
        )
