#!/usr/bin/env python
"""`make demo`: the end-to-end experiment on the embedded synthetic benchmark.

The experiment (train source-only / DACS / DACS + GBW on the synthetic two-domain benchmark and
compare them) is built on top of the model, data and training packages. This script runs what
exists today and says plainly what it ran.
"""
from gbw_panoptic.env import main as print_env

if __name__ == "__main__":
    print("gbw-panoptic demo: environment report (the synthetic-benchmark experiment is not built yet)")
    print_env()
