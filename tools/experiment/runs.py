"""Arms, presets and runs of the synthetic-benchmark experiment (``make demo``, ``make experiment``).

One experiment = a set of *arms* (a training config: a UDA method with or without GBW) × a set of
seeds, on the synthetic two-domain benchmark. Each run is an ordinary ``tools/train_net.py`` run
(its own process and ``OUTPUT_DIR``), evaluated on the target val set by the project's evaluators at
the end of training. The experiment then reads those evaluation reports and writes
``<out>/report.md`` (:mod:`experiment.report`).

Runs are resumable: a finished run (its evaluation reports exist and its command is unchanged) is
skipped, an interrupted one continues from its last checkpoint (``--resume``).
"""
from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
import time
from collections import OrderedDict
from dataclasses import dataclass, field, replace
from functools import lru_cache
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple

import yaml

from gbw_panoptic.data.prepare.synthetic import DEFAULT_SIZES
from gbw_panoptic.uda.cli import build_parser, merged_config
from gbw_panoptic.utils.io import write_json

__all__ = [
    "Arm", "SweepPoint", "Preset", "ARMS", "BATCH_SIZES", "SWEEP_REFERENCES", "PRESETS", "RunSpec", "REPO_ROOT",
    "VAL_DATASET", "SOURCE_VAL_DATASET", "SOURCE_ONLY", "ORACLE", "REFERENCE",
    "Benchmark", "environment", "same_images_schedule", "plan_runs", "level_folder", "plan_benchmarks",
    "prepare_benchmark", "find_same_run", "train_and_evaluate",
]

logger = logging.getLogger("experiment")

# Training iterations of every run of the demo and the experiment (datasets/README.md, "Design").
ITERATIONS = 600

REPO_ROOT = Path(__file__).resolve().parents[2]
VAL_DATASET = "synthetic_target_panoptic_val"
SOURCE_VAL_DATASET = "synthetic_source_panoptic_val"
# Lower and upper bound of the gap an adaptation method closes, and the arm every other one is
# compared to.
SOURCE_ONLY, ORACLE, REFERENCE = "source_only", "target_oracle", "dacs"


class SweepPoint(NamedTuple):
    """An arm's place in a sweep: ``axis`` names the swept setting (ASCII: the report's x axis and figure
    file name), ``series`` the line the arm is drawn on, ``value`` its value of the setting; e.g.
    ``SweepPoint("lambda", "relative λ", 0.3)``."""

    axis: str
    series: str
    value: float


@dataclass(frozen=True)
class Arm:
    """One training setting: ``config`` (relative to ``configs/``), the arm it adds its treatment to
    (``baseline``: GBW, frequency weighting or another starting point), and the arm whose final model
    (same seed) it starts from (``MODEL.WEIGHTS``; None: random initial weights)."""

    name: str
    config: str
    label: str
    baseline: Optional[str] = None
    starts_from: Optional[str] = None
    # Config overrides (KEY VALUE ...) added to the config file's values.
    opts: Tuple[str, ...] = ()
    # The arm's place in a sweep, drawn by the report against the swept value.
    sweep: Optional[SweepPoint] = None


def _gbw_lambda_arm(mode: str, lam: float, config: str = "synthetic/dacs_gbw.yaml") -> Arm:
    """DACS + GBW with λ ``lam`` in mode ``mode`` on the three GBW losses (the λ sweep)."""
    opts: Tuple[str, ...] = ()
    for loss in ("SEM_SEG", "CENTER", "OFFSET"):
        # A float literal ("3.0", not "3"): the config refuses an int for a float key.
        opts += (f"MODEL.GBW.{loss}.LAMBDA_MODE", mode, f"MODEL.GBW.{loss}.LAMBDA", repr(float(lam)))
    return Arm(
        f"dacs_gbw_{mode}_lambda{lam:g}", config, f"DACS + GBW ({mode} λ {lam:g})", REFERENCE, SOURCE_ONLY,
        opts=opts, sweep=SweepPoint("lambda", f"{mode} λ", lam),
    )


