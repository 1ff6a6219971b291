"""The synthetic-benchmark experiment (`make demo` / `make experiment`, tools/experiment/): the
presets, the statistics and conclusion of the report on constructed results, and, shortened, the whole
pipeline (the smoke preset trains two arms for 2 iterations on a tiny benchmark and writes the report)."""
import json
import math
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest
from detectron2.config import CfgNode
from scipy import stats as scipy_stats

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from experiment import run_experiment, threads_per_run  # noqa: E402
from experiment import report as experiment_report  # noqa: E402
from experiment.report import (  # noqa: E402
    COMPARED_METRICS, ExperimentResults, conclusion_section, design_checks, differences_section, sweep_section,
    write_levels_report,
)
from experiment.runs import (  # noqa: E402
    ARMS, BATCH_SIZES, PRESETS, SOURCE_VAL_DATASET, VAL_DATASET, RunSpec, benchmark_of, find_same_run,
    plan_benchmarks, plan_runs, prepare_benchmark, train_and_evaluate,
)
from experiment.stats import gap_closed, t_interval  # noqa: E402


def test_presets_name_existing_configs(tmp_path):
    first_run_of_arm = {}
    for name, preset in PRESETS.items():
        runs = plan_runs(preset, tmp_path)
        assert len(runs) == len(preset.arms) * len(preset.seeds), name
        for run in runs:
            assert run.arm.baseline is None or run.arm.baseline in ARMS
            assert "--resume" in run.command and str(run.output_dir) in run.command
            first_run_of_arm.setdefault(run.arm.name, run)
    # Every arm's command gives a config (an override the config refuses would fail its run only when the
    # experiment reaches it).
    for run in first_run_of_arm.values():
        assert f"OUTPUT_DIR: {run.output_dir}" in run.config()
    assert {"source_only", "dacs", "dacs_gbw", "target_oracle"} <= set(PRESETS["demo"].arms)
    assert len(PRESETS["experiment"].seeds) >= 3
    # HRDA arms are compared with the single-scale ones they extend, in their own preset.
    assert not any(arm.startswith("hrda") for arm in PRESETS["experiment"].arms)
    assert {"source_only", "dacs", "hrda_dacs", "hrda_dacs_gbw"} <= set(PRESETS["hrda"].arms)


def test_adaptation_arms_and_the_oracle_start_from_the_source_only_model_of_their_seed(tmp_path):
    runs = plan_runs(PRESETS["experiment"], tmp_path)
    for position, run in enumerate(runs):
        if run.arm.name.startswith("dacs") or run.arm.name == "target_oracle":
            assert (run.starts_from.arm.name, run.starts_from.seed) == ("source_only", run.seed)
            assert runs.index(run.starts_from) < position  # planned (hence started) before
            weights = run.command[run.command.index("MODEL.WEIGHTS") + 1]
            assert weights == str(tmp_path / "runs" / "source_only" / f"600it_seed{run.seed}" / "model_final.pth")
        else:
            assert run.starts_from is None and "MODEL.WEIGHTS" not in run.command
    with pytest.raises(ValueError, match="arm 'dacs' starts from the final model of arm 'source_only'"):
        run_experiment("smoke", tmp_path / "out", tmp_path / "datasets", arms=["dacs", "target_oracle"])
    assert not (tmp_path / "datasets").exists() and not (tmp_path / "out").exists()


def test_gbw_from_the_start_arms_start_from_the_source_only_gbw_model(tmp_path):
    runs = {(run.arm.name, run.seed): run for run in plan_runs(PRESETS["weighting"], tmp_path)}
    for seed in PRESETS["weighting"].seeds:
        for arm in ("dacs_from_gbw", "dacs_gbw_from_gbw"):
            run = runs[(arm, seed)]
            assert run.starts_from is runs[("source_only_gbw", seed)]
            weights = run.command[run.command.index("MODEL.WEIGHTS") + 1]
            assert weights == str(tmp_path / "runs" / "source_only_gbw" / f"600it_seed{seed}" / "model_final.pth")
        assert runs[("dacs_freq", seed)].starts_from is runs[("source_only", seed)]


