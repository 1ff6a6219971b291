"""Optimizer and learning-rate schedule of UDA training (DAFormer / EDAPS recipe).

AdamW with four parameter groups: encoder and heads (the heads get ``SOLVER.HEAD_LR_MULTIPLIER`` times
the base learning rate), each split into parameters with weight decay and parameters without it
(normalisation layers and position embeddings, ``SOLVER.WEIGHT_DECAY_NORM``). The schedule is
Detectron2's ``WarmupPolyLR`` (linear warm-up, then polynomial decay), shared with the discriminator
optimizer of AdvEnt.
"""
from typing import Any, Dict, List

import torch
from torch import nn

from detectron2.config import CfgNode
from detectron2.projects.deeplab import build_lr_scheduler as build_deeplab_lr_scheduler

__all__ = ["CLIP_TYPES", "OPTIMIZERS", "NORM_MODULE_TYPES", "NO_DECAY_NAME_KEYS", "build_param_groups", "build_optimizer", "build_lr_scheduler"]

# Values of SOLVER.OPTIMIZER (case-insensitive) and of SOLVER.CLIP_GRADIENTS.CLIP_TYPE.
OPTIMIZERS = ("ADAMW", "SGD")
CLIP_TYPES = ("value", "norm")

NORM_MODULE_TYPES = (
    nn.modules.batchnorm._BatchNorm,
    nn.GroupNorm,
    nn.LayerNorm,
    nn.LocalResponseNorm,
    nn.modules.instancenorm._InstanceNorm,
)
# Parameter-name fragments of position embeddings (MiT's positional conv blocks, ViT-style embeddings).
NO_DECAY_NAME_KEYS = ("pos_embed", "position_embedding", "pos_block", "relative_position")


def _is_norm(module: nn.Module) -> bool:
    # Detectron2's FrozenBatchNorm2d has no parameters, so only trainable norm types matter here.
    return isinstance(module, NORM_MODULE_TYPES) or type(module).__name__.endswith("Norm")


def build_param_groups(
    model: nn.Module,
    base_lr: float,
    weight_decay: float,
    weight_decay_norm: float,
    head_lr_multiplier: float,
) -> List[Dict[str, Any]]:
    """Split the trainable parameters of ``model`` into named AdamW groups.

    Parameters under ``model.backbone`` are the encoder (learning rate ``base_lr``); all others are
    heads (``base_lr * head_lr_multiplier``). Parameters of normalisation layers and position embeddings
    use ``weight_decay_norm`` instead of ``weight_decay``.

    Returns:
        list of dicts with ``name`` ("backbone", "backbone_no_decay", "head", "head_no_decay"),
        ``params``, ``lr`` and ``weight_decay``; empty groups are left out.
    """
    if not hasattr(model, "backbone"):
        raise ValueError(
            f"{type(model).__name__} has no attribute 'backbone'; the optimizer needs it to give the "
            "heads their own learning rate"
        )
    backbone_params = {id(p) for p in model.backbone.parameters()}
    no_decay_params = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            full_name = f"{module_name}.{param_name}" if module_name else param_name
            if _is_norm(module) or any(key in full_name for key in NO_DECAY_NAME_KEYS):
                no_decay_params.add(id(param))

    groups: Dict[str, Dict[str, Any]] = {}
    seen = set()
    for param in model.parameters():
        if not param.requires_grad or id(param) in seen:
            continue
        seen.add(id(param))
        part = "backbone" if id(param) in backbone_params else "head"
        no_decay = id(param) in no_decay_params
        name = part + ("_no_decay" if no_decay else "")
        if name not in groups:
            groups[name] = {
                "name": name,
                "params": [],
                "lr": base_lr * (1.0 if part == "backbone" else head_lr_multiplier),
                "weight_decay": weight_decay_norm if no_decay else weight_decay,
            }
        groups[name]["params"].append(param)
    order = ["backbone", "backbone_no_decay", "head", "head_no_decay"]
    return [groups[name] for name in order if name in groups]


def build_optimizer(cfg: CfgNode, model: nn.Module) -> torch.optim.Optimizer:
    """AdamW (``SOLVER.OPTIMIZER: ADAMW``) or SGD with the parameter groups of :func:`build_param_groups`."""
    groups = build_param_groups(
        model,
        base_lr=cfg.SOLVER.BASE_LR,
        weight_decay=cfg.SOLVER.WEIGHT_DECAY,
        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
        head_lr_multiplier=cfg.SOLVER.HEAD_LR_MULTIPLIER,
    )
    name = cfg.SOLVER.OPTIMIZER.upper()
    if name == "ADAMW":
        return torch.optim.AdamW(groups, lr=cfg.SOLVER.BASE_LR, betas=tuple(cfg.SOLVER.BETAS))
    if name == "SGD":
        return torch.optim.SGD(groups, lr=cfg.SOLVER.BASE_LR, momentum=cfg.SOLVER.MOMENTUM)
    raise ValueError(f"SOLVER.OPTIMIZER={cfg.SOLVER.OPTIMIZER!r} is not supported; expected one of {OPTIMIZERS}")


def build_lr_scheduler(cfg: CfgNode, optimizer: torch.optim.Optimizer) -> torch.optim.lr_scheduler.LRScheduler:
    """The schedule of ``SOLVER.LR_SCHEDULER_NAME`` ("WarmupPolyLR" or any of Detectron2's) for ``optimizer``."""
    return build_deeplab_lr_scheduler(cfg, optimizer)
