"""How UDA methods run the student: every forward through one (optionally DDP-wrapped) module, under
autocast, and every backward through the gradient scaler.

A UDA step runs the student several times (source losses, target predictions, mixed losses), each
followed by its own backward. Routing all of them through :class:`StudentForward` keeps them inside
``DistributedDataParallel.forward``, so the gradients of each pass are all-reduced across processes.
"""
import contextlib
from typing import Dict, List, Optional, Tuple

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from detectron2.utils import comm

from ..utils.padding import stack_padded

__all__ = [
    "StudentForward",
    "StudentRunner",
    "common_size",
    "needs_unused_parameter_search",
    "stack_images",
]


class StudentForward(nn.Module):
    """Dispatches the three kinds of student passes of a UDA step to the model.

    ``forward("losses", batched_inputs)`` -> dict of losses;
    ``forward("losses_and_features", batched_inputs, feature_name=...)`` ->
    ``(losses, features B x C x h x w, normalised padded images B x 3 x H' x W')``;
    ``forward("losses_and_dense", batched_inputs)`` -> ``(losses, predict_dense outputs
    of the normalised padded images the losses were computed from)``;
    ``forward("dense", images)`` -> the model's ``predict_dense`` outputs for normalised images.
    """

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, task: str, inputs, feature_name: Optional[str] = None):
        if task == "losses":
            return self.model(inputs)
        if task == "losses_and_features":
            losses, features = self.model.losses_and_features(inputs)
            images = self.model.preprocess_image(inputs).tensor
            return losses, features[feature_name], images
        if task == "losses_and_dense":
            dense = self.model.predict_dense(self.model.preprocess_image(inputs).tensor)
            return self.model.losses(dense, inputs), dense
        if task == "dense":
            return self.model.predict_dense(inputs)
        raise ValueError(
            f"unknown student task {task!r}; expected 'losses', 'losses_and_features', 'losses_and_dense' or 'dense'"
        )


def common_size(batched_inputs: List[dict]) -> Tuple[int, int]:
    """The largest image height and width of a batch (the size UDA batches are padded to)."""
    return (
        max(x["image"].shape[-2] for x in batched_inputs),
        max(x["image"].shape[-1] for x in batched_inputs),
    )


def stack_images(
    batched_inputs: List[dict], device: torch.device, size: Optional[Tuple[int, int]] = None
) -> Tuple[torch.Tensor, torch.Tensor]:
    """The ``"image"`` tensors (3 x H_i x W_i, 0-255) of a batch as one float ``B x 3 x H x W`` on ``device``
    (zero-padded to ``size``, by default the largest image) and the bool ``B x H x W`` mask of real pixels."""
    images = [x["image"].to(device=device, dtype=torch.float32) for x in batched_inputs]
    valid = [torch.ones(image.shape[-2:], dtype=torch.bool, device=device) for image in images]
    return stack_padded(images, 0.0, size), stack_padded(valid, False, size)


def needs_unused_parameter_search(model: nn.Module, semantic_only_pass: bool) -> bool:
    """Whether a UDA step leaves some student parameters out of a pass's graph, so that DDP must search
    each graph for them (``find_unused_parameters``): a pass whose loss depends on the semantic output
    alone (``semantic_only_pass``, AdvEnt, AdvSeg, MinEnt) does not reach the instance head of a
    panoptic model. Every other pass computes all the model's losses and reaches every parameter."""
    return semantic_only_pass and model.instance_on


class StudentRunner:
    """Runs the student for a UDA method.

    Args:
        model: the (unwrapped) meta-architecture; gives ``pixel_mean``, ``pixel_std``, ``device``.
        amp: run forwards under ``torch.autocast`` of the model's device type.
        grad_scaler: ``torch.amp.GradScaler`` used by :meth:`backward`.
        find_unused_parameters: passed to DDP: some pass does not reach every parameter (see
            :func:`needs_unused_parameter_search`); otherwise DDP skips that search of every graph.
    """

    def __init__(
        self, model: nn.Module, amp: bool, grad_scaler: torch.amp.GradScaler, find_unused_parameters: bool = False
    ):
        self.model = model
        self.amp = amp
        self.grad_scaler = grad_scaler
        forward = StudentForward(model)
        if comm.get_world_size() > 1:
            device_ids = [comm.get_local_rank()] if model.device.type == "cuda" else None
            forward = DistributedDataParallel(
                forward,
                device_ids=device_ids,
                broadcast_buffers=False,
                find_unused_parameters=find_unused_parameters,
            )
        self.forward = forward

    def autocast(self) -> contextlib.AbstractContextManager:
        """Autocast context of the model's device (a no-op when AMP is off)."""
        return torch.autocast(device_type=self.model.device.type, enabled=self.amp)

    def losses(self, batched_inputs: List[dict]) -> Dict[str, torch.Tensor]:
        """The model's training losses on ``batched_inputs``."""
        with self.autocast():
            return self.forward("losses", batched_inputs)

    def losses_and_features(
        self, batched_inputs: List[dict], feature_name: str
    ) -> Tuple[Dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
        """Like :meth:`losses`, plus the encoder features ``feature_name`` and the normalised, padded
        images they were computed from (for the feature distance)."""
        with self.autocast():
            return self.forward("losses_and_features", batched_inputs, feature_name=feature_name)

    def losses_and_dense(
        self, batched_inputs: List[dict]
    ) -> Tuple[Dict[str, torch.Tensor], Dict[str, torch.Tensor]]:
        """Like :meth:`losses`, plus the dense predictions they were computed from (``"sem_seg"`` logits
        B x C x H' x W' for the batch padded as the model pads it, bottom/right, ...)."""
        with self.autocast():
            return self.forward("losses_and_dense", batched_inputs)

    def predict_dense(self, images: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Dense student outputs (``"sem_seg"`` logits B x C x H x W, ...) for raw images B x 3 x H x W, 0-255."""
        with self.autocast():
            return self.forward("dense", self.normalize(images))

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """``(images - pixel_mean) / pixel_std`` for float images B x 3 x H x W, 0-255."""
        mean = self.model.pixel_mean.reshape(1, -1, 1, 1)
        std = self.model.pixel_std.reshape(1, -1, 1, 1)
        return (images - mean) / std

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of ``loss`` through the gradient scaler (gradients accumulate across calls)."""
        self.grad_scaler.scale(loss).backward()