def test_a_run_every_other_run_starts_from_gets_every_core(tmp_path):
    demo = plan_runs(PRESETS["demo"], tmp_path)
    threads = threads_per_run(demo, jobs=3, cores=2)
    assert {run.arm.name: threads[run.output_dir] for run in demo} == {
        "source_only": 2, "dacs": 1, "dacs_gbw": 1, "target_oracle": 1,
    }
    # Three seeds: the source-only runs train beside each other, every run shares the cores.
    experiment = plan_runs(PRESETS["experiment"], tmp_path)
    assert set(threads_per_run(experiment, jobs=2, cores=8).values()) == {4}
    assert set(threads_per_run(experiment, jobs=3, cores=2).values()) == {1}


def test_t_interval_matches_scipy_and_needs_two_values():
    values = [31.0, 35.5, 33.0, 30.25]
    interval = t_interval(values)
    low, high = scipy_stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=scipy_stats.sem(values))
    assert interval.mean == pytest.approx(np.mean(values))
    assert (interval.low, interval.high) == (pytest.approx(low), pytest.approx(high))
    assert interval.format() == f"{np.mean(values):.2f} [{low:.2f}, {high:.2f}]"
    single = t_interval([4.0, math.nan])
    assert single.n == 1 and math.isnan(single.low) and not single.excludes_zero()
    assert single.format(signed=True) == "+4.00"
    assert t_interval([]).format() == "n/a"


def test_gap_closed_is_paired_by_seed():
    lower, upper = {0: 20.0, 1: 30.0, 2: 10.0}, {0: 60.0, 1: 50.0}
    # Seed 2 has no oracle: left out; seed 0 closes 10 of 40 points, seed 1 10 of 20.
    assert gap_closed({0: 30.0, 1: 40.0, 2: 99.0}, lower, upper) == [25.0, 50.0]


def _experiment(differences, miou_differences, seeds=(0, 1, 2), bounds=False):
    """Constructed results of DACS and DACS + GBW: GBW's rare recall and mIoU are DACS's plus the
    given per-seed differences; ten classes, the last four rare. With ``bounds``, also source-only
    (mIoU 10 below DACS) and the oracle (20 above): DACS closes a third of the gap on every seed."""
    arm_names = ("dacs", "dacs_gbw") + (("source_only", "target_oracle") if bounds else ())
    preset = PRESETS["smoke"].__class__(arms=arm_names, seeds=seeds, max_iter=1)
    metrics, per_class, curves = {}, {}, {}
    for seed in seeds:
        if bounds:
            for arm, offset in (("source_only", -10.0), ("target_oracle", 20.0)):
                metrics[(arm, seed)] = OrderedDict([("mIoU", 40.0 + seed + offset), ("recall (rare)", 30.0),
                                                    ("recall (frequent)", 70.0)])
                per_class[(arm, seed)] = {key: np.full(10, 50.0) for key in ("IoU", "recall", "precision")}
        base = OrderedDict([("mIoU", 40.0 + seed), ("recall (rare)", 10.0 + 2 * seed), ("precision (rare)", 50.0),
                            ("recall (frequent)", 70.0), ("confident fraction", 60.0)])
        gbw = OrderedDict(base)
        gbw["recall (rare)"] += differences[seed]
        gbw["mIoU"] += miou_differences[seed]
        metrics[("dacs", seed)], metrics[("dacs_gbw", seed)] = base, gbw
        for arm in ("dacs", "dacs_gbw"):
            per_class[(arm, seed)] = {key: np.full(10, 50.0) for key in ("IoU", "recall", "precision")}
            curves[(arm, seed)] = (np.arange(10), np.linspace(0, 0.6, 10))
    fractions = np.array([0.3, 0.2, 0.2, 0.15, 0.1, 0.03, 0.008, 0.006, 0.004, 0.002])
    return ExperimentResults(
        "test", preset, [ARMS[name] for name in arm_names], {}, metrics, per_class, curves,
        [f"class{c}" for c in range(10)], fractions, fractions < 0.01, fractions >= 0.01,
    )


