"""Config keys of gbw-panoptic, added to Detectron2's ``get_cfg()`` by :func:`add_gbw_panoptic_config`.

One function per concern (GBW, model, input/data, UDA, solver); ``add_gbw_panoptic_config`` calls
them all. Defaults follow the reference setting (EDAPS). GBW is off by default: the baseline configs
under ``configs/`` are the bases and their ``*_gbw.yaml`` variants switch it on.
"""
from detectron2.config import CfgNode as CN

__all__ = ["add_gbw_panoptic_config", "add_hrda_config", "add_top_down_config"]


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
    return node


def add_gbw_config(cfg: CN) -> None:
    """``MODEL.GBW.*``: gradient-based class weighting of the three losses."""
    cfg.MODEL.GBW = CN()
    cfg.MODEL.GBW.SEM_SEG = _gbw_loss_node()
    # Gradient norm per class of a cross-entropy: "channel" (norm of logit channel c over all pixels,
    # as the authors' code) or "class" (norm of the gradient of L_c over the pixels of class c).
    cfg.MODEL.GBW.SEM_SEG.MODE = "channel"
    # False (the authors' code): the class weights come from the unweighted cross-entropy, every
    # labelled pixel counts in N_c and the pixel (pseudo-label) weights enter only the reduction.
    # True: the pixel weights scale each pixel's gradient and zero-weight pixels leave N_c.
    cfg.MODEL.GBW.SEM_SEG.PIXEL_WEIGHTS_IN_NORMS = False
    cfg.MODEL.GBW.CENTER = _gbw_loss_node()
    # Class of each center-heatmap pixel for GBW: "semantic" (its semantic label) or "instance"
    # (pixels under an instance's Gaussian take that instance's class, the others their semantic label).
    cfg.MODEL.GBW.CENTER.PIXEL_CLASS = "semantic"
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
    # Static class weights of the cross-entropy, the classical alternative to MODEL.GBW.SEM_SEG:
    # "none" (reference) or "median_frequency" (median frequency balancing of the class pixel counts
    # of DATASETS.TRAIN, scaled to sum to C as GBW's weights; gbw_panoptic.gbw.frequency).
    cfg.MODEL.SEM_SEG_HEAD.CLASS_WEIGHTING = "none"
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
    # A center loss (after CENTER_LOSS_WEIGHT) above this value is replaced by 0 for that call, as
    # EDAPS does with its source center loss (14.0); 0 disables it.
    cfg.MODEL.INS_EMBED_HEAD.CENTER_LOSS_ZERO_ABOVE = 14.0

    # With several training processes, the student's BatchNorm layers ("BN": the decoders' SEM_SEG_HEAD.NORM
    # and INS_EMBED_HEAD.NORM, HRDA's attention heads, a ResNet encoder's RESNETS.NORM) normalise over the
    # whole batch of all processes, as one process does (modeling/batch_norm.py); False: over each
    # process's share. The reference trained on one GPU, where the two are the same.
    cfg.MODEL.SYNC_BN = False

    # Panoptic-DeepLab post-processing.
    cfg.MODEL.POST_PROCESSING = CN()
    cfg.MODEL.POST_PROCESSING.CENTER_THRESHOLD = 0.1
    cfg.MODEL.POST_PROCESSING.NMS_KERNEL = 7
    cfg.MODEL.POST_PROCESSING.TOP_K_INSTANCE = 200
    cfg.MODEL.POST_PROCESSING.STUFF_AREA = 2048
    cfg.MODEL.SIZE_DIVISIBILITY = 32


def add_data_config(cfg: CN) -> None:
    """``INPUT.*``, ``DATASETS.TARGET_*`` and ``DATALOADER.RCS.*``: data and targets."""
    # Panoptic-DeepLab target recipe (the rest of it: data/mapper.py, build_target_generator).
    cfg.INPUT.GAUSSIAN_SIGMA = 8
    # Crowd segments labelled ignore in the semantic target (EDAPS; Detectron2's Panoptic-DeepLab: False).
    cfg.INPUT.IGNORE_CROWD_IN_SEMANTIC = True
    # Augmentation: random resize by a ratio of the base size, crop, flip.
    cfg.INPUT.RESIZE_RATIO_RANGE = [0.5, 2.0]
    # (height, width) the ratio range applies to: the evaluation size, and the training size of any
    # domain whose own size below is empty.
    cfg.INPUT.BASE_SIZE = [1024, 2048]
    # Training sizes of the labelled source and the unlabelled target images (empty: BASE_SIZE), as
    # the references resize each dataset to its own scale (SYNTHIA 760x1280, GTA5 720x1280).
    cfg.INPUT.SOURCE_BASE_SIZE = []
    cfg.INPUT.TARGET_BASE_SIZE = []
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
    # The crop of a drawn image is redrawn (up to 10 tries) until it holds more than
    # MIN_CROP_RATIO * MIN_PIXELS pixels of the drawn class: 0.5 in DAFormer/EDAPS, 2.0 in HRDA; 0 = off.
    cfg.DATALOADER.RCS.MIN_CROP_RATIO = 0.5


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
    # Probability of jittering the batch: the reference applies it when a uniform draw exceeds its
    # color_jitter_probability 0.2, i.e. with probability 0.8.
    cfg.UDA.COLOR_JITTER_PROB = 0.8
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


