#!/usr/bin/env python
"""Command-line entry point; see `python datasets/prepare_synthetic.py --help`.

The conversion code lives in gbw_panoptic.data.prepare.synthetic.
"""
import sys

from gbw_panoptic.data.prepare.synthetic import main

if __name__ == "__main__":
    sys.exit(main())