@pytest.mark.parametrize(
    "rare, miou, verdict",
    [
        ((3.0, 4.0, 5.0), (0.5, -0.5, 0.0), "the claim is supported"),
        ((-3.0, -4.0, -5.0), (0.0, 0.0, 0.0), "the claim is contradicted"),
        ((3.0, 4.0, 5.0), (-1.0, -1.2, -0.9), "the claim is contradicted"),
        ((3.0, -4.0, 2.0), (0.5, -0.5, 0.0), "neither supported nor contradicted"),
    ],
)
def test_conclusion_follows_the_intervals(rare, miou, verdict):
    experiment = _experiment(dict(enumerate(rare)), dict(enumerate(miou)))
    interval = experiment.difference("dacs_gbw", "dacs", "recall (rare)")
    assert interval.mean == pytest.approx(np.mean(rare))
    text = "\n".join(conclusion_section(experiment))
    assert verdict in text and "DACS + GBW" in text
    assert interval.format(signed=True) in text


def test_conclusion_names_a_precision_no_seed_has_as_undefined():
    """An arm that never predicts the rare classes has no rare precision in any seed: undefined, not one seed."""
    experiment = _experiment({0: -9.0, 1: -10.0, 2: -11.0}, {0: -5.0, 1: -5.0, 2: -5.0})
    for seed in experiment.seeds:
        experiment.metrics[("dacs_gbw", seed)]["precision (rare)"] = math.nan
    text = "\n".join(conclusion_section(experiment))
    assert "precision (rare): undefined in every seed" in text and "one seed" not in text


def test_conclusion_with_one_seed_claims_nothing():
    experiment = _experiment({0: 10.0}, {0: 5.0}, seeds=(0,))
    text = "\n".join(conclusion_section(experiment))
    assert "cannot be judged from one seed" in text and "supported" not in text


def _add_arm(experiment, name, rare_recall_offset, from_arm="dacs"):
    """Add arm ``name`` to constructed results: ``from_arm``'s metrics with rare recall + the offset."""
    experiment.arms.append(ARMS[name])
    for seed in experiment.seeds:
        values = OrderedDict(experiment.metrics[(from_arm, seed)])
        values["recall (rare)"] += rare_recall_offset
        experiment.metrics[(name, seed)] = values


def _table_rows(text, *series):
    """The cells of the markdown rows of ``text`` that start with one of ``series``."""
    return [[cell.strip() for cell in line.split("|")[1:-1]] for line in text.splitlines()
            if line.startswith(tuple(f"| {name} |" for name in series))]


def test_hrda_arms_are_paired_with_the_arm_they_add_to(tmp_path):
    """H17 and H18 of the HRDA study: HRDA + DACS − HRDA source-only and HRDA + DACS + GBW − HRDA + DACS,
    paired by seed, in the differences table and the conclusion."""
    experiment = _experiment({0: 0.0, 1: 0.0, 2: 0.0}, {0: 0.0, 1: 0.0, 2: 0.0})
    _add_arm(experiment, "hrda_source_only", -5.0)
    _add_arm(experiment, "hrda_dacs", -1.0)
    _add_arm(experiment, "hrda_dacs_gbw", -3.0)
    for seed in experiment.seeds:  # HRDA + DACS + GBW: rare recall 2 below HRDA + DACS, +1 per seed
        experiment.metrics[("hrda_dacs_gbw", seed)]["recall (rare)"] += seed
    for values in experiment.metrics.values():  # metrics the constructed results leave out
        for name in COMPARED_METRICS:
            values.setdefault(name, math.nan)
    text = "\n".join(differences_section(experiment, tmp_path / "figures"))
    compared = ("HRDA + DACS − HRDA source only", "HRDA + DACS + GBW − HRDA + DACS")
    rows = {row[0]: row[1:] for row in _table_rows(text, *compared)}
    rare = COMPARED_METRICS.index("recall (rare)")
    assert rows["HRDA + DACS − HRDA source only"][rare] == "+4.00 [+4.00, +4.00]"
    assert rows["HRDA + DACS + GBW − HRDA + DACS"][rare] == experiment.difference(
        "hrda_dacs_gbw", "hrda_dacs", "recall (rare)").format(signed=True)
    assert experiment.difference("hrda_dacs_gbw", "hrda_dacs", "recall (rare)").mean == pytest.approx(-1.0)
    conclusion = "\n".join(conclusion_section(experiment))
    assert "**HRDA + DACS** vs HRDA source only" in conclusion
    assert "**HRDA + DACS + GBW** vs HRDA + DACS" in conclusion


