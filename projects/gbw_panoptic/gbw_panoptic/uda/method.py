"""UDA methods: the registry, the shared supervised source step, and the source-only baseline.

A method is an ``nn.Module`` holding its own networks (EMA teacher, discriminator, frozen encoder), so
they move to the model's device and are checkpointed with the trainer. Per iteration the trainer calls
:meth:`UDAMethod.before_step`, then :meth:`UDAMethod.run_step` (forwards and backwards; the trainer steps
the student's optimizer afterwards, and the optimizers of :meth:`UDAMethod.optimizers`). GBW is
independent of the method: it lives in the model's losses (``MODEL.GBW.*``); after each pass of the
student that computes losses, the method takes the class weights they used with :func:`gbw_weights`
under the pass's name (``source``, ``mixed``), and the trainer logs them.
"""
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import nn

from detectron2.config import CfgNode, configurable
from detectron2.data import MetadataCatalog
from detectron2.utils.registry import Registry

from .feature_distance import FeatureDistance
from ..utils.padding import stack_padded
from .runner import StudentRunner

__all__ = [
    "UDA_METHOD_REGISTRY",
    "UDAMethod",
    "SourceOnly",
    "uda_method_names",
    "build_uda_method",
    "build_feature_distance",
    "gbw_weights",
    "stack_field",
]

UDA_METHOD_REGISTRY = Registry("UDA_METHOD")
UDA_METHOD_REGISTRY.__doc__ = """
Registry of UDA methods; ``UDA.METHOD`` selects the class whose ``config_name`` matches.
A method is built as ``cls(cfg, model)`` (``@configurable``).
"""


class StepOutput(NamedTuple):
    """What one step of a method gives the trainer to log."""

    # The losses it back-propagated, detached.
    losses: Dict[str, torch.Tensor]
    # Other scalars (``dacs/...``, ...).
    metrics: Dict[str, float]
    # The GBW class weights of its passes and the class statistics they were solved from, on the
    # device (:func:`gbw_weights`).
    gbw_weights: Dict[str, torch.Tensor]


def gbw_weights(model: nn.Module, label: str) -> Dict[str, torch.Tensor]:
    """The class weights that the GBW losses of ``model`` (unwrapped) used in its last training pass and,
    for the cross-entropy losses, the per-class statistics they were solved from, named as the trainer
    logs them: ``{"gbw/<label>/<loss>/<class name>": weight, "gbw_stats/<label>/<loss>/<class
    name>/<sq_norm|pixels|ce>": statistic}``, 0-dim float32 tensors on the model's device (nothing is
    read back); empty with GBW off."""
    entries = {f"gbw/{label}/{name}": weight for name, weight in model.gbw_class_weights().items()}
    entries.update((f"gbw_stats/{label}/{name}", value) for name, value in model.gbw_class_statistics().items())
    return entries


def stack_field(
    batched_inputs: List[dict],
    field: str,
    device: torch.device,
    pad_value: float = 0.0,
    size: Optional[Tuple[int, int]] = None,
) -> torch.Tensor:
    """One field of every dict of a batch stacked on ``device`` (:func:`stack_padded` with ``pad_value``
    to ``size``); a clear error if a dict lacks it."""
    missing = [x.get("file_name", index) for index, x in enumerate(batched_inputs) if field not in x]
    if missing:
        raise KeyError(f"training dicts {missing} have no {field!r}; the source mapper must provide it")
    return stack_padded([x[field].to(device) for x in batched_inputs], pad_value, size)


def build_feature_distance(cfg: CfgNode, model: nn.Module) -> Optional[FeatureDistance]:
    """The feature-distance regulariser of ``UDA.FD``, or None when it is off.

    It is on when ``UDA.FD.WEIGHT > 0`` and the encoder starts from pretrained weights
    (``MODEL.MIT.PRETRAINED`` or ``MODEL.WEIGHTS``); the compared classes are ``UDA.FD.CLASSES`` or, when
    empty, the thing classes of the first source dataset.
    """
    pretrained = bool(cfg.MODEL.MIT.PRETRAINED) or bool(cfg.MODEL.WEIGHTS)
    if cfg.UDA.FD.WEIGHT <= 0 or not pretrained:
        return None
    classes = list(cfg.UDA.FD.CLASSES)
    if not classes:
        metadata = MetadataCatalog.get(cfg.DATASETS.TRAIN[0])
        classes = sorted(metadata.thing_dataset_id_to_contiguous_id.values())
    return FeatureDistance(
        model,
        feature_name=cfg.UDA.FD.FEATURE,
        classes=classes,
        num_classes=cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
        min_ratio=cfg.UDA.FD.SCALE_MIN_RATIO,
        weight=cfg.UDA.FD.WEIGHT,
        ignore_value=cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
    )


