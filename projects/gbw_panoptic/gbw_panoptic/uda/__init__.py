"""UDA training on Detectron2's engine: the trainer, the methods (source-only, DACS, AdvEnt, AdvSeg, MinEnt),
EMA teacher, ClassMix, optimizer and schedule, atomic checkpoints, and a gloo/NCCL launcher.

Importing this package registers the methods in :data:`UDA_METHOD_REGISTRY`.
"""
from .advent import AdvEnt
from .adversarial import OutputSpaceAdversarial, OutputSpaceDiscriminator
from .advseg import AdvSeg
from .augment import blur_kernel_size, class_mix_masks, color_jitter, gaussian_blur, hsv_to_rgb, mix, rgb_to_hsv, strong_augment
from .checkpoint import AtomicCheckpointer, get_rng_state, preserved_rng_state, set_rng_state
from .dacs import DACS, PseudoLabels, pseudo_labels
from .entropy import entropy_loss, entropy_map
from .feature_distance import FeatureDistance, downscale_labels
from .launch import default_backend, launch
from .method import UDA_METHOD_REGISTRY, SourceOnly, UDAMethod, build_uda_method, uda_method_names
from .minent import MinEnt
from .optim import build_lr_scheduler, build_optimizer, build_param_groups
from .runner import StudentRunner
from .teacher import EMATeacher, ema_alpha
from .trainer import UDATrainer
from .validate import check_uda_config, check_weights_config

__all__ = [
    "AdvEnt",
    "AdvSeg",
    "AtomicCheckpointer",
    "DACS",
    "EMATeacher",
    "FeatureDistance",
    "MinEnt",
    "OutputSpaceAdversarial",
    "OutputSpaceDiscriminator",
    "PseudoLabels",
    "SourceOnly",
    "StudentRunner",
    "UDAMethod",
    "UDATrainer",
    "UDA_METHOD_REGISTRY",
    "build_lr_scheduler",
    "build_optimizer",
    "build_param_groups",
    "blur_kernel_size",
    "build_uda_method",
    "check_uda_config",
    "check_weights_config",
    "class_mix_masks",
    "color_jitter",
    "default_backend",
    "downscale_labels",
    "ema_alpha",
    "entropy_loss",
    "entropy_map",
    "gaussian_blur",
    "get_rng_state",
    "hsv_to_rgb",
    "launch",
    "mix",
    "preserved_rng_state",
    "pseudo_labels",
    "rgb_to_hsv",
    "set_rng_state",
    "strong_augment",
    "uda_method_names",
]