def test_sweep_section_draws_each_lambda_against_dacs(tmp_path):
    experiment = _experiment({0: 1.0, 1: 2.0, 2: 3.0}, {0: 0.0, 1: 0.0, 2: 0.0})
    # dacs_gbw (relative λ 1) plus two more relative λ and one absolute λ, with rare recall +10 per step.
    for index, name in enumerate(("dacs_gbw_relative_lambda0.1", "dacs_gbw_relative_lambda10", "dacs_gbw_absolute")):
        _add_arm(experiment, name, 10.0 * (index + 1))
    text = "\n".join(sweep_section(experiment, tmp_path / "figures"))
    assert (tmp_path / "figures" / "sweep_lambda.png").stat().st_size > 1000
    assert "](figures/sweep_lambda.png)" in text
    rows = _table_rows(text, "relative λ", "absolute λ", "DACS")
    # Ordered by series, then value; DACS + GBW (relative λ 1) sits between 0.1 and 10; DACS, the baseline
    # of every λ arm, last. Columns: series, λ, baseline, then rare recall and its difference against DACS.
    assert [row[:3] for row in rows] == [
        ["absolute λ", "1", "DACS"], ["relative λ", "0.1", "DACS"], ["relative λ", "1", "DACS"],
        ["relative λ", "10", "DACS"], ["DACS", "–", "–"],
    ]
    # DACS's rare recall is 10, 12, 14 over the seeds; relative λ 0.1 adds 10 on every seed (no spread).
    assert rows[-1][3].startswith("12.00 [") and rows[-1][4] == "–"
    assert rows[1][3].startswith("22.00 [") and rows[1][4] == "+10.00 [+10.00, +10.00]"
    assert rows[2][4] == experiment.difference("dacs_gbw", "dacs", "recall (rare)").format(signed=True)
    # Each λ arm's overrides reach its command.
    run = next(r for r in plan_runs(PRESETS["lambda"], tmp_path) if r.arm.name == "dacs_gbw_absolute_lambda0.0001")
    tail = run.command[run.command.index("MODEL.GBW.SEM_SEG.LAMBDA_MODE"):]
    assert tail[:4] == ["MODEL.GBW.SEM_SEG.LAMBDA_MODE", "absolute", "MODEL.GBW.SEM_SEG.LAMBDA", "0.0001"]
    assert "MODEL.GBW.OFFSET.LAMBDA" in tail and run.config().count("LAMBDA: 0.0001") == 3


def test_sweep_section_compares_gbw_with_dacs_at_each_batch_size(tmp_path):
    experiment = _experiment({0: 0.0, 1: 0.0, 2: 0.0}, {0: 0.0, 1: 0.0, 2: 0.0})
    # DACS at batch b: DACS's rare recall - b; DACS + GBW at batch b: that + b / 2.
    for images in BATCH_SIZES:
        _add_arm(experiment, f"dacs_batch{images}", -images)
        _add_arm(experiment, f"dacs_gbw_batch{images}", images / 2, from_arm=f"dacs_batch{images}")
    text = "\n".join(sweep_section(experiment, tmp_path / "figures"))
    assert (tmp_path / "figures" / "sweep_images_per_step.png").stat().st_size > 1000
    assert "## Sweep: lambda" not in text  # dacs_gbw alone is no λ sweep
    text, change = text.split("### Change from images per step = 2")
    rows = _table_rows(text, "DACS", "DACS + GBW")
    assert [row[:3] for row in rows] == [
        ["DACS", "2", "–"], ["DACS", "4", "–"], ["DACS", "8", "–"],
        ["DACS + GBW", "2", "DACS (batch 2)"], ["DACS + GBW", "4", "DACS (batch 4)"], ["DACS + GBW", "8", "DACS (batch 8)"],
    ]
    assert [row[4] for row in rows[3:]] == ["+1.00 [+1.00, +1.00]", "+2.00 [+2.00, +2.00]", "+4.00 [+4.00, +4.00]"]
    assert rows[2][3].startswith("4.00 [")  # DACS at batch 8: 10, 12, 14 - 8
    # GBW's difference at 4 and 8 against its difference at the configs' 2 images (DACS has no baseline).
    assert [row[:3] for row in _table_rows(change, "DACS", "DACS + GBW")] == [
        ["DACS + GBW", "4", "+1.00 [+1.00, +1.00]"], ["DACS + GBW", "8", "+3.00 [+3.00, +3.00]"],
    ]


