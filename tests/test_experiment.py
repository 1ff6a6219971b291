"""The synthetic-benchmark experiment (`make demo` / `make experiment`), shortened: the smoke preset
trains each arm for 2 iterations on a tiny generated benchmark and writes the full report."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from experiment import run_experiment  # noqa: E402
from experiment.runs import ARMS, PRESETS, plan_runs  # noqa: E402


def test_presets_name_existing_configs(tmp_path):
    for name, preset in PRESETS.items():
        runs = plan_runs(preset, tmp_path)
        assert len(runs) == len(preset.arms) * len(preset.seeds), name
        for run in runs:
            assert run.arm.baseline is None or run.arm.baseline in ARMS
            assert "--resume" in run.command and str(run.output_dir) in run.command


def test_unknown_preset_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="unknown preset 'nope'"):
        run_experiment("nope", tmp_path / "out", tmp_path / "datasets")


@pytest.mark.slow
def test_smoke_experiment_writes_full_report_and_skips_finished_runs(tmp_path):
    out, datasets = tmp_path / "out", tmp_path / "datasets"
    report = run_experiment("smoke", out, datasets, jobs=2)
    text = report.read_text()
    for label in ("source only", "DACS", "DACS + GBW"):
        assert f"| {label} |" in text
    assert "DACS + GBW vs DACS" in text and "recall (rare)" in text
    for figure in ("recall_delta.png", "dacs_gbw/gbw_weights.png"):
        assert (out / "figures" / figure).stat().st_size > 1000
    assert list((out / "figures" / "predictions_dacs_gbw").glob("*.png"))
    results = json.loads((out / "results.json").read_text())
    assert set(results["runs"]) == {"source_only/seed0", "dacs/seed0", "dacs_gbw/seed0"}
    assert all(0.0 <= run["mIoU"] <= 100.0 for run in results["runs"].values())

    # A second call finds every run done: nothing is trained again.
    logs = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/train_stdout.log")}
    run_experiment("smoke", out, datasets, jobs=2)
    assert {p: p.stat().st_mtime_ns for p in logs} == logs


def test_unknown_arm_is_rejected_before_any_work(tmp_path):
    with pytest.raises(ValueError, match="unknown arm.*nope"):
        run_experiment("smoke", tmp_path / "out", tmp_path / "datasets", arms=["dacs", "nope"])
    assert not (tmp_path / "datasets").exists()