ARMS: "OrderedDict[str, Arm]" = OrderedDict(
    (arm.name, arm)
    for arm in (
        Arm(SOURCE_ONLY, "synthetic/mit_b0_source_only.yaml", "source only"),
        Arm("source_only_gbw", "synthetic/mit_b0_source_only_gbw.yaml", "source only + GBW", SOURCE_ONLY),
        Arm(
            "source_only_freq", "synthetic/mit_b0_source_only_freq.yaml", "source only + frequency weighting",
            SOURCE_ONLY,
        ),
        # Adaptation starts from the source-only model of the same seed, the CPU benchmark's stand-in
        # for the ImageNet weights DACS starts from (datasets/README.md, "Design"): every DACS arm
        # from the same weights, so that paired differences measure the adaptation alone.
        Arm(REFERENCE, "synthetic/dacs.yaml", "DACS", starts_from=SOURCE_ONLY),
        Arm(
            "dacs_gbw", "synthetic/dacs_gbw.yaml", "DACS + GBW", REFERENCE, SOURCE_ONLY,
            sweep=SweepPoint("lambda", "relative λ", 1.0),
        ),
        Arm(
            "dacs_gbw_absolute", "synthetic/dacs_gbw_absolute.yaml", "DACS + GBW (absolute λ)", REFERENCE, SOURCE_ONLY,
            sweep=SweepPoint("lambda", "absolute λ", 1.0),
        ),
        # The λ sweep around the relative λ 1 of dacs_gbw.yaml and the absolute λ 1 of the reference.
        *(_gbw_lambda_arm("relative", lam) for lam in (0.1, 0.3, 3.0, 10.0)),
        *(_gbw_lambda_arm("absolute", lam) for lam in (1e-2, 1e-4)),
        Arm(
            "dacs_gbw_semantic", "synthetic/dacs_gbw_semantic.yaml", "DACS + GBW (semantic loss only)", REFERENCE,
            SOURCE_ONLY,
        ),
        Arm(
            "dacs_gbw_semantic_center",
            "synthetic/dacs_gbw_semantic_center.yaml",
            "DACS + GBW (semantic + center)",
            REFERENCE,
            SOURCE_ONLY,
        ),
        Arm("dacs_freq", "synthetic/dacs_freq.yaml", "DACS + frequency weighting", REFERENCE, SOURCE_ONLY),
        # GBW from the start: adaptation from the source-only + GBW model (the feature distance then
        # anchors the encoder to that model), without and with GBW during adaptation.
        Arm("dacs_from_gbw", "synthetic/dacs.yaml", "DACS (from source only + GBW)", REFERENCE, "source_only_gbw"),
        Arm(
            "dacs_gbw_from_gbw", "synthetic/dacs_gbw.yaml", "DACS + GBW (GBW from the start)", "dacs_from_gbw",
            "source_only_gbw",
        ),
        # DACS + GBW with every step's GBW class statistics logged (UDA.LOG_PERIOD 1; training is that of
        # dacs_gbw): the gradient-difficulty study.
        Arm(
            "dacs_gbw_every_step", "synthetic/dacs_gbw.yaml", "DACS + GBW (logged every step)",
            starts_from=SOURCE_ONLY, opts=("UDA.LOG_PERIOD", "1"),
        ),
        # The oracle starts from the same model and trains as many iterations with the target labels:
        # the upper bound of what adaptation from that model can reach.
        Arm(ORACLE, "synthetic/target_oracle.yaml", "target oracle", starts_from=SOURCE_ONLY),
        # HRDA (semantic only): context crop at 0.5 + full-resolution detail crop, scale attention.
        Arm("hrda_source_only", "synthetic/hrda_source_only.yaml", "HRDA source only"),
        Arm("hrda_source_only_gbw", "synthetic/hrda_source_only_gbw.yaml", "HRDA source only + GBW", "hrda_source_only"),
        # HRDA + DACS adds DACS to HRDA source-only (its baseline: the report pairs them, as the single-scale
        # source-only is paired with DACS).
        Arm("hrda_dacs", "synthetic/hrda_dacs.yaml", "HRDA + DACS", "hrda_source_only", "hrda_source_only"),
        Arm("hrda_dacs_gbw", "synthetic/hrda_dacs_gbw.yaml", "HRDA + DACS + GBW", "hrda_dacs", "hrda_source_only"),
        # The top-down model (EDAPS's released architecture: Mask R-CNN instance decoder), its DACS from its
        # own source-only model, as the bottom-up arms.
        Arm("maskrcnn_source_only", "synthetic/maskrcnn_source_only.yaml", "top-down source only"),
        Arm("maskrcnn_dacs", "synthetic/maskrcnn_dacs.yaml", "top-down DACS", starts_from="maskrcnn_source_only"),
        Arm(
            "maskrcnn_dacs_gbw", "synthetic/maskrcnn_dacs_gbw.yaml", "top-down DACS + GBW", "maskrcnn_dacs",
            "maskrcnn_source_only",
        ),
    )
)