def test_batch_preset_trains_every_batch_size_on_as_many_images(tmp_path):
    runs = plan_runs(PRESETS["batch"], tmp_path)
    assert len(runs) == 3 * (1 + 2 * len(BATCH_SIZES))
    plain = {
        (run.arm.name, run.seed): CfgNode.load_cfg(run.config())
        for run in plan_runs(PRESETS["demo"].__class__(arms=("source_only", "dacs", "dacs_gbw"), seeds=(0, 1, 2),
                                                       max_iter=600), tmp_path)
    }
    reference = plain[("dacs", 0)]
    for run in runs:
        if run.arm.name == "source_only":
            continue
        images = int(run.arm.name.rsplit("_batch", 1)[1])
        k = images / reference.SOLVER.IMS_PER_BATCH
        cfg = CfgNode.load_cfg(run.config())
        assert cfg.SOLVER.IMS_PER_BATCH == cfg.DATASETS.TARGET_IMS_PER_BATCH == images
        # As many images as DACS's 600 iterations of 2 + 2, warm-up and log period the same in images.
        assert cfg.SOLVER.MAX_ITER * images == reference.SOLVER.MAX_ITER * reference.SOLVER.IMS_PER_BATCH == 1200
        assert run.output_dir == tmp_path / "runs" / run.arm.name / f"{cfg.SOLVER.MAX_ITER}it_seed{run.seed}"
        assert abs(cfg.SOLVER.WARMUP_ITERS * k - reference.SOLVER.WARMUP_ITERS) <= k / 2
        assert cfg.UDA.LOG_PERIOD * k == reference.UDA.LOG_PERIOD
        assert cfg.SOLVER.CHECKPOINT_PERIOD == cfg.SOLVER.MAX_ITER // 3
        # The teacher forgets as fast per image; the learning rate follows the square-root rule.
        assert cfg.UDA.EMA_ALPHA == pytest.approx(reference.UDA.EMA_ALPHA ** k, rel=1e-5)
        assert cfg.SOLVER.BASE_LR == pytest.approx(reference.SOLVER.BASE_LR * math.sqrt(k), rel=1e-5)
        # From the source-only model of the seed, GBW compared with DACS at the same batch size.
        assert run.starts_from.arm.name == "source_only" and run.starts_from.seed == run.seed
        assert cfg.MODEL.WEIGHTS == str(tmp_path / "runs" / "source_only" / f"600it_seed{run.seed}" / "model_final.pth")
        assert run.arm.baseline in (None, f"dacs_batch{images}")
        assert cfg.MODEL.GBW.SEM_SEG.ENABLED == run.arm.name.startswith("dacs_gbw")
        if images == 2:  # the reference batch: the config of DACS (± GBW) as the other studies train it
            cfg.OUTPUT_DIR = str(tmp_path / "runs" / run.arm.name.replace("_batch2", "") / f"600it_seed{run.seed}")
            assert cfg == plain[(run.arm.name.replace("_batch2", ""), run.seed)]


def test_imbalance_preset_plans_one_benchmark_and_one_set_of_runs_per_level(tmp_path):
    out, datasets = tmp_path / "out", tmp_path / "datasets"
    benchmarks = plan_benchmarks(PRESETS["imbalance"], out, datasets)
    assert [benchmark.level for benchmark in benchmarks] == [1.0, 0.1, 0.3]
    standard = plan_runs(PRESETS["imbalance"], out)
    for benchmark in benchmarks:
        folder = f"imbalance_{benchmark.level:g}"
        assert benchmark.datasets_root == datasets / folder and benchmark.out == out / folder
        assert f"at {benchmark.level:g} times their frequency" in benchmark.preset.description
        assert [(run.arm.name, run.seed) for run in benchmark.runs] == [(run.arm.name, run.seed) for run in standard]
        for run, same in zip(benchmark.runs, standard):
            assert run.output_dir == out / folder / "runs" / run.arm.name / f"600it_seed{run.seed}"
            # The commands of the standard benchmark's runs, in the level's folder: from its own source-only model.
            assert run.command == [part.replace(str(out), str(out / folder)) for part in same.command]
            assert run.starts_from is None or run.starts_from.output_dir.parent.parent.parent == out / folder


