"""Config keys of gbw-panoptic, added to Detectron2's ``get_cfg()`` by :func:`add_gbw_panoptic_config`.

One function per concern (GBW, model, input/data, UDA, solver); ``add_gbw_panoptic_config`` calls
them all. Defaults follow the reference setting (EDAPS). GBW is off by default: the baseline configs
under ``configs/`` are the bases and their ``*_gbw.yaml`` variants switch it on.
"""
from detectron2.config import CfgNode as CN

__all__ = ["add_gbw_panoptic_config"]


def _gbw_loss_node() -> CN:
    """Keys of one GBW-weighted loss (``MODEL.GBW.{SEM_SEG,CENTER,OFFSET}``); off by default, the
    ``*_gbw.yaml`` configs switch it on."""
    node = CN()
    node.ENABLED = False
    # Regularisation strength lambda of the QP; "absolute" uses it as is (the reference, 1.0),
    # "relative" uses LAMBDA * mean_c(g_c^2), invariant to image size and batch size.
    node.LAMBDA = 1.0
    node.LAMBDA_MODE = "absolute"
    # "projection": exact Euclidean projection onto the scaled simplex (on device, no host sync);
    # "cvxopt": the reference QP solver on the CPU.
    node.SOLVER = "projection"
    # Gradient norm per class: "channel" (norm of logit channel c over all pixels, as the authors'
    # code) or "class" (norm of the gradient of L_c over the pixels of class c).
    # Only used by the cross-entropy loss.
    node.MODE = "channel"
    # Which classes share the simplex: "all" classes the loss covers, or only those "present" in
    # the batch (absent classes then get weight 0 and the present ones share the mass).
    node.ACTIVE_CLASSES = "all"
    # Exponential moving average of the weights across calls; 0 disables it (reference).
    node.EMA_MOMENTUM = 0.0
    return node


def add_gbw_config(cfg: CN) -> None:
    """``MODEL.GBW.*``: gradient-based class weighting of the three losses."""
    cfg.MODEL.GBW = CN()
    cfg.MODEL.GBW.SEM_SEG = _gbw_loss_node()
    cfg.MODEL.GBW.CENTER = _gbw_loss_node()
    cfg.MODEL.GBW.OFFSET = _gbw_loss_node()


