"""Dataset mapper: reads one dataset dict's files, augments them and builds the model's inputs.

One mapper serves the three roles of UDA training (Detectron2 style, built from the config):

- labelled source training (``is_train=True, load_labels=True``): image + Panoptic-DeepLab
  targets (``sem_seg``, ``sem_seg_weights``, ``center``, ``center_weights``, ``offset``,
  ``offset_weights``);
- unlabelled target training (``is_train=True, load_labels=False``): the image only;
- labelled evaluation (``is_train=False``): the image, plus the targets when ``load_labels``.

Training augmentations (DAFormer / EDAPS recipe, all from ``detectron2.data.transforms``): resize
so that the image fits ``ratio * base size`` (aspect ratio kept, ratio uniform in
``INPUT.RESIZE_RATIO_RANGE``; the base size of the domain: ``INPUT.SOURCE_BASE_SIZE`` for the
labelled source, ``INPUT.TARGET_BASE_SIZE`` for the unlabelled target, ``INPUT.BASE_SIZE`` where
those are empty), a random ``INPUT.CROP.SIZE`` crop (re-drawn up to 10 times until no single class
covers more than ``INPUT.CROP.SINGLE_CATEGORY_MAX_AREA`` of it when labels are loaded; a plain random
crop without labels, so that unlabelled target images never look at labels), and a random flip.
Evaluation resizes the image to fit ``INPUT.BASE_SIZE`` (the identity for Cityscapes at 1024x2048).

With rare class sampling, a source dict carries the class it was drawn for (``"rcs_class"``) and the
mapper redraws the augmentation (up to 10 tries in all, as DAFormer) until the crop holds more than
``rcs_min_crop_pixels`` pixels of that class (``DATALOADER.RCS.MIN_CROP_RATIO * MIN_PIXELS``).

Every label tensor is aligned with ``"image"`` (same transforms, nearest-neighbour resampling).
"""
import copy
import logging
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from panopticapi.utils import rgb2id

from detectron2.config import CfgNode, configurable
from detectron2.data import MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from .image_io import read_image
from .instance_masks import InstanceMaskTargetGenerator
from .panoptic_target import PanopticTargetGenerator

__all__ = [
    "FLIP_DIRECTIONS",
    "DOMAINS",
    "RCS_CLASS_KEY",
    "RCS_CROP_TRIES",
    "GBWPanopticDatasetMapper",
    "base_size",
    "build_augmentations",
    "build_target_generator",
]

# Values of INPUT.RANDOM_FLIP.
FLIP_DIRECTIONS = ("none", "horizontal", "vertical")

logger = logging.getLogger(__name__)

# The training domains, each with its own base size.
DOMAINS = ("source", "target")
# Dataset-dict key of the class rare class sampling drew the image for.
RCS_CLASS_KEY = "rcs_class"
# Augmentations drawn at most per image until the crop holds enough of that class (DAFormer: 10).
RCS_CROP_TRIES = 10


def base_size(cfg: CfgNode, domain: Optional[str]) -> Tuple[int, int]:
    """(height, width) the resize ratio applies to: ``INPUT.SOURCE_BASE_SIZE`` or
    ``INPUT.TARGET_BASE_SIZE`` for training images of that ``domain`` when set, else (and for
    evaluation, ``domain`` None) ``INPUT.BASE_SIZE``."""
    if domain is not None and domain not in DOMAINS:
        raise ValueError(f"domain must be one of {DOMAINS} or None, got {domain!r}")
    key = f"{domain.upper()}_BASE_SIZE" if domain is not None and cfg.INPUT[f"{domain.upper()}_BASE_SIZE"] else "BASE_SIZE"
    size = cfg.INPUT[key]
    if len(size) != 2 or min(size) <= 0:
        raise ValueError(f"INPUT.{key}={list(size)} must be [height, width] in pixels, both > 0")
    return int(size[0]), int(size[1])