def test_levels_report_compares_gbw_with_dacs_at_each_level(tmp_path):
    # GBW − DACS in rare recall: +1, +2, +3 on seeds 0, 1, 2 at level 1, -1 at 0.3 and -3 at 0.1 on every seed.
    experiments = {
        1.0: _experiment({0: 1.0, 1: 2.0, 2: 3.0}, {0: 0.0, 1: 0.0, 2: 0.0}),
        0.3: _experiment({0: -1.0, 1: -1.0, 2: -1.0}, {0: 0.0, 1: 0.0, 2: 0.0}),
        0.1: _experiment({0: -3.0, 1: -3.0, 2: -3.0}, {0: 0.0, 1: 0.0, 2: 0.0}),
    }
    experiments[0.1].fractions[experiments[0.1].rare] /= 10
    report = write_levels_report("imbalance", PRESETS["imbalance"], experiments, tmp_path, seconds=60.0)
    text = report.read_text()
    assert (tmp_path / "figures" / "sweep_rare-class_frequency_factor.png").stat().st_size > 1000
    # The rare classes' share of the target train pixels per level, with the link to the level's own report.
    assert "| 1 | 2.00% | [imbalance_1/report.md](imbalance_1/report.md) |" in text
    assert "| 0.1 | 0.20% | [imbalance_0.1/report.md](imbalance_0.1/report.md) |" in text
    text, change = text.split("### Change from rare-class frequency factor = 1")
    rows = _table_rows(text, "DACS + GBW")
    assert [(row[1], row[2], row[4]) for row in rows] == [
        ("0.1", "DACS", "-3.00 [-3.00, -3.00]"), ("0.3", "DACS", "-1.00 [-1.00, -1.00]"),
        ("1", "DACS", experiments[1.0].difference("dacs_gbw", "dacs", "recall (rare)").format(signed=True)),
    ]
    # Against the standard benchmark, paired by seed: -1 - (1, 2, 3) at 0.3, -3 - (1, 2, 3) at 0.1.
    assert [(row[1], row[2]) for row in _table_rows(change, "DACS + GBW")] == [
        ("0.1", t_interval([-4.0, -5.0, -6.0]).format(signed=True)),
        ("0.3", t_interval([-2.0, -3.0, -4.0]).format(signed=True)),
    ]
    results = json.loads((tmp_path / "results.json").read_text())
    assert set(results["levels"]) == {"1", "0.3", "0.1"}
    assert results["levels"]["0.1"]["dacs_gbw/seed2"]["recall (rare)"] == 14.0 - 3.0


@pytest.mark.slow
def test_each_level_is_its_own_benchmark_for_the_runner(tmp_path):
    datasets = tmp_path / "imbalance_0.1"
    prepare_benchmark(PRESETS["smoke"], datasets, workers=1, rare_frequency=0.1)
    benchmark = benchmark_of(datasets)
    assert benchmark["rare_frequency"] == 0.1
    # A run made on the standard benchmark of the same size is not this benchmark's.
    standard = {key: value for key, value in benchmark.items() if key != "rare_frequency"}
    run = plan_runs(PRESETS["smoke"], tmp_path / "out")[0]
    assert run.matches({"command": run.command, "benchmark": benchmark}, benchmark)
    assert not run.matches({"command": run.command, "benchmark": standard}, benchmark)


def test_design_checks_report_only_what_the_arms_allow():
    checks = {check: (measured, passed) for check, measured, passed in design_checks(_experiment({0: 0, 1: 0, 2: 0}, {0: 0, 1: 0, 2: 0}))}
    assert checks["≥ 6 classes under 1 % of the target pixels"] == ("4", False)
    assert checks["DACS teacher confident fraction > 50 % at the end"][1] is True
    assert not any("oracle" in check for check in checks)  # no oracle arm, no oracle bound


@pytest.mark.parametrize("seeds, passed", [((0, 1, 2), True), ((0,), None)])
def test_gap_check_needs_two_seeds_for_its_standard_error(seeds, passed):
    checks = {check: (measured, ok) for check, measured, ok in design_checks(_experiment(
        {s: 0 for s in seeds}, {s: 0 for s in seeds}, seeds=seeds, bounds=True))}
    measured, ok = checks["DACS closes ≥ 25 % of the gap, beyond 2 std errors"]
    assert ok is passed and measured.startswith("+33.33")
    assert ("one seed" in measured) == (len(seeds) == 1)