# Images per domain per step of the batch-size study (datasets/README.md, "Study: batch size").
BATCH_SIZES = (2, 4, 8)
# The value of a swept setting (``SweepPoint.axis``) the report compares the others with: the configs'.
SWEEP_REFERENCES: Dict[str, float] = {"images per step": BATCH_SIZES[0]}


def _batch_arm(arm: Arm, images: int) -> Arm:
    """``arm`` (DACS or DACS + GBW) with ``images`` source and ``images`` target images per step, compared
    with the arm of its baseline at the same batch size; :func:`plan_runs` trains it on as many images as
    ``arm`` (:func:`same_images_schedule`)."""
    return replace(
        arm,
        name=f"{arm.name}_batch{images}",
        label=f"{arm.label} (batch {images})",
        baseline=None if arm.baseline is None else f"{arm.baseline}_batch{images}",
        opts=("SOLVER.IMS_PER_BATCH", str(images), "DATASETS.TARGET_IMS_PER_BATCH", str(images)),
        sweep=SweepPoint("images per step", arm.label, images),
    )


ARMS.update(
    (batch_arm.name, batch_arm)
    for images in BATCH_SIZES
    for batch_arm in (_batch_arm(ARMS[REFERENCE], images), _batch_arm(ARMS["dacs_gbw"], images))
)


@dataclass(frozen=True)
class Preset:
    """Sizes of one experiment: arms, seeds, iterations and the synthetic benchmark it runs on
    (defaults: those of ``datasets/prepare_synthetic.py``)."""

    arms: Tuple[str, ...]
    seeds: Tuple[int, ...]
    max_iter: int
    num_source: int = DEFAULT_SIZES["num_source"]
    num_source_val: int = DEFAULT_SIZES["num_source_val"]
    num_target_train: int = DEFAULT_SIZES["num_target_train"]
    num_target_val: int = DEFAULT_SIZES["num_target_val"]
    image_size: Tuple[int, int] = (DEFAULT_SIZES["height"], DEFAULT_SIZES["width"])  # (height, width)
    extra_opts: Tuple[str, ...] = ()
    description: str = ""
    jobs: int = 2  # training runs at a time (``--jobs``); each gets cores ÷ jobs threads, at least 1
    # Factors on the frequency of the rare classes in the target train split (``prepare_synthetic.py
    # --rare-frequency``): one benchmark and one set of runs per level, each in its own folder
    # (:func:`level_folder`); empty: the standard benchmark.
    imbalance_levels: Tuple[float, ...] = ()