def build_augmentations(
    cfg: CfgNode, is_train: bool, load_labels: bool = True, domain: Optional[str] = None
) -> List[T.Augmentation]:
    """The augmentations of the module docstring.

    Args:
        cfg: config with ``INPUT.*`` keys.
        is_train: training (random resize, crop, flip) or evaluation (fit to ``INPUT.BASE_SIZE``).
        load_labels: labels are available, so the crop may use the category area constraint.
        domain: "source" or "target" for training images: which base size applies (see
            :func:`base_size`); None: ``INPUT.BASE_SIZE``.
    """
    base_height, base_width = base_size(cfg, domain if is_train else None)
    if not is_train:
        return [T.ResizeScale(1.0, 1.0, base_height, base_width)]
    min_ratio, max_ratio = cfg.INPUT.RESIZE_RATIO_RANGE
    augmentations: List[T.Augmentation] = [T.ResizeScale(min_ratio, max_ratio, base_height, base_width)]
    if cfg.INPUT.CROP.ENABLED:
        if load_labels:
            augmentations.append(
                T.RandomCrop_CategoryAreaConstraint(
                    cfg.INPUT.CROP.TYPE,
                    cfg.INPUT.CROP.SIZE,
                    cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA,
                    cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
                )
            )
        else:
            augmentations.append(T.RandomCrop(cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE))
    flip = cfg.INPUT.RANDOM_FLIP
    if flip != "none":
        augmentations.append(T.RandomFlip(horizontal=flip == "horizontal", vertical=flip == "vertical"))
    return augmentations


def build_target_generator(cfg: CfgNode, dataset_name: str) -> PanopticTargetGenerator:
    """The Panoptic-DeepLab target generator for ``dataset_name``'s classes: offset weight on thing pixels
    only (Panoptic-DeepLab's Cityscapes setting), each center Gaussian's peak at the floor of the instance's
    mean position and no extra semantic weight for small instances (both EDAPS), ``INPUT.GAUSSIAN_SIGMA``
    and ``INPUT.IGNORE_CROWD_IN_SEMANTIC`` from the config."""
    meta = MetadataCatalog.get(dataset_name)
    if not hasattr(meta, "thing_dataset_id_to_contiguous_id"):
        raise KeyError(
            f"Metadata of dataset '{dataset_name}' has no 'thing_dataset_id_to_contiguous_id'; "
            "a registered panoptic dataset is expected"
        )
    return PanopticTargetGenerator(
        ignore_label=meta.get("ignore_label", cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE),
        thing_ids=list(meta.thing_dataset_id_to_contiguous_id.values()),
        sigma=cfg.INPUT.GAUSSIAN_SIGMA,
        ignore_stuff_in_offset=True,
        ignore_crowd_in_semantic=cfg.INPUT.IGNORE_CROWD_IN_SEMANTIC,
        center_rounding="floor",
    )


