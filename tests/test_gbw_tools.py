"""Command-line tools of the GBW core: tools/bench_gbw.py and tools/plot_gbw_lambda.py run end to end."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / script), *args],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.slow
def test_bench_gbw_writes_table_and_json(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    stdout = _run("bench_gbw.py", "--shapes", "2x19x32x48", "--repeats", "2", "--warmup", "0", "--out", str(out))
    assert "ratio reference / gbw weights" in stdout
    report = json.loads(out.read_text())
    (result,) = report["results"]
    assert all(t["min_ms"] <= t["median_ms"] <= t["max_ms"] for t in result["timings"].values())
    assert result["max_weight_difference_reference_vs_gbw"] < 1e-3  # cvxopt at the authors' tolerances
    assert result["ratios"]["gbw_ce_over_plain_ce"] > 0 and result["cpu_time_ratios"]["gbw_ce_over_plain_ce"] > 0


def test_bench_gbw_rejects_bad_shape(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "tools" / "bench_gbw.py"), "--shapes", "2x19x32", "--out", str(tmp_path / "b.json")],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0 and "expected a shape BxCxHxW" in result.stderr


@pytest.mark.slow
def test_plot_gbw_lambda_writes_png_and_scale_invariant_summary(tmp_path: Path) -> None:
    out = tmp_path / "weights.png"
    _run("plot_gbw_lambda.py", "--size", "64", "64", "--sizes", "32", "64", "--out", str(out))
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads(out.with_suffix(".json").read_text())["sizes"]
    small, large = summary["32x32"], summary["64x64"]
    # Upsampling the scene x2 quadruples N_c: g^2 shrinks ~4x, the relative weights do not move.
    for g_small, g_large in zip(small["sq_norms"], large["sq_norms"]):
        assert g_large == pytest.approx(g_small / 4, rel=0.1)
    assert large["weights_relative_lambda_1"] == pytest.approx(small["weights_relative_lambda_1"], abs=0.05)


@pytest.mark.slow
def test_bench_train_step_writes_table_and_json(tmp_path: Path) -> None:
    out = tmp_path / "step.json"
    stdout = _run(
        "bench_train_step.py", "--repeats", "2", "--warmup", "0", "--batches", "1", "--out", str(out),
        "SOLVER.IMS_PER_BATCH", "1", "DATASETS.TARGET_IMS_PER_BATCH", "1",
    )
    assert "ratio of medians (GBW / without)" in stdout
    report = json.loads(out.read_text())
    assert all(len(seconds) == 2 for seconds in report["seconds"].values())
    assert report["ratios"]["wall_ratio_of_medians"] > 0 and report["ratios"]["cpu_ratio_of_medians"] > 0


@pytest.mark.slow
def test_measure_gbw_instance_losses_offsets_depend_on_counts_only(tmp_path: Path) -> None:
    out = tmp_path / "instance.json"
    stdout = _run("measure_gbw_instance_losses.py", "--images", "4", "--out", str(out))
    assert "center target on stuff pixels" in stdout
    report = json.loads(out.read_text())
    assert len(report["batches"]) == 2
    for batch in report["batches"]:
        assert batch["offset_norms_prediction_dependence"] == 0.0
        assert batch["offset_norms_vs_counts_max_relative_error"] < 1e-3
        assert 0.0 < batch["center_mass_on_stuff"] < 1.0
        for grouping in ("semantic", "instance"):
            assert sum(batch["center_weights"][grouping]["relative"]) == pytest.approx(19, rel=1e-6)


def test_measure_gbw_lambda_scale_shows_absolute_lambda_barely_moves_the_weights(synthetic_datasets, monkeypatch):
    """The tool's measurement on a synthetic GBW config (128×128 crops): with the absolute λ = 1 the weights
    stay within a percent of 1, with relative λ = 1 they move by more than 5 %; the offset loss counts only
    the thing classes of its simplex (its stuff classes have weight 0 by construction)."""
    monkeypatch.syspath_prepend(str(REPO_ROOT / "tools"))
    from measure_gbw_lambda_scale import measure

    result = measure("configs/synthetic/dacs_gbw_absolute.yaml", batches=1, device="cpu")
    assert result["crop"] == [128, 128] and set(result["configured_lambda"]) == {"sem_seg", "center", "offset"}
    for loss in ("sem_seg", "center", "offset"):
        assert result["configured_lambda"][loss] == {"lambda": 1.0, "mode": "absolute"}
        assert result["max_abs_deviation"]["as configured"][loss] < 0.01, loss
        assert result["max_abs_deviation"]["relative λ = 1"][loss] > 0.05, loss
    assert result["last_weights"]["as configured"]["offset"][0] == 0.0  # road: outside the offset simplex
