"""gbw-panoptic: Gradient-based class Weighting for UDA panoptic segmentation on Detectron2.

Importing this package does not import Detectron2, so that :mod:`gbw_panoptic.gbw` (pure PyTorch)
can be used from any training loop. The Detectron2 parts register themselves when their
sub-packages are imported (``gbw_panoptic.modeling``, ``gbw_panoptic.data``, ...).
"""

__version__ = "0.1.0"

import warnings

# Detectron2 imports fvcore.nn, whose focal_loss module scripts two functions with torch.jit.script at
# import time; current PyTorch deprecates torch.jit.script, so every start printed two FutureWarnings
# about code this project does not run (it scripts nothing itself).
warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