PRESETS: Dict[str, Preset] = {
    # `make demo`: one seed of the main arms, within 20 minutes on a 2-core CPU.
    "demo": Preset(
        arms=(SOURCE_ONLY, REFERENCE, "dacs_gbw", ORACLE),
        seeds=(0,),
        max_iter=ITERATIONS,
        description="one seed of source-only, DACS, DACS + GBW and the target oracle",
        # Every other run starts from the source-only model: once it is trained, the oracle and the
        # two DACS runs share the cores instead of the third waiting for a free slot.
        jobs=3,
    ),
    # `make experiment`: every arm, enough seeds for confidence intervals.
    "experiment": Preset(
        arms=(
            SOURCE_ONLY, "source_only_gbw", REFERENCE, "dacs_gbw", "dacs_gbw_absolute", "dacs_gbw_semantic",
            "dacs_gbw_semantic_center", ORACLE,
        ),
        seeds=(0, 1, 2),
        max_iter=ITERATIONS,
        description="3 seeds of every arm: source-only (± GBW), DACS (± GBW, relative and absolute λ, "
        "GBW ablation) and the target oracle",
    ),
    # What decides whether GBW raises rare-class recall under DACS: GBW from the first iteration (source
    # pre-training with GBW, adaptation from that model, ± GBW) against GBW during adaptation only, and
    # frequency weighting in place of GBW (datasets/README.md, "Study: initialisation and weighting").
    "weighting": Preset(
        arms=(
            SOURCE_ONLY, "source_only_gbw", "source_only_freq", REFERENCE, "dacs_gbw", "dacs_freq",
            "dacs_from_gbw", "dacs_gbw_from_gbw",
        ),
        seeds=(0, 1, 2),
        max_iter=ITERATIONS,
        description="3 seeds of source-only and DACS, each plain, + GBW and + frequency weighting, and DACS ± GBW "
        "started from the source-only + GBW model",
    ),
    # GBW's λ under DACS: relative λ 0.1 ... 10 and absolute λ 1 (the reference), 1e-2, 1e-4
    # (datasets/README.md, "Study: λ").
    "lambda": Preset(
        arms=(
            SOURCE_ONLY, REFERENCE, "dacs_gbw_relative_lambda0.1", "dacs_gbw_relative_lambda0.3", "dacs_gbw",
            "dacs_gbw_relative_lambda3", "dacs_gbw_relative_lambda10", "dacs_gbw_absolute",
            "dacs_gbw_absolute_lambda0.01", "dacs_gbw_absolute_lambda0.0001",
        ),
        seeds=(0, 1, 2),
        max_iter=ITERATIONS,
        description="3 seeds of DACS + GBW with relative λ 0.1, 0.3, 1, 3, 10 and absolute λ 1, 1e-2, 1e-4, next "
        "to source-only and DACS",
    ),
    # GBW's weights are solved per batch: DACS ± GBW with 2, 4 and 8 source and target images per step, each
    # on as many images (600, 300, 150 iterations; datasets/README.md, "Study: batch size").
    "batch": Preset(
        arms=(SOURCE_ONLY, *(f"{arm}_batch{images}" for images in BATCH_SIZES for arm in (REFERENCE, "dacs_gbw"))),
        seeds=(0, 1, 2),
        max_iter=ITERATIONS,
        description="3 seeds of DACS ± GBW with 2, 4 and 8 images per domain per step, each trained on as many "
        "images (600, 300, 150 iterations), next to source-only",
    ),
    # GBW's effect against the severity of the imbalance: the rare classes of the target train split at 1, 0.1
    # and 0.3 times their frequency (datasets/README.md, "Study: imbalance severity"); the end points first.
    "imbalance": Preset(
        arms=(SOURCE_ONLY, REFERENCE, "dacs_gbw"),
        seeds=(0, 1, 2),
        max_iter=ITERATIONS,
        imbalance_levels=(1.0, 0.1, 0.3),
        description="3 seeds of source-only, DACS and DACS + GBW on three benchmarks whose target train split holds "
        "the rare classes at 1, 0.3 and 0.1 times their frequency",
    ),
    # Does a class's gradient track how hard it is to learn: DACS + GBW logged at every step
    # (datasets/README.md, "Study: gradient and difficulty").
    "gradient": Preset(
        arms=(SOURCE_ONLY, "dacs_gbw_every_step"),
        seeds=(0, 1, 2),
        max_iter=ITERATIONS,
        description="3 seeds of DACS + GBW with the class statistics of every step logged: the rank correlation "
        "of a class's squared gradient norm with the decrease of its loss over the next steps",
    ),
    # HRDA at length next to the single-scale arms it extends: 800 iterations, where the single-scale DACS
    # teacher is confident on over half of its pixels (datasets/README.md, "Study: HRDA at length").
    "hrda": Preset(
        arms=(SOURCE_ONLY, REFERENCE, "dacs_gbw", ORACLE, "hrda_source_only", "hrda_dacs", "hrda_dacs_gbw"),
        seeds=(0, 1, 2),
        max_iter=800,
        description="3 seeds of HRDA source-only and HRDA + DACS (± GBW) next to single-scale source-only, "
        "DACS (± GBW) and the target oracle, 800 iterations",
    ),
    # The top-down model next to the bottom-up one (datasets/README.md, "Study: top-down"); a top-down
    # step costs about 10x a bottom-up one on the CPU, so this preset is sized for a GPU.
    "top_down": Preset(
        arms=(SOURCE_ONLY, REFERENCE, "dacs_gbw", "maskrcnn_source_only", "maskrcnn_dacs", "maskrcnn_dacs_gbw"),
        seeds=(0, 1, 2),
        max_iter=ITERATIONS,
        description="3 seeds of the top-down model (Mask R-CNN decoder): source-only, DACS, DACS + GBW, next to "
        "the bottom-up source-only, DACS and DACS + GBW",
    ),
    # CI smoke test: a few iterations of two arms on a tiny benchmark; the numbers mean nothing.
    "smoke": Preset(
        arms=(SOURCE_ONLY, REFERENCE, "dacs_gbw"),
        seeds=(0,),
        max_iter=2,
        num_source=4,
        num_source_val=2,
        num_target_train=2,
        num_target_val=2,
        image_size=(64, 128),
        extra_opts=("INPUT.BASE_SIZE", "[64,128]", "INPUT.CROP.SIZE", "[64,64]"),
        description="smoke test (2 iterations per arm; the numbers mean nothing)",
    ),
}