def test_a_run_whose_config_changed_since_it_was_made_does_not_match(tmp_path):
    run = next(r for r in plan_runs(PRESETS["demo"], tmp_path) if r.arm.name == "target_oracle")
    benchmark = {"design": 2, "seed": 0}
    made_with = {"command": run.command, "benchmark": benchmark}
    assert run.matches(made_with, benchmark)  # not started yet: nothing saved to compare
    run.output_dir.mkdir(parents=True)
    saved = run.output_dir / "config.yaml"
    saved.write_text(run.config())
    assert run.matches(made_with, benchmark)
    # The run was made when the oracle's config file did not turn the feature distance off.
    before = CfgNode.load_cfg(run.config())
    before.UDA.FD.WEIGHT = 0.005
    saved.write_text(before.dump())
    assert not run.matches(made_with, benchmark)


def test_unknown_preset_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        run_experiment("nope", tmp_path / "out", tmp_path / "datasets")


def test_unknown_arm_is_rejected_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="unknown arm.*nope"):
        run_experiment("smoke", tmp_path / "out", tmp_path / "datasets", arms=["dacs", "nope"])
    assert not (tmp_path / "datasets").exists()


def test_a_run_of_another_benchmark_is_set_aside_and_trained_again(tmp_path):
    datasets = tmp_path / "datasets"
    (datasets / "synthetic").mkdir(parents=True)
    (datasets / "synthetic" / "generation.json").write_text(json.dumps({"design": 3, "seed": 0}))
    run = RunSpec(ARMS["dacs"], 0, tmp_path / "runs" / "dacs" / "seed0", [sys.executable, "-c", "print('trained')"])
    run.output_dir.mkdir(parents=True)
    old_marker = {"command": run.command, "benchmark": {"design": 2, "seed": 0}, "seconds": 5.0}
    (run.output_dir / "experiment_run.json").write_text(json.dumps(old_marker))
    (run.output_dir / "model_final.pth").write_text("weights of the old benchmark")

    train_and_evaluate(run, datasets, threads=1)
    kept = tmp_path / "runs" / "dacs" / "seed0.old1"
    assert json.loads((kept / "experiment_run.json").read_text()) == old_marker
    assert (kept / "model_final.pth").is_file() and not (run.output_dir / "model_final.pth").exists()
    made_with = run.made_with()
    assert made_with["benchmark"] == {"design": 3, "seed": 0} and made_with["seconds"] > 0 and made_with["threads"] == 1
    assert "trained" in (run.output_dir / "train_stdout.log").read_text()
    # Same command and benchmark but not evaluated: trained again in place (resumed), nothing set aside.
    train_and_evaluate(run, datasets, threads=1)
    assert not (tmp_path / "runs" / "dacs" / "seed0.old2").exists()


def _write_finished_run(run: RunSpec, benchmark: dict) -> None:
    """What a finished run of the experiment leaves: marker, saved config, both evaluations, final model."""
    run.output_dir.mkdir(parents=True)
    (run.output_dir / "config.yaml").write_text(run.config())
    for dataset in (VAL_DATASET, SOURCE_VAL_DATASET):
        run.eval_dir(dataset).mkdir(parents=True)
        (run.eval_dir(dataset) / "sem_seg.json").write_text("{}")
    (run.output_dir / "model_final.pth").write_bytes(b"weights of " + run.arm.name.encode())
    marker = {"command": run.command, "benchmark": benchmark, "threads": 1, "seconds": 12.5}
    (run.output_dir / "experiment_run.json").write_text(json.dumps(marker))


