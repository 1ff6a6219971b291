"""The training / evaluation command line (``tools/train_net.py``), on Detectron2's argument parser
(examples in :data:`EPILOG`)."""
import argparse
import os
import sys
from typing import List, Optional

import torch
from tabulate import tabulate

from detectron2.config import CfgNode, get_cfg
from detectron2.engine import default_argument_parser
from detectron2.utils import comm
from detectron2.utils.env import seed_all_rng
from detectron2.utils.logger import setup_logger

from ..config import add_gbw_panoptic_config
from ..env import collect_env_info
from ..utils.io import atomic_write
from .checkpoint import AtomicCheckpointer, remove_stale_temporary_files
from .launch import default_backend, launch
from .output_lock import lock_output_dir, unlock_output_dir
from .signals import TrainingInterrupted
from .trainer import UDATrainer
from .validate import check_uda_config, check_weights_config

__all__ = [
    "EPILOG",
    "BATCH_KEYS",
    "build_parser",
    "check_batch_split",
    "merged_config",
    "load_config",
    "setup",
    "main",
    "run",
]

EPILOG = """Examples:
  train:       tools/train_net.py --config-file configs/synthetic/dacs_gbw.yaml OUTPUT_DIR output/dacs_gbw
  resume:      tools/train_net.py --config-file configs/synthetic/dacs_gbw.yaml --resume OUTPUT_DIR output/dacs_gbw
  evaluate:    tools/train_net.py --config-file CONFIG --eval-only MODEL.WEIGHTS output/dacs_gbw/model_final.pth
  2 CPU procs: tools/train_net.py --config-file configs/synthetic/dacs_gbw.yaml --num-gpus 2 --dist-url auto

One run per OUTPUT_DIR: a second run on a directory in use fails at once. SIGTERM or SIGINT (Ctrl-C) ends
the current iteration, writes a checkpoint and exits with 128 + the signal number (143, 130); --resume
continues exactly from it (a second signal abandons without a checkpoint). On --resume the learning
rates and weight decay of the config win over those of the checkpoint (a warning names every change);
all other optimizer and schedule state comes from the checkpoint.

--num-gpus is the number of processes per machine: NCCL when MODEL.DEVICE is cuda, gloo on the CPU.
SOLVER.IMS_PER_BATCH and DATASETS.TARGET_IMS_PER_BATCH are totals over all processes. UDA.METHOD is
source_only, dacs (DACS self-training), advseg (AdvSeg, output-space discriminator), advent (AdvEnt) or
minent (MinEnt); MODEL.GBW.{SEM_SEG,CENTER,OFFSET}.ENABLED switch GBW. KEY VALUE pairs come last, after
every flag, and override config keys (projects/gbw_panoptic/README.md, "Training").
"""


def _check_weights(args: argparse.Namespace, cfg: CfgNode) -> None:
    """The weights to load are local files that exist (:func:`check_weights_config`); ``--eval-only`` has
    weights to evaluate: ``MODEL.WEIGHTS``, or ``--resume`` with a checkpoint in ``OUTPUT_DIR``, or the
    explicit ``--eval-random-weights``."""
    weights = cfg.MODEL.WEIGHTS
    check_weights_config(cfg)
    if not args.eval_only or weights or getattr(args, "eval_random_weights", False):
        return
    if args.resume and os.path.isfile(os.path.join(cfg.OUTPUT_DIR, "last_checkpoint")):
        return
    raise ValueError(
        "--eval-only needs weights to evaluate: MODEL.WEIGHTS (e.g. OUTPUT_DIR/model_final.pth), or --resume with "
        f"a checkpoint in OUTPUT_DIR ({cfg.OUTPUT_DIR} has none); --eval-random-weights evaluates a randomly "
        "initialised model on purpose"
    )


# The batch sizes that are totals over all processes, each process taking an equal share.
BATCH_KEYS = ("SOLVER.IMS_PER_BATCH", "DATASETS.TARGET_IMS_PER_BATCH")


def check_batch_split(cfg: CfgNode, num_gpus: int, num_machines: int) -> None:
    """Each total of :data:`BATCH_KEYS` splits evenly over the ``num_gpus * num_machines`` processes.

    Raises:
        ValueError: naming the key, its value, the world size and the totals and world sizes that would work.
    """
    world_size = num_gpus * num_machines
    for key in BATCH_KEYS:
        section, name = key.split(".")
        total = cfg[section][name]
        if total % world_size == 0:
            continue
        totals = ", ".join(str(world_size * k) for k in range(1, 4))
        sizes = ", ".join(str(n) for n in range(1, total + 1) if total % n == 0)
        raise ValueError(
            f"{key}={total} is the total over all processes and cannot be split over a world size of "
            f"{world_size} (--num-gpus {num_gpus} x --num-machines {num_machines}): set {key} to a multiple of "
            f"{world_size} ({totals}, ...; scale the learning rate with it, projects/gbw_panoptic/README.md, "
            f'"Training") or run on a world size that divides {total} ({sizes})'
        )