@dataclass
class RunSpec:
    """One training run of the experiment."""

    arm: Arm
    seed: int
    output_dir: Path
    command: List[str] = field(default_factory=list)
    starts_from: Optional["RunSpec"] = None  # the run whose final model is the initial weights

    def eval_dir(self, dataset: str = VAL_DATASET) -> Path:
        """Folder of the evaluation reports on ``dataset`` (``sem_seg.json``, ``panoptic_seg.json``)."""
        return self.output_dir / "inference" / dataset

    @property
    def marker(self) -> Path:
        """``experiment_run.json``: the command, benchmark and CPU threads of the run (written when it
        starts) and its training time in seconds (added when it ends)."""
        return self.output_dir / "experiment_run.json"

    def made_with(self) -> Optional[Dict]:
        """The marker's content, or None when the run has not been started by the experiment."""
        return json.loads(self.marker.read_text()) if self.marker.is_file() else None

    def is_finished(self) -> bool:
        """Trained to the end by the experiment (its marker has the training time) and evaluated on both
        val sets."""
        made_with = self.made_with()
        evaluated = all((self.eval_dir(name) / "sem_seg.json").is_file() for name in (VAL_DATASET, SOURCE_VAL_DATASET))
        return evaluated and made_with is not None and "seconds" in made_with

    def is_done(self, benchmark: Dict) -> bool:
        """:meth:`is_finished`, with the same command as now, on the same benchmark ``benchmark`` (the
        datasets' ``generation.json``)."""
        return self.is_finished() and self.matches(self.made_with(), benchmark)

    def matches(self, made_with: Dict, benchmark: Dict) -> bool:
        """Whether a run made with ``made_with`` (a marker's content) is this run on ``benchmark``: the same
        command and benchmark, and the config the run saved (``OUTPUT_DIR/config.yaml``, once started) is
        the one the command gives now, so that an edited config file or default is not reused."""
        if made_with.get("command") != self.command or made_with.get("benchmark") != benchmark:
            return False
        saved = self.output_dir / "config.yaml"
        # The paths are the command's (compared above), or an equivalent run's for a reused run (find_same_run).
        return not saved.is_file() or config_without_paths(saved.read_text()) == self.config_without_paths()

    def config(self) -> str:
        """The full config (``cfg.dump()``) of the command, as ``tools/train_net.py`` saves it."""
        return _config_of(tuple(self.command))

    def config_without_paths(self) -> Dict:
        """:func:`config_without_paths` of :meth:`config`."""
        return config_without_paths(self.config())


@lru_cache(maxsize=None)
def _config_of(command: Tuple[str, ...]) -> str:
    """:meth:`RunSpec.config` of ``command``, built once per command (comparing a run with the folders of an
    earlier experiment builds it once per folder otherwise). Config files are not expected to change while
    the experiment runs."""
    return merged_config(build_parser().parse_args(list(command[2:]))).dump()


def config_without_paths(config: str) -> Dict:
    """A run's config (``config.yaml`` text) without where its files are: ``OUTPUT_DIR`` and a ``MODEL.WEIGHTS``
    that names another run's final model (``<folder>/model_final.pth``). A pretrained file stays."""
    values = yaml.safe_load(config)
    values.pop("OUTPUT_DIR", None)
    if Path(values["MODEL"]["WEIGHTS"]).name == "model_final.pth":
        values["MODEL"].pop("WEIGHTS")
    return values


def _starting_run_folder(folder: Path) -> Optional[Path]:
    """The folder of the run whose final model the run in ``folder`` started from, found from its saved
    ``MODEL.WEIGHTS`` and ``OUTPUT_DIR`` (relative paths are relative to the same working folder); None when it
    cannot be told (a relative model path next to an absolute output folder)."""
    values = yaml.safe_load((folder / "config.yaml").read_text())
    weights, output_dir = values["MODEL"]["WEIGHTS"], values["OUTPUT_DIR"]
    if os.path.isabs(weights):
        return Path(weights).parent
    if os.path.isabs(output_dir):
        return None
    return folder / os.path.relpath(Path(weights).parent, output_dir)


