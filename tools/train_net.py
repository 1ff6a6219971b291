#!/usr/bin/env python
"""Train or evaluate a gbw-panoptic model (source-only, DACS, AdvSeg, AdvEnt or MinEnt UDA, with or
without GBW).

Detectron2's command line: --config-file, --resume, --eval-only, --num-gpus (processes per machine;
gloo on the CPU), --num-machines, --machine-rank, --dist-url, then KEY VALUE config overrides.
Run with --help for details; everything it does lives in gbw_panoptic.uda.cli.
"""
from gbw_panoptic.uda.cli import run

if __name__ == "__main__":
    run()