def merged_config(args: argparse.Namespace) -> CfgNode:
    """Detectron2's defaults + the project's keys, the ``--config-file``, then the ``KEY VALUE`` overrides:
    the config a run of ``args`` uses (and saves as ``OUTPUT_DIR/config.yaml``), not yet checked."""
    cfg = get_cfg()
    add_gbw_panoptic_config(cfg)
    if args.config_file:
        cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    return cfg


def load_config(args: argparse.Namespace) -> CfgNode:
    """:func:`merged_config`, checked (:func:`check_uda_config`, the weights to load) and frozen. Nothing
    is written."""
    cfg = merged_config(args)
    check_uda_config(cfg)
    _check_weights(args, cfg)
    cfg.freeze()
    return cfg


def setup(args: argparse.Namespace, cfg: Optional[CfgNode] = None) -> CfgNode:
    """``cfg`` (:func:`load_config` when None; :func:`run` checks the config once and passes it), then
    what Detectron2's ``default_setup`` does: output directory, loggers
    (``OUTPUT_DIR/log.txt``), environment and config in the log, ``OUTPUT_DIR/config.yaml``, seeds
    (``SEED + rank``; random when ``SEED < 0``). The environment report is the project's, which also
    works with a Detectron2 built without its C++ extension. A single-process run locks ``OUTPUT_DIR``
    first (:mod:`.output_lock`; the launcher of a multi-process run holds it for its processes); the
    temporary files of interrupted writes in it are removed."""
    cfg = load_config(args) if cfg is None else cfg
    rank = comm.get_rank()
    if comm.get_world_size() == 1:
        lock_output_dir(cfg.OUTPUT_DIR)
    elif comm.is_main_process():
        os.makedirs(cfg.OUTPUT_DIR, exist_ok=True)
    for name in ("fvcore", "gbw_panoptic"):
        setup_logger(cfg.OUTPUT_DIR, distributed_rank=rank, name=name, abbrev_name=name[:3])
    logger = setup_logger(cfg.OUTPUT_DIR, distributed_rank=rank)
    logger.info(f"Rank of current process: {rank}. World size: {comm.get_world_size()}")
    logger.info("Environment info:\n" + tabulate(collect_env_info()))
    logger.info(f"Command line arguments: {args}")
    logger.info(f"Running with full config:\n{cfg.dump()}")
    if comm.is_main_process():
        remove_stale_temporary_files(cfg.OUTPUT_DIR)  # this run holds the directory's lock
        with atomic_write(os.path.join(cfg.OUTPUT_DIR, "config.yaml"), "w") as f:
            f.write(cfg.dump())
    seed_all_rng(None if cfg.SEED < 0 else cfg.SEED + rank)
    torch.backends.cudnn.benchmark = cfg.CUDNN_BENCHMARK
    return cfg


def main(args: argparse.Namespace, cfg: Optional[CfgNode] = None):
    """Train (or, with ``--eval-only``, evaluate) in this process (:func:`setup` of ``args`` and ``cfg``);
    returns the evaluation results.

    Raises :class:`~gbw_panoptic.uda.signals.TrainingInterrupted` after a SIGTERM / SIGINT checkpoint."""
    cfg = setup(args, cfg)
    try:
        if args.eval_only:
            model = UDATrainer.build_model(cfg)
            AtomicCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(cfg.MODEL.WEIGHTS, resume=args.resume)
            return UDATrainer.test(cfg, model)
        trainer = UDATrainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        return trainer.train()
    finally:
        if comm.get_world_size() == 1:
            unlock_output_dir(cfg.OUTPUT_DIR)


def build_parser() -> argparse.ArgumentParser:
    """Detectron2's argument parser with :data:`EPILOG` and ``--eval-random-weights``."""
    parser = default_argument_parser(epilog=EPILOG)
    parser.add_argument(
        "--eval-random-weights",
        action="store_true",
        help="with --eval-only and no MODEL.WEIGHTS: evaluate the randomly initialised model (otherwise an error)",
    )
    return parser


def run(argv: Optional[List[str]] = None) -> None:
    """Parse ``argv`` (default: ``sys.argv``) and launch :func:`main` on ``--num-gpus`` processes per machine
    (NCCL when ``MODEL.DEVICE`` is CUDA, gloo on the CPU).

    The config and, for training, the split of the batch over the processes (:func:`check_batch_split`) are
    checked and, for a multi-process run on machine rank 0, ``OUTPUT_DIR`` locked before any process starts.
    A run stopped by SIGTERM / SIGINT exits with ``128 + signal`` after its checkpoint."""
    args = build_parser().parse_args(argv)
    cfg = load_config(args)  # fail on a bad config before any process starts
    if not args.eval_only:
        check_batch_split(cfg, args.num_gpus, args.num_machines)
    multi_process = args.num_gpus * args.num_machines > 1
    if multi_process and args.machine_rank == 0:
        lock_output_dir(cfg.OUTPUT_DIR)
    try:
        launch(
            main,
            args.num_gpus,
            num_machines=args.num_machines,
            machine_rank=args.machine_rank,
            dist_url=args.dist_url,
            args=(args, cfg),
            backend=default_backend(cfg.MODEL.DEVICE),
        )
    except TrainingInterrupted as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(128 + e.signum)
    finally:
        if multi_process:
            unlock_output_dir(cfg.OUTPUT_DIR)