def same_run(run: RunSpec, folder: Path, benchmark: Dict) -> bool:
    """Whether the run in ``folder`` (made by the experiment runner, in this or another experiment) is ``run``
    but for where its files are: finished and evaluated, on ``benchmark``, with ``run``'s config but for
    :func:`config_without_paths`, and, where ``run`` starts from another run's final model, started from a run
    that is the same as that one (recursively)."""
    other = replace(run, output_dir=folder)
    if not other.is_finished() or other.made_with().get("benchmark") != benchmark:
        return False
    saved = folder / "config.yaml"
    if not saved.is_file() or config_without_paths(saved.read_text()) != run.config_without_paths():
        return False
    if run.starts_from is None:
        return True
    starting_folder = _starting_run_folder(folder)
    return starting_folder is not None and same_run(run.starts_from, starting_folder, benchmark)


def find_same_run(run: RunSpec, benchmark: Dict, reuse_from: Sequence[Path]) -> Optional[Path]:
    """The first run folder under ``reuse_from`` (folders of earlier experiments, searched in order) that is
    the same run as ``run`` (:func:`same_run`), or None."""
    for root in reuse_from:
        for marker in sorted(Path(root).glob("**/experiment_run.json")):
            folder = marker.parent
            if folder.resolve() != run.output_dir.resolve() and same_run(run, folder, benchmark):
                return folder
    return None


def _reuse(run: RunSpec, folder: Path, benchmark: Dict) -> None:
    """Make ``run`` the finished run in ``folder``: its checkpoints hard-linked into ``run.output_dir`` (copied
    where a link cannot be made; nothing rewrites a finished run's checkpoint), its other files copied, and a
    marker with ``run``'s command, the original training time and the folder it came from (``reused_from``)."""
    if run.output_dir.exists():
        kept = set_aside(run.output_dir)
        logger.warning("%s seed %d: unfinished %s kept as %s", run.arm.name, run.seed, run.output_dir, kept)

    def link_checkpoint(source: str, destination: str) -> str:
        if source.endswith(".pth"):
            try:
                os.link(source, destination)
                return destination
            except OSError:  # another file system, or links not supported
                pass
        return shutil.copy2(source, destination)

    made_with = replace(run, output_dir=folder).made_with()  # its training time and threads are kept
    shutil.copytree(folder, run.output_dir, copy_function=link_checkpoint)
    write_json(run.marker, {
        **made_with, "command": run.command, "benchmark": benchmark, "reused_from": str(folder.resolve()),
    })


def level_folder(level: float) -> str:
    """The folder of one imbalance level (``Preset.imbalance_levels``) under the datasets root and under the
    output folder: ``imbalance_<level>``."""
    return f"imbalance_{level:g}"


# Images per process of the benchmark's preparation (:func:`prepare_benchmark`).
IMAGES_PER_PREPARE_WORKER = 50


