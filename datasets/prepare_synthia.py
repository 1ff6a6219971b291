#!/usr/bin/env python
"""Command-line entry point; see `python datasets/prepare_synthia.py --help`.

The conversion code lives in gbw_panoptic.data.prepare.synthia.
"""
import sys

from gbw_panoptic.data.prepare.synthia import main

if __name__ == "__main__":
    sys.exit(main())