def test_a_run_an_earlier_experiment_finished_is_reused_not_trained(tmp_path, monkeypatch):
    datasets, benchmark = tmp_path / "datasets", {"design": 2, "seed": 0}
    (datasets / "synthetic").mkdir(parents=True)
    (datasets / "synthetic" / "generation.json").write_text(json.dumps(benchmark))
    # The earlier experiment ran from tmp_path with a relative output folder; this one has an absolute one.
    monkeypatch.chdir(tmp_path)
    earlier = {run.arm.name: run for run in plan_runs(PRESETS["experiment"], Path("experiment")) if run.seed == 0}
    for name in ("source_only", "dacs", "dacs_gbw"):
        _write_finished_run(earlier[name], benchmark)
    batch = {run.arm.name: run for run in plan_runs(PRESETS["batch"], tmp_path / "batch") if run.seed == 0}
    reuse_from = [tmp_path / "experiment"]

    # At the configs' 2 images per domain the batch arms are DACS and DACS + GBW: the same config but for the
    # folders, started from the same source-only run. Not another batch size, not on another benchmark.
    assert find_same_run(batch["dacs_batch2"], benchmark, reuse_from) == tmp_path / "experiment/runs/dacs/600it_seed0"
    assert find_same_run(batch["dacs_gbw_batch2"], benchmark, reuse_from).parent.name == "dacs_gbw"
    assert find_same_run(batch["dacs_batch4"], benchmark, reuse_from) is None
    assert find_same_run(batch["dacs_batch2"], {"design": 3, "seed": 0}, reuse_from) is None

    for name in ("source_only", "dacs_batch2"):
        assert train_and_evaluate(batch[name], datasets, threads=1, reuse_from=reuse_from) == 0.0
    run = batch["dacs_batch2"]
    assert run.is_done(benchmark)  # found done by the next call, without reuse_from
    assert (run.output_dir / "model_final.pth").samefile(earlier["dacs"].output_dir / "model_final.pth")
    assert run.made_with()["command"] == run.command and run.made_with()["seconds"] == 12.5
    assert run.made_with()["threads"] == 1
    assert run.made_with()["reused_from"] == str((tmp_path / "experiment/runs/dacs/600it_seed0").resolve())

    # A source-only run made with another learning rate: the DACS + GBW run started from it is another run.
    changed = CfgNode.load_cfg(earlier["source_only"].config())
    changed.SOLVER.BASE_LR *= 2
    (earlier["source_only"].output_dir / "config.yaml").write_text(changed.dump())
    assert find_same_run(batch["dacs_gbw_batch2"], benchmark, reuse_from) is None


@pytest.mark.slow
def test_smoke_experiment_writes_the_report_and_skips_finished_runs(tmp_path):
    out, datasets = tmp_path / "out", tmp_path / "datasets"
    report = run_experiment("smoke", out, datasets, jobs=2)
    text = report.read_text()
    for section in ("## Domain gap", "## Semantic segmentation", "## Panoptic segmentation", "## Paired differences",
                    "## Conclusion", "## Benchmark design checks", "## Per-class precision",
                    "## Pseudo-label confidence during training", "## GBW class weights"):
        assert section in text, section
    assert "| DACS + GBW − DACS |" in text and "cannot be judged from one seed" in text
    assert "DACS, DACS + GBW start from the final model of source only of the same seed" in text
    for figure in ("recall_delta.png", "pseudo_confidence.png", "dacs_gbw/gbw_weights.png"):
        assert (out / "figures" / figure).stat().st_size > 1000, figure
    results = json.loads((out / "results.json").read_text())
    assert set(results["runs"]) == {"source_only/seed0", "dacs/seed0", "dacs_gbw/seed0"}
    for name, run in results["runs"].items():
        assert 0.0 <= run["mIoU"] <= 100.0 and 0.0 <= run["source-val mIoU"] <= 100.0
        if name.startswith("dacs"):
            assert 0.0 <= run["confident fraction"] <= 100.0
        else:
            assert run["confident fraction"] is None  # no teacher

    assert "## GBW class weights over training (semantic loss)" in text and "| DACS + GBW |" in text

    # The report alone, from the finished runs: the same report but for the time of this call. The figure tools it
    # runs (plot_training.py, visualize.py, run above) are recorded, not run again. A run that has not finished is
    # named.
    (out / "report.md").unlink()
    tools = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(experiment_report, "_tool", lambda name, *args, datasets_root: tools.append(name))
        again = run_experiment("smoke", out, datasets, report_only=True).read_text()
    assert tools == ["plot_training.py", "visualize.py", "visualize.py"]
    assert [line for line in again.splitlines() if "this call" not in line] == [
        line for line in text.splitlines() if "this call" not in line
    ]
    with pytest.raises(RuntimeError, match="3 run\(s\) not finished: source_only seed 1"):
        run_experiment("smoke", out, datasets, seeds=[0, 1], report_only=True)

    # Run again, every run is found done: nothing is trained again.
    logs = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/train_stdout.log")}
    assert len(logs) == 3
    assert [train_and_evaluate(run, datasets, threads=1) for run in plan_runs(PRESETS["smoke"], out)] == [0.0] * 3
    assert {p: p.stat().st_mtime_ns for p in logs} == logs
