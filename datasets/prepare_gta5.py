#!/usr/bin/env python
"""Command-line entry point; see `python datasets/prepare_gta5.py --help`.

The conversion code lives in gbw_panoptic.data.prepare.gta5.
"""
import sys

from gbw_panoptic.data.prepare.gta5 import main

if __name__ == "__main__":
    sys.exit(main())
