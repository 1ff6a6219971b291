"""Checks of the UDA config keys, run before anything is built, with errors that say what to change."""
from detectron2.config import CfgNode

from .advseg import GAN_LOSSES
from .method import UDA_METHOD_REGISTRY, uda_method_names

__all__ = ["check_uda_config"]


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise ValueError(message)


def check_uda_config(cfg: CfgNode) -> None:
    """Raise ``ValueError`` naming the key, its value and what is expected for an invalid UDA config."""
    methods = {cls.config_name: cls for _, cls in UDA_METHOD_REGISTRY}
    method = methods.get(cfg.UDA.METHOD)
    _require(method is not None, f"UDA.METHOD={cfg.UDA.METHOD!r} is unknown; expected one of {uda_method_names()}")
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
        cfg.UDA.ADVSEG.GAN_LOSS in GAN_LOSSES,
        f"UDA.ADVSEG.GAN_LOSS={cfg.UDA.ADVSEG.GAN_LOSS!r} is unknown; expected one of {GAN_LOSSES} (reference 'LS')",
    )
    _require(
        0.0 < cfg.UDA.FD.SCALE_MIN_RATIO <= 1.0,
        f"UDA.FD.SCALE_MIN_RATIO={cfg.UDA.FD.SCALE_MIN_RATIO} must lie in (0, 1]",
    )
    _require(cfg.SOLVER.MAX_ITER > 0, f"SOLVER.MAX_ITER={cfg.SOLVER.MAX_ITER} must be > 0")
