"""The gradient-difficulty analysis of the experiment report (tools/experiment/gradient.py) on constructed
``metrics.json`` files, and the GBW cross-entropy's class statistics it reads."""
import json
import sys
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
from experiment.gradient import HORIZON, WINDOW, class_series, correlations, difficulty_pairs  # noqa: E402
from experiment.report import ExperimentResults, gradient_section  # noqa: E402
from experiment.runs import ARMS, PRESETS, RunSpec  # noqa: E402

from gbw_panoptic.gbw import GBWCrossEntropyLoss  # noqa: E402
from gbw_panoptic.gbw.grad_norms import ce_grad_sq_norms  # noqa: E402


def _write_metrics(
    run_dir: Path, classes: "OrderedDict[str, dict]", steps: int, call: str = "source/sem_seg", every: int = 1
) -> None:
    """metrics.json with the GBW statistics of ``classes`` ({name: {"sq_norm", "ce", "pixels": [steps]}}),
    written every ``every`` steps."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / "metrics.json", "w") as f:
        for t in range(0, steps, every):
            record = {"iteration": t, "total_loss": 1.0}
            for name, values in classes.items():
                for statistic in ("sq_norm", "ce", "pixels"):
                    record[f"gbw_stats/{call}/{name}/{statistic}"] = float(values[statistic][t])
            f.write(json.dumps(record) + "\n")


def _learned_class(rng: np.random.Generator, steps: int, present: float = 1.0) -> dict:
    """A class whose loss falls at each step by an amount proportional to a slowly varying g²."""
    sq_norm = np.exp(np.convolve(rng.normal(size=steps + 40), np.ones(40) / 40 * 6, mode="valid")[:steps])
    ce = 5.0 - 0.01 * np.cumsum(sq_norm) + 0.02 * rng.normal(size=steps)
    pixels = np.where(rng.random(steps) < present, 100.0, 0.0)
    return {"sq_norm": sq_norm, "ce": ce, "pixels": pixels}


def test_a_gradient_that_drives_the_loss_down_correlates_with_the_decrease(tmp_path):
    rng = np.random.default_rng(0)
    steps = 600
    _write_metrics(tmp_path, OrderedDict(rider=_learned_class(rng, steps, present=0.6)), steps)
    series = class_series(tmp_path)["source/sem_seg"]
    assert list(series) == ["rider"]
    # Steps without the class carry no statistic.
    assert np.isnan(series["rider"].sq_norm[series["rider"].pixels == 0]).all()
    sq_norm, decrease, level = difficulty_pairs(series["rider"])
    present = int((series["rider"].pixels > 0).sum())
    assert 0 < sq_norm.size < present  # the first W and last K steps have no complete windows
    result = correlations(series)
    assert result.per_class["rider"] > 0.5
    assert result.pooled_sq_norm > 0.5


def test_batch_noise_shared_by_the_gradient_and_the_loss_of_a_step_gives_no_correlation(tmp_path):
    """A batch with a high loss has a high g² in the same step; the loss windows leave step t out, so noise
    common to both at t must not show up as 'the gradient predicts the decrease'."""
    rng = np.random.default_rng(1)
    steps = 600
    noise = rng.exponential(size=steps)
    flat = {"sq_norm": noise, "ce": 2.0 + noise, "pixels": np.full(steps, 50.0)}
    _write_metrics(tmp_path, OrderedDict(pole=flat), steps)
    result = correlations(class_series(tmp_path)["source/sem_seg"])
    assert abs(result.per_class["pole"]) < 0.15
    # Had step t entered the first window, D(t) would contain noise(t) / W: check the pairs' windows.
    sq_norm, decrease, level = difficulty_pairs(class_series(tmp_path)["source/sem_seg"]["pole"])
    t = np.arange(WINDOW, steps - HORIZON + 1)
    expected = np.array([noise[s - WINDOW:s].mean() - noise[s + HORIZON - WINDOW:s + HORIZON].mean() for s in t])
    np.testing.assert_allclose(decrease, expected)
    np.testing.assert_allclose(sq_norm, noise[t])


def test_the_partial_correlation_removes_what_the_loss_level_explains(tmp_path):
    """Losses that relax towards a floor, with random upward kicks: the higher the loss, the larger its
    fall. A g² that is only a function of the loss predicts the fall through the level alone, so the
    partial correlation given the level is much weaker than the plain one."""
    rng = np.random.default_rng(0)
    steps = 600
    classes = OrderedDict()
    for index, name in enumerate(("car", "bus", "train", "truck")):
        ce = np.empty(steps)
        ce[0] = 2.0 + index
        for t in range(steps - 1):
            kick = rng.exponential(2.0) if rng.random() < 0.03 else 0.0
            ce[t + 1] = ce[t] - 0.03 * (ce[t] - 1.0) + kick
        classes[name] = {"sq_norm": ce ** 2, "ce": ce + 0.05 * rng.normal(size=steps), "pixels": np.full(steps, 10.0)}
    _write_metrics(tmp_path, classes, steps)
    result = correlations(class_series(tmp_path)["source/sem_seg"])
    assert result.pairs > 0
    assert result.pooled_level > result.pooled_sq_norm > 0.3
    assert abs(result.pooled_partial) < 0.5 * result.pooled_sq_norm


def test_the_report_section_covers_only_runs_logged_every_step(tmp_path):
    rng = np.random.default_rng(3)
    steps, seeds = 120, (0, 1, 2)
    preset = PRESETS["smoke"].__class__(arms=("dacs_gbw", "dacs_gbw_every_step"), seeds=seeds, max_iter=steps)
    run_of = {}
    for seed in seeds:
        for arm in preset.arms:
            run_dir = tmp_path / arm / str(seed)
            run_of[(arm, seed)] = RunSpec(ARMS[arm], seed, run_dir)
            classes = OrderedDict((name, _learned_class(rng, steps)) for name in ("road", "rider"))
            # dacs_gbw logs every UDA.LOG_PERIOD = 20 steps, as in the other studies.
            _write_metrics(run_dir, classes, steps, every=20 if arm == "dacs_gbw" else 1)
    fractions = np.array([0.6, 0.004])
    experiment = ExperimentResults(
        "gradient", preset, [ARMS[name] for name in preset.arms], run_of, {}, {}, {}, ["road", "rider"], fractions,
        fractions < 0.01, fractions >= 0.01,
    )
    lines = gradient_section(experiment, tmp_path / "figures")
    text = "\n".join(lines)
    assert text.count("## Gradient and difficulty") == 1
    assert ARMS["dacs_gbw_every_step"].label in text
    assert (tmp_path / "figures" / "gradient_difficulty_dacs_gbw_every_step.png").stat().st_size > 1000
    # Per class, from the steps of each of the three seeds: a positive correlation with an interval.
    rider = next(line for line in text.splitlines() if line.startswith("| rider")).split("|")
    mean, interval = rider[3].split("[")
    low, high = (float(bound) for bound in interval.strip(" ]").split(","))
    assert 0 < low <= float(mean) <= high


def test_gbw_cross_entropy_keeps_the_class_statistics_its_weights_come_from():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 6, 5)
    labels = torch.randint(0, 3, (2, 6, 5))  # class 3 absent
    labels[0, 0, :3] = 255
    loss = GBWCrossEntropyLoss(4, lam=0.5, lam_mode="relative")
    loss(logits, labels)
    statistics = loss.last_class_statistics
    torch.testing.assert_close(statistics["sq_norm"], ce_grad_sq_norms(logits, labels))
    pixels = torch.stack([(labels == c).sum() for c in range(4)]).float()
    torch.testing.assert_close(statistics["pixels"], pixels)
    pixel_losses = F.cross_entropy(logits, labels, ignore_index=255, reduction="none")
    expected = torch.stack([pixel_losses[labels == c].mean() if pixels[c] else torch.tensor(0.0) for c in range(4)])
    torch.testing.assert_close(statistics["ce"], expected)
    # Off: no statistics.
    off = GBWCrossEntropyLoss(4, enabled=False)
    off(logits, labels)
    assert off.last_class_statistics is None