def add_hrda_config(cfg: CN) -> None:
    """``MODEL.HRDA.*`` (``MODEL.META_ARCHITECTURE "HRDASegmentor"``) and ``UDA.PSEUDO_LABEL_MARGINS``:
    HRDA's multi-resolution training (Hoyer et al., ECCV 2022); defaults are HRDA's published values."""
    cfg.MODEL.HRDA = CN()
    # Resize factors of the context crop (the whole training crop) and of the detail crop.
    cfg.MODEL.HRDA.CONTEXT_SCALE = 0.5
    cfg.MODEL.HRDA.DETAIL_SCALE = 1.0
    # (h, w) of the detail crop, in detail-scale pixels; its corners are multiples of
    # CROP_COORD_DIVISIBLE (output stride 4 x scale ratio 2 = 8) so that both predictions align.
    cfg.MODEL.HRDA.DETAIL_CROP_SIZE = [512, 512]
    cfg.MODEL.HRDA.CROP_COORD_DIVISIBLE = 8
    # Weight of the detail crop's own loss; the fused loss gets 1 - DETAIL_LOSS_WEIGHT.
    cfg.MODEL.HRDA.DETAIL_LOSS_WEIGHT = 0.1
    # Scale attention: one map per class (False: one for all), decoder width.
    cfg.MODEL.HRDA.ATTENTION_CLASSWISE = True
    cfg.MODEL.HRDA.ATTENTION_EMBED_DIM = 256
    # Inference (teacher pseudo-labels, test): the detail branch slides DETAIL_CROP_SIZE windows over the
    # whole input, with stride half a window when DETAIL_SLIDE_OVERLAP.
    cfg.MODEL.HRDA.DETAIL_SLIDE_INFERENCE = True
    cfg.MODEL.HRDA.DETAIL_SLIDE_OVERLAP = True
    # Test-time sliding windows over the image (input pixels); [] = the whole image at once.
    cfg.MODEL.HRDA.TEST_WINDOW_SIZE = [1024, 1024]
    cfg.MODEL.HRDA.TEST_WINDOW_STRIDE = [512, 512]
    # Pseudo-label margins (top, bottom, left, right) in pixels of the original target image, marked in
    # the data loader before the crop, so that they only count where a crop reaches the image border
    # (HRDA: 30, 240, 30, 30 on Cityscapes, with PSEUDO_WEIGHT_IGNORE_TOP/BOTTOM 0). Zeros: off.
    cfg.UDA.PSEUDO_LABEL_MARGINS = [0, 0, 0, 0]


def add_top_down_config(cfg: CN) -> None:
    """``MODEL.TOP_DOWN.*`` and ``MODEL.GBW.{BOX_CLS,MASK}`` of the top-down model
    (``MODEL.META_ARCHITECTURE "GBWTopDownPanopticSegmentor"``: DAFormer semantic head + Detectron2's
    Mask R-CNN, set by Detectron2's own ``MODEL.FPN/RPN/ROI_*`` keys and ``MODEL.MASK_ON``)."""
    cfg.MODEL.TOP_DOWN = CN()
    # Panoptic fusion (EDAPS): instance masks whose box score reaches this threshold are pasted, class by
    # class, over the semantic map (their class is the semantic majority); stuff regions under
    # MODEL.POST_PROCESSING.STUFF_AREA pixels become void.
    cfg.MODEL.TOP_DOWN.MASK_SCORE_THRESHOLD = 0.95
    # EDAPS: when an image of a batch has no thing instance, the RPN and RoI losses of the whole batch
    # are 0; False: Detectron2's behaviour (such an image gives negative samples).
    cfg.MODEL.TOP_DOWN.ZERO_INSTANCE_LOSSES_IF_EMPTY = True
    # GBW on the box classifier's cross-entropy (classes: the thing classes + background; samples: the
    # sampled proposals) and on the mask loss (mask pixels grouped by their proposal's class).
    cfg.MODEL.GBW.BOX_CLS = _gbw_loss_node()
    cfg.MODEL.GBW.BOX_CLS.MODE = "channel"  # as MODEL.GBW.SEM_SEG.MODE
    cfg.MODEL.GBW.MASK = _gbw_loss_node()


def add_gbw_panoptic_config(cfg: CN) -> None:
    """Add every gbw-panoptic key to a Detectron2 config (``detectron2.config.get_cfg()``)."""
    add_gbw_config(cfg)
    add_model_config(cfg)
    add_data_config(cfg)
    add_uda_config(cfg)
    add_solver_config(cfg)
    add_hrda_config(cfg)
    add_top_down_config(cfg)