def add_model_config(cfg: CN) -> None:
    """``MODEL.*``: encoder, decoders, losses and panoptic post-processing."""
    cfg.MODEL.META_ARCHITECTURE = "GBWPanopticSegmentor"
    # ImageNet mean/std in RGB order, 0-255 (the encoders are trained on RGB).
    cfg.MODEL.PIXEL_MEAN = [123.675, 116.28, 103.53]
    cfg.MODEL.PIXEL_STD = [58.395, 57.12, 57.375]
    cfg.INPUT.FORMAT = "RGB"

    # MiT (SegFormer encoder) backbone.
    cfg.MODEL.MIT = CN()
    cfg.MODEL.MIT.VARIANT = "b5"  # b0 ... b5
    # Local file or directory with SegFormer / MiT ImageNet weights ("" = random initialisation).
    cfg.MODEL.MIT.PRETRAINED = ""
    cfg.MODEL.MIT.DROP_PATH_RATE = 0.1
    cfg.MODEL.MIT.OUT_FEATURES = ["res2", "res3", "res4", "res5"]

    # ResNet backbone (MODEL.BACKBONE.NAME "build_resnet_deeplab_stem_backbone"): DeepLab stem,
    # depths 18/34/50/101/152; the keys of Detectron2's DeepLab project.
    cfg.MODEL.RESNETS.STEM_TYPE = "deeplab"
    cfg.MODEL.RESNETS.RES4_DILATION = 1
    cfg.MODEL.RESNETS.RES5_MULTI_GRID = [1, 1, 1]
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]

    # Semantic decoder (DAFormer context-aware fusion head).
    cfg.MODEL.SEM_SEG_HEAD.NAME = "DAFormerSemSegHead"
    cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 19
    cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE = 255
    cfg.MODEL.SEM_SEG_HEAD.LOSS_WEIGHT = 1.0
    cfg.MODEL.SEM_SEG_HEAD.EMBED_DIM = 256
    cfg.MODEL.SEM_SEG_HEAD.FUSION_DILATIONS = [1, 6, 12, 18]
    cfg.MODEL.SEM_SEG_HEAD.DROPOUT = 0.1
    cfg.MODEL.SEM_SEG_HEAD.NORM = "BN"

    # Instance decoder (independent copy of the decoder, center + offset outputs at stride 4).
    cfg.MODEL.INS_EMBED_HEAD = CN()
    cfg.MODEL.INS_EMBED_HEAD.ENABLED = True  # False: semantic-only model
    cfg.MODEL.INS_EMBED_HEAD.NAME = "DAFormerInstanceHead"
    cfg.MODEL.INS_EMBED_HEAD.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.INS_EMBED_HEAD.EMBED_DIM = 256
    cfg.MODEL.INS_EMBED_HEAD.FUSION_DILATIONS = [1, 6, 12, 18]
    cfg.MODEL.INS_EMBED_HEAD.DROPOUT = 0.1
    cfg.MODEL.INS_EMBED_HEAD.NORM = "BN"
    cfg.MODEL.INS_EMBED_HEAD.CENTER_LOSS_WEIGHT = 10.0
    cfg.MODEL.INS_EMBED_HEAD.OFFSET_LOSS_WEIGHT = 0.1

    # Panoptic-DeepLab post-processing.
    cfg.MODEL.POST_PROCESSING = CN()
    cfg.MODEL.POST_PROCESSING.CENTER_THRESHOLD = 0.1
    cfg.MODEL.POST_PROCESSING.NMS_KERNEL = 7
    cfg.MODEL.POST_PROCESSING.TOP_K_INSTANCE = 200
    cfg.MODEL.POST_PROCESSING.STUFF_AREA = 2048
    cfg.MODEL.POST_PROCESSING.PREDICT_INSTANCES = True
    cfg.MODEL.SIZE_DIVISIBILITY = 32


def add_data_config(cfg: CN) -> None:
    """``INPUT.*``, ``DATASETS.TARGET_*`` and ``DATALOADER.RCS.*``: data and targets."""
    # Panoptic-DeepLab target recipe.
    cfg.INPUT.GAUSSIAN_SIGMA = 8
    cfg.INPUT.IGNORE_STUFF_IN_OFFSET = True
    cfg.INPUT.SMALL_INSTANCE_AREA = 0
    cfg.INPUT.SMALL_INSTANCE_WEIGHT = 1
    cfg.INPUT.IGNORE_CROWD_IN_SEMANTIC = False
    # Augmentation: random resize by a ratio of the base size, crop, flip.
    cfg.INPUT.RESIZE_RATIO_RANGE = [0.5, 2.0]
    cfg.INPUT.BASE_SIZE = [1024, 2048]  # (height, width) the ratio range applies to
    cfg.INPUT.CROP.ENABLED = True
    cfg.INPUT.CROP.TYPE = "absolute"
    cfg.INPUT.CROP.SIZE = [512, 512]
    cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA = 0.75
    cfg.INPUT.RANDOM_FLIP = "horizontal"

    # DATASETS.TRAIN is the labelled source; TARGET_TRAIN the unlabelled target; TEST the
    # labelled target validation set.
    cfg.DATASETS.TARGET_TRAIN = ()
    cfg.DATASETS.TARGET_IMS_PER_BATCH = 2

    # Rare class sampling of source images (DAFormer).
    cfg.DATALOADER.RCS = CN()
    cfg.DATALOADER.RCS.ENABLED = True
    cfg.DATALOADER.RCS.TEMPERATURE = 0.01
    cfg.DATALOADER.RCS.MIN_PIXELS = 3000


