"""The synthetic-benchmark experiment behind ``make demo`` and ``make experiment``
(``tools/run_experiment.py``): :mod:`experiment.runs` plans, trains and evaluates the runs,
:mod:`experiment.report` writes the report. Repository tooling, not part of the ``gbw_panoptic``
package: it runs ``datasets/prepare_synthetic.py`` and ``tools/*.py`` of this checkout.
"""
from __future__ import annotations

import logging
import os
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

from .report import collect_results, write_levels_report, write_report
from .runs import ARMS, PRESETS, RunSpec, plan_benchmarks, prepare_benchmark, train_and_evaluate

__all__ = ["run_experiment", "threads_per_run"]

logger = logging.getLogger("experiment")


def _train_after(
    after: Optional[Future], run: RunSpec, datasets_root: Path, threads: int, reuse_from: Sequence[Path]
) -> float:
    """Train and evaluate ``run`` (or reuse the same run of an earlier experiment under ``reuse_from``) once
    ``after`` (the run it starts from) has finished."""
    if after is not None:
        try:
            after.result()
        except Exception as e:
            raise RuntimeError(f"{run.arm.name} seed {run.seed} not trained: the run it starts from failed ({e})") from e
    return train_and_evaluate(run, datasets_root, threads, reuse_from)


def threads_per_run(runs: Sequence[RunSpec], jobs: int, cores: int) -> Dict[Path, int]:
    """CPU threads of each run (by output folder): ``cores ÷ jobs`` (at least 1), or every core for a run
    that all the other runs start from (nothing can train beside it, e.g. the source-only run of
    ``make demo``). Fixed by the plan, not by timing, so that a run's numbers do not depend on when it
    happened to start."""
    shared = max(cores // max(jobs, 1), 1)
    threads = {}
    for run in runs:
        others = [other for other in runs if other is not run]
        alone = all(other.starts_from is not None and other.starts_from.output_dir == run.output_dir for other in others)
        threads[run.output_dir] = cores if alone else shared
    return threads


def run_experiment(
    preset_name: str,
    out: Path,
    datasets_root: Path,
    jobs: Optional[int] = None,
    arms: Optional[Sequence[str]] = None,
    seeds: Optional[Sequence[int]] = None,
    max_iter: Optional[int] = None,
    report_only: bool = False,
    reuse_from: Sequence[Path] = (),
) -> Path:
    """Prepare the benchmark (one per imbalance level of the preset, :func:`~.runs.plan_benchmarks`), train
    and evaluate every run (``jobs`` at a time; default: the preset's), write the report of each benchmark
    and, with imbalance levels, ``out/report.md`` comparing them. With ``report_only``, write the reports
    of runs that have all finished, without checking that their configs are those the current code gives
    (e.g. after a later change of the code that added a config key); a missing run is an error. A run that
    is the same as a finished run of an earlier experiment under ``reuse_from`` (same config but for where its
    files are, same benchmark, same starting run: :func:`~.runs.find_same_run`) is copied, not trained.

    Returns the path of ``out/report.md``.
    """
    if preset_name not in PRESETS:
        raise ValueError(f"unknown preset {preset_name!r}; choose one of {', '.join(PRESETS)}")
    preset = PRESETS[preset_name]
    overrides = {}
    if arms:
        overrides["arms"] = tuple(arms)
    if seeds:
        overrides["seeds"] = tuple(seeds)
    if max_iter:
        overrides["max_iter"] = max_iter
    if overrides:
        preset = replace(preset, **overrides)
        unknown = [name for name in preset.arms if name not in ARMS]
        if unknown:
            raise ValueError(f"unknown arm(s) {', '.join(unknown)}; known arms: {', '.join(ARMS)}")
        labels = ", ".join(ARMS[name].label for name in preset.arms)
        preset = replace(
            preset,
            description=f"{len(preset.seeds)} seed(s) of {labels}, {preset.max_iter} iterations (preset {preset_name!r} modified)",
        )
    jobs = max(jobs or preset.jobs, 1)
    start = time.perf_counter()
    benchmarks = plan_benchmarks(preset, out, datasets_root)
    runs = [(run, benchmark.datasets_root) for benchmark in benchmarks for run in benchmark.runs]
    if report_only:
        missing = [f"{run.arm.name} seed {run.seed} ({run.output_dir})" for run, _ in runs if not run.is_finished()]
        if missing:
            raise RuntimeError(f"--report-only: {len(missing)} run(s) not finished: {'; '.join(missing)}")
    else:
        out.mkdir(parents=True, exist_ok=True)
        for benchmark in benchmarks:
            prepare_benchmark(benchmark.preset, benchmark.datasets_root, workers=jobs, rare_frequency=benchmark.level)
        logger.info("%d runs (%s)", len(runs), preset.description)
        _train(runs, jobs, reuse_from)
    for benchmark in benchmarks:
        report = write_report(preset_name, benchmark.preset, benchmark.runs, benchmark.out, benchmark.datasets_root,
                              time.perf_counter() - start)
    if preset.imbalance_levels:
        experiments = {
            benchmark.level: collect_results(preset_name, benchmark.preset, benchmark.runs, benchmark.datasets_root)
            for benchmark in benchmarks
        }
        report = write_levels_report(preset_name, preset, experiments, out, time.perf_counter() - start)
    logger.info("Report: %s", report)
    return report


def _train(runs: Sequence[Tuple[RunSpec, Path]], jobs: int, reuse_from: Sequence[Path] = ()) -> None:
    """Train and evaluate ``runs`` (each with its datasets root), ``jobs`` at a time, a run after the one it
    starts from, reusing the same runs of the experiments under ``reuse_from``; raises the first failure once
    every run has ended."""
    cores = os.cpu_count() or 1
    threads, shared = threads_per_run([run for run, _ in runs], jobs, cores), max(cores // jobs, 1)
    logger.info("%d at a time with %d thread(s) each", jobs, shared)
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        futures: Dict[Path, Future] = {}
        for run, datasets_root in runs:
            if threads[run.output_dir] > shared:
                logger.info("%s seed %d: nothing can train beside it, so it trains with %d thread(s)",
                            run.arm.name, run.seed, cores)
            # plan_runs puts a run after the one it starts from: that one has started when this one does.
            after = futures[run.starts_from.output_dir] if run.starts_from is not None else None
            futures[run.output_dir] = pool.submit(
                _train_after, after, run, datasets_root, threads[run.output_dir], reuse_from
            )
        for future in futures.values():
            future.result()
