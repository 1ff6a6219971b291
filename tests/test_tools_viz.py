"""tools/plot_training.py, tools/compare_runs.py and tools/visualize.py on files the tests create."""
import csv
import importlib.util
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from test_evaluation_evaluators import VAL, _evaluate, model_outputs

REPO_ROOT = Path(__file__).resolve().parents[1]
CLASS_NAMES = ["road", "sidewalk", "building", "wall", "fence", "pole", "traffic light", "traffic sign", "vegetation",
               "terrain", "sky", "person", "rider", "car", "truck", "bus", "train", "motorcycle", "bicycle"]


def _tool(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO_ROOT / "tools" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _png_size(path: Path) -> tuple:
    image = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    assert image is not None, path
    return image.shape[:2]


def _write_metrics(path: Path) -> None:
    """A Detectron2 metrics.json (one JSON object per line) as the trainer writes it."""
    rng = np.random.default_rng(0)
    with open(path, "w") as f:
        for iteration in range(19, 200, 20):
            record = {"iteration": iteration, "total_loss": 3.0 / (1 + iteration / 50), "loss_sem_seg": 1.5, "loss_center": 0.2,
                      "loss_offset": 0.1, "lr": 6e-4, "dacs/pseudo_weight": 0.6}
            for domain in ("source", "mixed"):
                for loss in ("sem_seg", "center"):
                    weights = rng.dirichlet(np.ones(19)) * 19
                    record.update({f"gbw/{domain}/{loss}/{name}": float(w) for name, w in zip(CLASS_NAMES, weights)})
            f.write(json.dumps(record) + "\n")
            if iteration % 100 == 99:
                f.write(json.dumps({"iteration": iteration, f"{VAL}/sem_seg/mIoU": iteration / 10, f"{VAL}/sem_seg/mIoU16": 2.0,
                                    f"{VAL}/sem_seg/IoU-road": 50.0, f"{VAL}/panoptic_seg/PQ": iteration / 20}) + "\n")


def test_plot_training_writes_the_three_figures(tmp_path):
    plot_training = _tool("plot_training")
    _write_metrics(tmp_path / "metrics.json")
    records = plot_training.read_metrics(tmp_path)
    gbw = plot_training.collect(records, plot_training.gbw_group)
    assert list(gbw) == ["gbw/source/sem_seg", "gbw/source/center", "gbw/mixed/sem_seg", "gbw/mixed/center"]
    assert list(gbw["gbw/source/sem_seg"]) == CLASS_NAMES
    assert gbw["gbw/mixed/center"]["car"][0] == list(range(19, 200, 20))
    evaluation = plot_training.collect(records, plot_training.eval_group)
    assert {panel: list(lines) for panel, lines in evaluation.items()} == {
        f"{VAL}/sem_seg": ["mIoU", "mIoU16"], f"{VAL}/panoptic_seg": ["PQ"]}
    losses = plot_training.collect(records, plot_training.loss_group)
    assert list(losses["losses"]) == ["total_loss", "loss_sem_seg", "loss_center", "loss_offset"]

    assert plot_training.main([str(tmp_path), "--output-dir", str(tmp_path / "plots")]) == 0
    # figsize (7 per column, 4 per row) inches at 100 dpi
    assert _png_size(tmp_path / "plots" / "losses.png") == (400, 700)
    assert _png_size(tmp_path / "plots" / "gbw_weights.png") == (800, 1400)
    assert _png_size(tmp_path / "plots" / "eval_metrics.png") == (400, 1400)


def test_plot_training_reports_bad_lines(tmp_path):
    plot_training = _tool("plot_training")
    (tmp_path / "metrics.json").write_text('{"iteration": 1, "total_loss": 1.0}\n{"iteration": 2, "total_\n')
    with pytest.raises(ValueError, match=r"metrics\.json, line 2: not a JSON object"):
        plot_training.read_metrics(tmp_path / "metrics.json")
    with pytest.raises(FileNotFoundError, match="expected a Detectron2 metrics.json"):
        plot_training.read_metrics(tmp_path / "missing")


def _evaluation_folder(folder: Path, seed: int) -> None:
    from detectron2.data import DatasetCatalog

    from gbw_panoptic.evaluation import GBWPanopticEvaluator, GBWSemSegEvaluator

    dataset_dicts = DatasetCatalog.get(VAL)
    outputs = model_outputs(dataset_dicts, seed=seed)
    for evaluator in (GBWSemSegEvaluator(VAL, str(folder)), GBWPanopticEvaluator(VAL, str(folder), num_workers=1)):
        _evaluate(evaluator, dataset_dicts, outputs)


def test_compare_runs_table_and_recall_chart(synthetic_datasets, tmp_path):
    compare_runs = _tool("compare_runs")
    run_a, run_b = tmp_path / "run_a", tmp_path / "run_b"
    _evaluation_folder(run_a / "inference" / VAL, seed=1)
    _evaluation_folder(run_b / "inference" / VAL, seed=2)
    assert compare_runs.main([str(run_a), str(run_b), "--output-dir", str(tmp_path / "cmp")]) == 0

    semantic_a = json.loads((run_a / "inference" / VAL / "sem_seg.json").read_text())["per_class"]
    semantic_b = json.loads((run_b / "inference" / VAL / "sem_seg.json").read_text())["per_class"]
    with open(tmp_path / "cmp" / "compare.csv") as f:
        rows = list(csv.DictReader(f))
    assert [row["name"] for row in rows] == CLASS_NAMES
    assert {"PQ A", "PQ B", "PQ B-A", "IoU B-A", "recall B-A", "gt_pixels"} <= set(rows[0])
    for row, a, b in zip(rows, semantic_a, semantic_b):
        if a["recall"] is not None and b["recall"] is not None:
            assert float(row["recall B-A"]) == pytest.approx(b["recall"] - a["recall"])
    assert any(float(row["recall B-A"] or 0) != 0 for row in rows if row["recall B-A"] not in ("", "nan"))
    summary = json.loads((tmp_path / "cmp" / "compare.json").read_text())["summary"]
    assert summary["mIoU B-A"] == pytest.approx(summary["mIoU B"] - summary["mIoU A"])
    assert _png_size(tmp_path / "cmp" / "recall_delta.png") == (400, 950)  # max(6, 0.5 * 19) x 4 inches


def test_visualize_predictions_folder(synthetic_datasets, tmp_path):
    visualize = _tool("visualize")
    run = tmp_path / "run"
    _evaluation_folder(run / "inference" / VAL, seed=1)
    out = tmp_path / "pictures"
    assert visualize.main(["--dataset", VAL, "--predictions", str(run / "inference" / VAL), "--output-dir", str(out)]) == 0
    assert visualize.main(["--dataset", VAL, "--predictions", str(run), "--output-dir", str(tmp_path / "again"), "--max-images", "1"]) == 0
    assert len(list((tmp_path / "again").glob("*.png"))) == 1
    with pytest.raises(FileNotFoundError, match="expects the folder the panoptic evaluator wrote"):
        visualize.main(["--dataset", VAL, "--predictions", str(tmp_path), "--output-dir", str(out)])
    pictures = sorted(out.glob("*.png"))
    assert len(pictures) == 6
    for picture in pictures:
        assert _png_size(picture) == (visualize.TITLE_HEIGHT + 128, 3 * 256)
        image = cv2.imread(str(picture))
        input_panel = image[visualize.TITLE_HEIGHT:, :256]
        prediction_panel = image[visualize.TITLE_HEIGHT:, 512:]
        assert input_panel.std() > 5 and np.abs(prediction_panel.astype(int) - input_panel).mean() > 5


def test_offset_panel_colours_directions():
    visualize = _tool("visualize")
    offset = np.zeros((2, 4, 4), dtype=np.float32)
    offset[1, :, :2] = 3.0  # pointing right
    offset[1, :, 2:] = -3.0  # pointing left
    picture = visualize.offset_panel(offset)
    assert picture.shape == (4, 4, 3)
    assert not np.array_equal(picture[0, 0], picture[0, 3])
    assert picture[0, 0].max() == 255  # full length = full brightness


@pytest.mark.slow
@pytest.mark.parametrize(
    "config, panels",
    [("mit_b0_source_only_gbw.yaml", 5), ("semantic_mit_b0_source_only_gbw.yaml", 3), ("maskrcnn_dacs.yaml", 4)],
)
def test_visualize_model_checkpoint(synthetic_datasets, tmp_path, config, panels):
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    visualize = _tool("visualize")
    config_file = str(REPO_ROOT / "configs" / "synthetic" / config)
    cfg = visualize.load_config(config_file, ["MODEL.WEIGHTS", "unused.pth"])
    DetectionCheckpointer(build_model(cfg), save_dir=str(tmp_path)).save("model")
    out = tmp_path / "pictures"
    argv = ["--dataset", VAL, "--output-dir", str(out), "--max-images", "2", "--config-file", config_file,
            "MODEL.WEIGHTS", str(tmp_path / "model.pth")]
    assert visualize.main(argv) == 0
    pictures = sorted(out.glob("*.png"))
    assert len(pictures) == 2
    assert _png_size(pictures[0]) == (visualize.TITLE_HEIGHT + 128, panels * 256)


def test_visualize_hrda_draws_the_sliding_window_prediction_of_evaluation(synthetic_datasets, tmp_path):
    """HRDA evaluates on sliding TEST_WINDOW_SIZE windows; the pictures must show that prediction, not the
    single-pass predict_dense (which differs on these 128x256 images: two 128x128 windows per row)."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.data import MetadataCatalog
    from detectron2.modeling import build_model

    from gbw_panoptic.data import build_test_loader
    from gbw_panoptic.data.image_io import read_image
    from gbw_panoptic.modeling import load_inference_model
    from gbw_panoptic.utils.visualization import draw_panoptic

    visualize = _tool("visualize")
    config_file = str(REPO_ROOT / "configs" / "synthetic" / "hrda_panoptic_dacs_gbw.yaml")
    small = ["MODEL.SEM_SEG_HEAD.EMBED_DIM", 16, "MODEL.INS_EMBED_HEAD.EMBED_DIM", 16, "MODEL.HRDA.ATTENTION_EMBED_DIM", 16]
    cfg = visualize.load_config(config_file, [*small, "MODEL.WEIGHTS", str(tmp_path / "model.pth")])
    torch.manual_seed(0)
    DetectionCheckpointer(build_model(cfg), save_dir=str(tmp_path)).save("model")
    metadata = MetadataCatalog.get(VAL)
    record, panels = next(visualize.model_panels(cfg, VAL, metadata, dense=True))

    model = load_inference_model(cfg)
    batch = next(iter(build_test_loader(cfg, VAL)))
    assert batch[0]["file_name"] == record["file_name"]
    with torch.no_grad():
        evaluated = model(batch)[0]
        images = model.preprocess_image(batch)
        single_pass = model.postprocess(model.predict_dense(images.tensor), batch, images.image_sizes)[0]
    assert not torch.allclose(evaluated["sem_seg"], single_pass["sem_seg"])
    image = read_image(record["file_name"], format="RGB")
    png, segments_info = evaluated["panoptic_seg"]
    assert [title for title, _ in panels][:3] == ["input", "ground truth", "prediction"]
    np.testing.assert_array_equal(panels[2][1], draw_panoptic(image, png.numpy(), segments_info, metadata))