def add_uda_config(cfg: CN) -> None:
    """``UDA.*``: the adaptation strategy and its hyperparameters."""
    cfg.UDA = CN()
    cfg.UDA.METHOD = "dacs"  # source_only | dacs | advent | advseg | minent
    # DACS self-training.
    cfg.UDA.EMA_ALPHA = 0.999
    cfg.UDA.PSEUDO_THRESHOLD = 0.968
    cfg.UDA.PSEUDO_WEIGHT_IGNORE_TOP = 15
    cfg.UDA.PSEUDO_WEIGHT_IGNORE_BOTTOM = 120
    cfg.UDA.MIX_INSTANCES = False
    cfg.UDA.COLOR_JITTER_STRENGTH = 0.2
    cfg.UDA.COLOR_JITTER_PROB = 0.2
    cfg.UDA.BLUR = True
    # ImageNet feature distance on thing-class pixels against the frozen initial encoder.
    cfg.UDA.FD = CN()
    cfg.UDA.FD.WEIGHT = 0.005
    cfg.UDA.FD.SCALE_MIN_RATIO = 0.75
    cfg.UDA.FD.FEATURE = "res5"  # compared encoder output (the deepest stage, as DAFormer)
    cfg.UDA.FD.CLASSES = []  # contiguous class ids compared; empty = thing classes of DATASETS.TRAIN[0]
    # AdvEnt: output-space discriminator on entropy maps.
    cfg.UDA.ADVENT = CN()
    cfg.UDA.ADVENT.LOSS_WEIGHT = 0.001
    cfg.UDA.ADVENT.DISC_LR = 1e-4
    cfg.UDA.ADVENT.DISC_CHANNELS = 64
    # AdvSeg: output-space discriminator on softmax maps; the values of DAFormer's code base (HRDA's
    # configs/_base_/uda/advseg.py: lambda_adv_target main, discriminator_type, lr_D, lr_D_power).
    cfg.UDA.ADVSEG = CN()
    cfg.UDA.ADVSEG.LOSS_WEIGHT = 0.001
    cfg.UDA.ADVSEG.GAN_LOSS = "LS"  # "LS" (least squares, reference) or "BCE" (AdaptSegNet's original)
    cfg.UDA.ADVSEG.DISC_LR = 1e-4
    cfg.UDA.ADVSEG.DISC_LR_POWER = 0.9  # poly decay over SOLVER.MAX_ITER, no warm-up
    cfg.UDA.ADVSEG.DISC_CHANNELS = 64
    # MinEnt: entropy minimisation on target predictions.
    cfg.UDA.MINENT = CN()
    cfg.UDA.MINENT.LOSS_WEIGHT = 0.001
    # Iterations between two writes of the console / metrics.json / TensorBoard logs.
    cfg.UDA.LOG_PERIOD = 20


def add_solver_config(cfg: CN) -> None:
    """``SOLVER.*``: AdamW with per-group learning rates, warm-up then polynomial decay."""
    cfg.SOLVER.OPTIMIZER = "ADAMW"
    cfg.SOLVER.BASE_LR = 6e-5
    cfg.SOLVER.HEAD_LR_MULTIPLIER = 10.0
    cfg.SOLVER.WEIGHT_DECAY = 0.01
    cfg.SOLVER.WEIGHT_DECAY_NORM = 0.0
    cfg.SOLVER.BETAS = [0.9, 0.999]
    cfg.SOLVER.LR_SCHEDULER_NAME = "WarmupPolyLR"
    cfg.SOLVER.WARMUP_ITERS = 1500
    cfg.SOLVER.WARMUP_FACTOR = 1e-6
    cfg.SOLVER.WARMUP_METHOD = "linear"
    cfg.SOLVER.POLY_LR_POWER = 1.0
    cfg.SOLVER.POLY_LR_CONSTANT_ENDING = 0.0
    cfg.SOLVER.MAX_ITER = 40000


def add_gbw_panoptic_config(cfg: CN) -> None:
    """Add every gbw-panoptic key to a Detectron2 config (``detectron2.config.get_cfg()``)."""
    add_gbw_config(cfg)
    add_model_config(cfg)
    add_data_config(cfg)
    add_uda_config(cfg)
    add_solver_config(cfg)