class UDAMethod(nn.Module):
    """Base class: the supervised source step shared by every method.

    The source step computes the model's losses on the source batch (GBW weights logged under
    ``gbw/source``), adds the feature distance when it is on, and back-propagates them.
    """

    config_name = ""
    uses_target = True
    # Whether run_step back-propagates a loss of the student's semantic output alone
    # (``runner.predict_dense``), a pass that does not reach the instance head of a panoptic model.
    semantic_only_pass = False

    @configurable
    def __init__(self, *, feature_distance: Optional[FeatureDistance] = None, ignore_value: int = 255):
        super().__init__()
        self.feature_distance = feature_distance
        self.ignore_value = ignore_value

    @classmethod
    def from_config(cls, cfg: CfgNode, model: nn.Module) -> dict:
        return {
            "feature_distance": build_feature_distance(cfg, model),
            "ignore_value": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
        }

    def optimizers(self) -> Dict[str, torch.optim.Optimizer]:
        """Optimizers of the method's own networks, stepped by the trainer after the student's."""
        return {}

    def schedulers(self) -> Dict[str, torch.optim.lr_scheduler.LRScheduler]:
        """Learning-rate schedules of :meth:`optimizers`, stepped by the trainer after each iteration."""
        return {}

    def before_step(self, model: nn.Module, iteration: int) -> None:
        """Called before the forwards of ``iteration`` (e.g. to update an EMA teacher)."""

    def source_step(self, runner: StudentRunner, source_batch: List[dict]) -> StepOutput:
        """Forward and backward of the supervised source losses; returns them detached, with the GBW
        weights of the pass (``gbw/source/...``) and no other metric."""
        if self.feature_distance is None:
            losses = runner.losses(source_batch)
        else:
            losses, features, images = runner.losses_and_features(
                source_batch, feature_name=self.feature_distance.feature_name
            )
            labels = stack_field(source_batch, "sem_seg", images.device, pad_value=self.ignore_value)
            losses["loss_fd"] = self.feature_distance(features, images, labels)
        source_weights = gbw_weights(runner.model, "source")
        runner.backward(sum(losses.values()))
        return StepOutput({name: value.detach() for name, value in losses.items()}, {}, source_weights)

    def run_step(
        self, runner: StudentRunner, source_batch: List[dict], target_batch: List[dict], iteration: int
    ) -> StepOutput:
        """Forwards and backwards of one iteration; returns what the trainer logs."""
        raise NotImplementedError


@UDA_METHOD_REGISTRY.register()
class SourceOnly(UDAMethod):
    """The source-only baseline: supervised source losses only (target images are not used)."""

    config_name = "source_only"
    uses_target = False

    def run_step(
        self, runner: StudentRunner, source_batch: List[dict], target_batch: List[dict], iteration: int
    ) -> StepOutput:
        return self.source_step(runner, source_batch)


def uda_method_names() -> List[str]:
    """The ``UDA.METHOD`` values of the registered methods."""
    return sorted(cls.config_name for _, cls in UDA_METHOD_REGISTRY)


def build_uda_method(cfg: CfgNode, model: nn.Module) -> UDAMethod:
    """Build the method of ``cfg.UDA.METHOD`` for ``model``, on the model's device."""
    for _, cls in UDA_METHOD_REGISTRY:
        if cls.config_name == cfg.UDA.METHOD:
            return cls(cfg, model).to(model.device)
    raise ValueError(f"UDA.METHOD={cfg.UDA.METHOD!r} is unknown; expected one of {uda_method_names()}")
