#!/usr/bin/env python
"""Command-line entry point; see `python datasets/prepare_cityscapes.py --help`.

The conversion code lives in gbw_panoptic.data.prepare.cityscapes.
"""
import sys

from gbw_panoptic.data.prepare.cityscapes import main

if __name__ == "__main__":
    sys.exit(main())