def prepare_benchmark(preset: Preset, datasets_root: Path, workers: int, rare_frequency: float = 1.0) -> None:
    """Generate and prepare the synthetic benchmark under ``datasets_root/synthetic`` (idempotent), with
    the rare classes of its target train split at ``rare_frequency`` times their frequency, with at most
    ``workers`` processes: one per :data:`IMAGES_PER_PREPARE_WORKER` images (a worker pool costs seconds to
    start, more than a few dozen small images take; the output does not depend on the number)."""
    height, width = preset.image_size
    images = preset.num_source + preset.num_source_val + preset.num_target_train + preset.num_target_val
    workers = max(1, min(workers, images // IMAGES_PER_PREPARE_WORKER))
    command = [
        sys.executable, str(REPO_ROOT / "datasets" / "prepare_synthetic.py"), str(datasets_root / "synthetic"),
        "--num-source", str(preset.num_source), "--num-source-val", str(preset.num_source_val),
        "--num-target-train", str(preset.num_target_train),
        "--num-target-val", str(preset.num_target_val), "--height", str(height), "--width", str(width),
        "--rare-frequency", repr(float(rare_frequency)), "--workers", str(workers),
    ]
    logger.info("Preparing the synthetic benchmark: %s", " ".join(command))
    subprocess.run(command, check=True, env=environment(datasets_root, threads=1))


def environment(datasets_root: Path, threads: int) -> Dict[str, str]:
    """The environment of a child process: ``DETECTRON2_DATASETS`` and ``threads`` OpenMP/MKL threads."""
    env = dict(os.environ)
    env["DETECTRON2_DATASETS"] = str(datasets_root)
    env["OMP_NUM_THREADS"] = str(threads)
    env["MKL_NUM_THREADS"] = str(threads)
    return env


def same_images_schedule(config: Path, opts: Sequence[str], max_iter: int) -> Tuple[int, List[str]]:
    """The iterations and schedule overrides of a run of ``config`` + ``opts`` that trains on as many images
    as ``max_iter`` iterations at the config file's batch size.

    With ``k`` = the run's source images per step (``SOLVER.IMS_PER_BATCH`` with ``opts``) ÷ the config
    file's (the target batch is set alongside, :func:`_batch_arm`), the keys counted in iterations
    (``SOLVER.MAX_ITER``, ``SOLVER.WARMUP_ITERS``, ``SOLVER.STEPS``, ``UDA.LOG_PERIOD``) are divided by ``k`` and
    rounded (the iterations and the log period to at least 1; the checkpoint period follows from the
    iterations in :func:`plan_runs`), the teacher's EMA coefficient ``UDA.EMA_ALPHA`` is raised to the power
    ``k`` so that its memory spans as many images, and ``SOLVER.BASE_LR`` is multiplied by √k, the
    square-root rule of adaptive optimisers (datasets/README.md, "Study: batch size", says why).

    Returns:
        ``(iterations, overrides)``; ``(max_iter, [])`` when ``k`` is 1.
    """
    base = merged_config(build_parser().parse_args(["--config-file", str(config)]))
    cfg = base.clone()
    cfg.merge_from_list(list(opts))
    k = cfg.SOLVER.IMS_PER_BATCH / base.SOLVER.IMS_PER_BATCH
    if k == 1:
        return max_iter, []
    iterations = max(round(max_iter / k), 1)
    return iterations, [
        "SOLVER.WARMUP_ITERS", str(round(cfg.SOLVER.WARMUP_ITERS / k)),
        "SOLVER.STEPS", str(tuple(round(step / k) for step in cfg.SOLVER.STEPS)),
        "UDA.LOG_PERIOD", str(max(round(cfg.UDA.LOG_PERIOD / k), 1)),
        "SOLVER.BASE_LR", f"{cfg.SOLVER.BASE_LR * math.sqrt(k):.6g}",
        "UDA.EMA_ALPHA", f"{cfg.UDA.EMA_ALPHA ** k:.6g}",
    ]


def plan_runs(preset: Preset, out: Path) -> List[RunSpec]:
    """The runs of ``preset``, each with its ``tools/train_net.py`` command; seed by seed, so that
    an interrupted experiment has complete seeds first."""
    configs = {}
    for arm_name in preset.arms:
        if arm_name not in ARMS:
            raise ValueError(f"unknown arm {arm_name!r}; known arms: {', '.join(ARMS)}")
        configs[arm_name] = REPO_ROOT / "configs" / ARMS[arm_name].config
        if not configs[arm_name].is_file():
            raise FileNotFoundError(f"config {configs[arm_name]} of arm {arm_name!r} does not exist")
        starts_from = ARMS[arm_name].starts_from
        if starts_from is not None and starts_from not in preset.arms:
            raise ValueError(
                f"arm {arm_name!r} starts from the final model of arm {starts_from!r} (same seed); add {starts_from!r} to the arms"
            )
    schedules = {
        name: same_images_schedule(configs[name], (*preset.extra_opts, *ARMS[name].opts), preset.max_iter)
        for name in configs
    }
    # The arms others start from first: in a pool that takes runs in order, a run waits only for one
    # that has already started.
    ordered = sorted(configs, key=lambda name: ARMS[name].starts_from is not None)
    runs: List[RunSpec] = []
    for seed in preset.seeds:
        runs_of_seed: Dict[str, RunSpec] = {}
        for arm_name in ordered:
            iterations, schedule = schedules[arm_name]
            # One folder per schedule: a longer run is a new run, not a continuation of a short one.
            output_dir = out / "runs" / arm_name / f"{iterations}it_seed{seed}"
            command = [
                sys.executable, str(REPO_ROOT / "tools" / "train_net.py"), "--config-file", str(configs[arm_name]),
                "--resume", "OUTPUT_DIR", str(output_dir), "SEED", str(seed),
                "SOLVER.MAX_ITER", str(iterations), "SOLVER.CHECKPOINT_PERIOD", str(max(iterations // 3, 1)),
                "TEST.EVAL_PERIOD", "0", *preset.extra_opts, *ARMS[arm_name].opts, *schedule,
            ]
            start_arm = ARMS[arm_name].starts_from
            starts_from = runs_of_seed[start_arm] if start_arm is not None else None  # planned above
            if starts_from is not None:
                command += ["MODEL.WEIGHTS", str(starts_from.output_dir / "model_final.pth")]
            runs_of_seed[arm_name] = RunSpec(ARMS[arm_name], seed, output_dir, command, starts_from)
        runs += runs_of_seed.values()
    return runs


@dataclass(frozen=True)
class Benchmark:
    """One benchmark of an experiment with its runs: the preset as it runs there, the factor on its rare
    classes' target train frequency (``level``), its datasets root and the experiment's folder for it."""

    preset: Preset
    level: float
    datasets_root: Path
    out: Path
    runs: List[RunSpec]


def plan_benchmarks(preset: Preset, out: Path, datasets_root: Path) -> List[Benchmark]:
    """The benchmarks of ``preset`` and their runs (:func:`plan_runs`): the standard benchmark under
    ``datasets_root`` with the runs under ``out``, or, for a preset with ``imbalance_levels``, one per level,
    both in :func:`level_folder` (e.g. ``datasets_root/imbalance_0.1/synthetic``, ``out/imbalance_0.1/runs``)."""
    if not preset.imbalance_levels:
        return [Benchmark(preset, 1.0, datasets_root, out, plan_runs(preset, out))]
    benchmarks = []
    for level in preset.imbalance_levels:
        level_preset = replace(
            preset, imbalance_levels=(),
            description=f"{preset.description}; this benchmark: the rare classes of target train at {level:g} times "
            "their frequency",
        )
        folder = level_folder(level)
        benchmarks.append(Benchmark(
            level_preset, level, datasets_root / folder, out / folder, plan_runs(level_preset, out / folder)
        ))
    return benchmarks


def benchmark_of(datasets_root: Path) -> Dict:
    """What identifies the generated benchmark under ``datasets_root``: its ``generation.json`` (design,
    seed, sizes)."""
    return json.loads((datasets_root / "synthetic" / "generation.json").read_text())


def set_aside(output_dir: Path) -> Path:
    """Rename ``output_dir`` to the first free ``<name>.old<k>``; returns the new path."""
    k = 1
    while output_dir.with_name(f"{output_dir.name}.old{k}").exists():
        k += 1
    return output_dir.rename(output_dir.with_name(f"{output_dir.name}.old{k}"))


def train_and_evaluate(run: RunSpec, datasets_root: Path, threads: int, reuse_from: Sequence[Path] = ()) -> float:
    """Run one training (skipped when already done); returns its wall time in seconds (0 if skipped).

    A run that is not done but is the same as a finished run of an earlier experiment under ``reuse_from``
    (:func:`find_same_run`) is copied from it instead of trained. A run started with another command, with a
    config that has changed since (a config file or default edited), or on another benchmark (the datasets
    were generated again with another design, seed or size) is not continued: its folder is kept as
    ``<folder>.old<k>`` and the run starts over."""
    benchmark = benchmark_of(datasets_root)
    if run.is_done(benchmark):
        logger.info("%s seed %d: already trained and evaluated (%s)", run.arm.name, run.seed, run.output_dir)
        return 0.0
    same = find_same_run(run, benchmark, reuse_from) if reuse_from else None
    if same is not None:
        _reuse(run, same, benchmark)
        logger.info("%s seed %d: the same run is in %s; reused (%s)", run.arm.name, run.seed, same, run.output_dir)
        return 0.0
    made_with = run.made_with()
    if made_with is not None and not run.matches(made_with, benchmark):
        kept = set_aside(run.output_dir)
        logger.warning(
            "%s seed %d: %s was made with another command, config or benchmark; kept as %s, training again",
            run.arm.name, run.seed, run.output_dir, kept,
        )
    run.output_dir.mkdir(parents=True, exist_ok=True)
    write_json(run.marker, {"command": run.command, "benchmark": benchmark, "threads": threads})
    log_path = run.output_dir / "train_stdout.log"
    logger.info("%s seed %d: training (log: %s)", run.arm.name, run.seed, log_path)
    start = time.perf_counter()
    with open(log_path, "a") as log:
        result = subprocess.run(run.command, stdout=log, stderr=subprocess.STDOUT, env=environment(datasets_root, threads))
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(
            f"training run {run.arm.name} seed {run.seed} failed (exit {result.returncode}); see {log_path}"
        )
    write_json(run.marker, {"command": run.command, "benchmark": benchmark, "threads": threads, "seconds": elapsed})
    logger.info("%s seed %d: done in %.0f s", run.arm.name, run.seed, elapsed)
    return elapsed
