"""Inference outside the evaluator, as the evaluator does it: a trained model loaded for prediction, and the
dense predictions that its inference forward post-processes (for tools that draw the center heatmap and
the offset field next to the post-processed outputs)."""
import os
from typing import Dict

import torch
from detectron2.checkpoint import DetectionCheckpointer
from detectron2.config import CfgNode
from detectron2.modeling import build_model

from .hrda import HRDASegmentor
from .meta_arch import GBWPanopticSegmentor

__all__ = ["inference_dense_predictions", "load_inference_model"]


def inference_dense_predictions(model: GBWPanopticSegmentor, images: torch.Tensor) -> Dict[str, torch.Tensor]:
    """What ``model.eval()(batched_inputs)`` post-processes, for normalised padded ``images`` B x 3 x H x W
    (``model.preprocess_image(batched_inputs).tensor``): HRDA's sliding test windows
    (:meth:`HRDASegmentor.predict_windows`), the single pass :meth:`GBWPanopticSegmentor.predict_dense`
    otherwise. ``model.postprocess(result, batched_inputs, image_sizes)`` gives the forward's outputs.

    Returns:
        ``"sem_seg"``: B x C x H x W logits; with the instance head also ``"center"`` (B x 1 x H x W) and
        ``"offset"`` (B x 2 x H x W, dy, dx in input pixels).
    """
    if isinstance(model, HRDASegmentor):
        return model.predict_windows(images)
    return model.predict_dense(images)


def load_inference_model(cfg: CfgNode) -> GBWPanopticSegmentor:
    """``build_model(cfg)`` with the checkpoint ``MODEL.WEIGHTS`` loaded, in eval mode (the ImageNet encoder
    weights of ``MODEL.MIT.PRETRAINED`` are not read: the checkpoint replaces them).

    Raises:
        ValueError: ``MODEL.WEIGHTS`` is empty.
        FileNotFoundError: ``MODEL.WEIGHTS`` names no file; the message names it.
    """
    weights = cfg.MODEL.WEIGHTS
    if not weights:
        raise ValueError("MODEL.WEIGHTS is empty: give the checkpoint to predict with as MODEL.WEIGHTS /path/to/model.pth")
    if not os.path.isfile(weights):
        raise FileNotFoundError(f"MODEL.WEIGHTS={weights!r}: no such file (a checkpoint of tools/train_net.py, e.g. OUTPUT_DIR/model_final.pth)")
    cfg = cfg.clone()
    cfg.defrost()
    cfg.MODEL.MIT.PRETRAINED = ""  # the checkpoint holds every weight: no ImageNet encoder weights needed
    model = build_model(cfg)
    DetectionCheckpointer(model).load(weights)
    return model.eval()