class GBWPanopticDatasetMapper:
    """Maps a dataset dict (Detectron2 panoptic format) to the model's input dict.

    Output keys: ``"image"`` (uint8 ``3xHxW``, RGB 0-255), the input's ``file_name``, ``image_id``,
    ``height``, ``width`` (original size), and with labels ``"sem_seg"`` (int64 ``HxW``, 255
    ignore) and ``"sem_seg_weights"`` (float32 ``HxW``). With a target generator and an image
    whose dict has ``has_instances`` True (the default) and a ``pan_seg_file_name``, also
    ``"center"`` (float32 ``1xHxW``), ``"center_weights"`` (float32 ``HxW``), ``"offset"``
    (float32 ``2xHxW``, dy, dx in pixels) and ``"offset_weights"`` (float32 ``HxW``); images
    without instances get none of these, so that the instance losses skip them. With an instance mask
    generator (``MODEL.MASK_ON``, the top-down model) such an image gets ``"sem_seg"``,
    ``"sem_seg_weights"`` and ``"instances"`` (Mask R-CNN targets of its thing segments) instead.

    A dict with ``"rcs_class"`` (set by rare class sampling) has its augmentation redrawn, up to
    :data:`RCS_CROP_TRIES` times, until its crop holds more than ``rcs_min_crop_pixels`` pixels of
    that class (labels loaded only; the key is not passed on).
    """

    @configurable
    def __init__(
        self,
        *,
        is_train: bool,
        augmentations: List[Union[T.Augmentation, T.Transform]],
        image_format: str,
        load_labels: bool,
        target_generator: Optional[PanopticTargetGenerator] = None,
        rcs_min_crop_pixels: float = 0.0,
        pseudo_label_margins: Sequence[int] = (0, 0, 0, 0),
        instance_mask_generator: Optional[InstanceMaskTargetGenerator] = None,
    ):
        """
        Args:
            is_train: training mode (drops ``segments_info``, whose areas and boxes no longer
                match the augmented labels).
            augmentations: applied to the image and, aligned, to the labels.
            image_format: format for :func:`~gbw_panoptic.data.image_io.read_image`.
            load_labels: read ``sem_seg_file_name`` (and ``pan_seg_file_name``) and emit targets.
            target_generator: builds the instance targets from the panoptic labels; None for a
                semantic-only model.
            rcs_min_crop_pixels: pixels of the drawn rare class a crop must exceed (0: no redraws).
            pseudo_label_margins: (top, bottom, left, right) pixels of the original image where
                pseudo-labels are not trusted; when any is > 0, the output has ``"pseudo_label_valid"``
                (bool ``HxW``, False in the margins, transformed with the image).
            instance_mask_generator: builds ``sem_seg`` and the Mask R-CNN ``instances`` from the
                panoptic labels (used instead of ``target_generator``); None: no ``instances``.
        """
        self.pseudo_label_margins = tuple(pseudo_label_margins)
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.load_labels = load_labels
        self.target_generator = target_generator
        self.rcs_min_crop_pixels = rcs_min_crop_pixels
        self.instance_mask_generator = instance_mask_generator
        mode = "training" if is_train else "inference"
        logger.info(f"[GBWPanopticDatasetMapper] augmentations used in {mode}: {augmentations}")

    @classmethod
    def from_config(
        cls,
        cfg: CfgNode,
        is_train: bool = True,
        load_labels: bool = True,
        dataset_name: Optional[str] = None,
        domain: Optional[str] = None,
    ) -> Dict[str, Any]:
        """
        Args:
            cfg: the project config.
            is_train, load_labels: see ``__init__``.
            dataset_name: dataset whose metadata gives the thing classes of the instance targets
                (default ``DATASETS.TRAIN[0]``).
            domain: "source" or "target" for training images (their base size, see
                :func:`base_size`); None: ``INPUT.BASE_SIZE``.
        """
        generator = None
        if load_labels and cfg.MODEL.INS_EMBED_HEAD.ENABLED:
            generator = build_target_generator(cfg, dataset_name or cfg.DATASETS.TRAIN[0])
        instance_masks = None
        if load_labels and cfg.MODEL.MASK_ON:
            meta = MetadataCatalog.get(dataset_name or cfg.DATASETS.TRAIN[0])
            instance_masks = InstanceMaskTargetGenerator(
                thing_ids=list(meta.thing_dataset_id_to_contiguous_id.values()),
                ignore_label=meta.get("ignore_label", cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE),
                ignore_crowd_in_semantic=cfg.INPUT.IGNORE_CROWD_IN_SEMANTIC,
            )
        return {
            "is_train": is_train,
            "augmentations": build_augmentations(cfg, is_train, load_labels, domain),
            "image_format": cfg.INPUT.FORMAT,
            "load_labels": load_labels,
            "target_generator": generator,
            "rcs_min_crop_pixels": cfg.DATALOADER.RCS.MIN_CROP_RATIO * cfg.DATALOADER.RCS.MIN_PIXELS,
            "pseudo_label_margins": cfg.UDA.PSEUDO_LABEL_MARGINS if is_train and not load_labels else (0, 0, 0, 0),
            "instance_mask_generator": instance_masks,
        }

    def __call__(self, dataset_dict: Dict[str, Any]) -> Dict[str, Any]:
        """
        Args:
            dataset_dict: one image's dict in the dataset format (not modified).

        Returns:
            the model's input dict (see the class docstring).
        """
        dataset_dict = copy.deepcopy(dataset_dict)
        image = read_image(dataset_dict["file_name"], format=self.image_format)
        utils.check_image_size(dataset_dict, image)
        semantic = self._read_label(dataset_dict, "sem_seg_file_name", image) if self.load_labels else None

        rare_class = dataset_dict.pop(RCS_CLASS_KEY, None)
        aug_input = T.AugInput(image, sem_seg=semantic)
        transforms = self.augmentations(aug_input)
        if semantic is not None and rare_class is not None and self.rcs_min_crop_pixels > 0:
            for _ in range(RCS_CROP_TRIES):
                if np.count_nonzero(aug_input.sem_seg == rare_class) > self.rcs_min_crop_pixels:
                    break
                aug_input = T.AugInput(image, sem_seg=semantic)
                transforms = self.augmentations(aug_input)
        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1)))
        if any(self.pseudo_label_margins):
            top, bottom, left, right = self.pseudo_label_margins
            valid = np.zeros(image.shape[:2], dtype=np.uint8)
            valid[top : image.shape[0] - bottom, left : image.shape[1] - right] = 1
            valid = transforms.apply_segmentation(valid)
            dataset_dict["pseudo_label_valid"] = torch.as_tensor(np.ascontiguousarray(valid) > 0)

        if semantic is not None:
            panoptic_file = dataset_dict.get("pan_seg_file_name")
            generator = self.instance_mask_generator or self.target_generator
            if generator is not None and dataset_dict.get("has_instances", True) and panoptic_file:
                panoptic_rgb = self._read_label(dataset_dict, "pan_seg_file_name", image)
                panoptic = rgb2id(transforms.apply_segmentation(panoptic_rgb))
                dataset_dict.update(generator(panoptic, dataset_dict["segments_info"]))
            else:
                sem_seg = torch.as_tensor(aug_input.sem_seg.astype(np.int64))
                dataset_dict["sem_seg"] = sem_seg
                dataset_dict["sem_seg_weights"] = torch.ones(sem_seg.shape, dtype=torch.float32)
        if self.is_train:
            dataset_dict.pop("segments_info", None)
        return dataset_dict

    @staticmethod
    def _read_label(dataset_dict: Dict[str, Any], field: str, image: np.ndarray) -> np.ndarray:
        """Read the label PNG named by ``dataset_dict[field]``; check it matches ``image``.

        Returns:
            uint8 ``HxW`` for ``sem_seg_file_name`` (train ids), uint8 ``HxWx3`` for
            ``pan_seg_file_name`` (COCO panoptic RGB encoding).
        """
        if field not in dataset_dict:
            raise KeyError(
                f"Dataset dict of image '{dataset_dict.get('file_name')}' has no '{field}'; "
                "labels were requested from a dataset without them"
            )
        path = dataset_dict[field]
        label = read_image(path, "RGB" if field == "pan_seg_file_name" else None)
        expected_ndim = 3 if field == "pan_seg_file_name" else 2
        if label.ndim != expected_ndim or label.shape[:2] != image.shape[:2] or label.dtype != np.uint8:
            raise ValueError(
                f"{field} '{path}' has shape {label.shape} and dtype {label.dtype}; expected a "
                f"{'RGB' if expected_ndim == 3 else 'single-channel'} uint8 PNG of size "
                f"{image.shape[0]}x{image.shape[1]} like '{dataset_dict['file_name']}'"
            )
        return label
