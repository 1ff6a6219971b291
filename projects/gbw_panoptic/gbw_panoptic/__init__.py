"""gbw-panoptic: Gradient-based class Weighting for UDA panoptic segmentation on Detectron2.

Importing this package does not import Detectron2, so that :mod:`gbw_panoptic.gbw` (pure PyTorch)
can be used from any training loop. The Detectron2 parts register themselves when their
sub-packages are imported (``gbw_panoptic.modeling``, ``gbw_panoptic.data``, ...).
"""

__version__ = "0.1.0"
