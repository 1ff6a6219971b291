"""Panoptic and semantic evaluators on the synthetic benchmark against independent computations."""
import json
import math
import os
import socket
from collections import OrderedDict
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np
import pytest
import torch
from PIL import Image

NUM_CLASSES = 19
VAL = "synthetic_target_panoptic_val"


def model_outputs(dataset_dicts: List[dict], seed: Optional[int]) -> List[dict]:
    """Outputs in Detectron2's contract derived from the ground truth of each image.

    seed None gives a perfect prediction; otherwise the maps are shifted by a few pixels, some
    classes are swapped and some instances merged, so that the metrics are neither 0 nor 100.
    ``sem_seg`` is C x H x W one-hot scores, ``panoptic_seg`` is (class * 1000 + instance with
    -1 = VOID, None), as Panoptic-DeepLab returns.
    """
    rng = np.random.default_rng(seed)
    outputs = []
    for record in dataset_dicts:
        semantic = np.asarray(Image.open(record["sem_seg_file_name"]), dtype=np.int64)
        pan = np.asarray(Image.open(record["pan_seg_file_name"]).convert("RGB"), dtype=np.int64)
        pan_ids = pan[..., 0] + 256 * pan[..., 1] + 65536 * pan[..., 2]
        panoptic = np.full(semantic.shape, -1, dtype=np.int64)
        for index, segment in enumerate(record["segments_info"]):
            instance = index + 1 if segment["isthing"] else 0
            panoptic[pan_ids == segment["id"]] = segment["category_id"] * 1000 + instance
        if seed is not None:
            shift = tuple(int(v) for v in rng.integers(-3, 4, size=2))
            semantic = np.roll(semantic, shift, axis=(0, 1))
            panoptic = np.roll(panoptic, shift, axis=(0, 1))
            swap_from, swap_to = rng.integers(0, NUM_CLASSES, size=2)
            semantic[semantic == swap_from] = swap_to
            thing_ids = np.unique(panoptic[panoptic >= 11000])
            if len(thing_ids) >= 2:  # merge two instances
                panoptic[panoptic == thing_ids[1]] = thing_ids[0]
        semantic = np.where(semantic == 255, 0, semantic)  # the model predicts a class everywhere
        scores = torch.nn.functional.one_hot(torch.from_numpy(semantic), NUM_CLASSES).permute(2, 0, 1).float()
        outputs.append({"sem_seg": scores, "panoptic_seg": (torch.from_numpy(panoptic).int(), None)})
    return outputs


def expected_semantic(dataset_dicts: List[dict], outputs: List[dict]) -> Dict[str, np.ndarray]:
    """Per-class IoU, recall, precision by direct counting (in percent)."""
    intersection = np.zeros(NUM_CLASSES)
    gt_count = np.zeros(NUM_CLASSES)
    pred_count = np.zeros(NUM_CLASSES)
    correct = total = 0
    for record, output in zip(dataset_dicts, outputs):
        gt = np.asarray(Image.open(record["sem_seg_file_name"]), dtype=np.int64)
        pred = output["sem_seg"].argmax(0).numpy()
        labelled = gt != 255
        correct += int(((gt == pred) & labelled).sum())
        total += int(labelled.sum())
        for c in range(NUM_CLASSES):
            intersection[c] += ((gt == c) & (pred == c)).sum()
            gt_count[c] += (gt == c).sum()
            pred_count[c] += ((pred == c) & labelled).sum()
    with np.errstate(divide="ignore", invalid="ignore"):
        return {
            "IoU": 100 * intersection / (gt_count + pred_count - intersection),
            "recall": 100 * intersection / gt_count,
            "precision": 100 * intersection / pred_count,
            "pACC": 100 * correct / total,
        }


def _evaluate(evaluator, dataset_dicts, outputs):
    evaluator.reset()
    for record, output in zip(dataset_dicts, outputs):
        evaluator.process([record], [output])
    return evaluator.evaluate()


def test_semantic_metrics_equal_direct_counts(synthetic_datasets, tmp_path):
    from detectron2.data import DatasetCatalog, MetadataCatalog

    from gbw_panoptic.evaluation import GBWSemSegEvaluator

    dataset_dicts = DatasetCatalog.get(VAL)
    outputs = model_outputs(dataset_dicts, seed=0)
    results = _evaluate(GBWSemSegEvaluator(VAL, str(tmp_path)), dataset_dicts, outputs)["sem_seg"]
    expected = expected_semantic(dataset_dicts, outputs)
    names = MetadataCatalog.get(VAL).stuff_classes
    for c, name in enumerate(names):
        for metric in ("IoU", "recall", "precision"):
            value = results[f"{metric}-{name}"]
            assert (math.isnan(value) and math.isnan(expected[metric][c])) or value == pytest.approx(expected[metric][c])
    subset16 = MetadataCatalog.get(VAL).evaluation_classes_16
    assert results["mIoU"] == pytest.approx(np.nanmean(expected["IoU"]))
    assert results["mIoU19"] == results["mIoU"]
    assert results["mIoU16"] == pytest.approx(np.nanmean(expected["IoU"][subset16]))
    assert results["mIoU19sum_div16"] == pytest.approx(np.nansum(expected["IoU"]) / 16)
    assert results["mACC"] == pytest.approx(np.nanmean(expected["recall"]))
    assert results["pACC"] == pytest.approx(expected["pACC"])
    assert 0 < results["mIoU"] < 100

    report = json.loads((tmp_path / "sem_seg.json").read_text())
    assert report["summary"]["mIoU16"] == pytest.approx(results["mIoU16"])
    assert [row["name"] for row in report["per_class"]] == list(names)
    assert "mIoU19sum_div16" in (tmp_path / "sem_seg.md").read_text()
    assert (tmp_path / "sem_seg.csv").read_text().splitlines()[0].startswith("class_id,name,IoU,recall")
    matrix = np.load(tmp_path / "sem_seg_confusion_matrix.npy")
    assert matrix.shape == (NUM_CLASSES, NUM_CLASSES) and matrix.sum() > 0


def test_perfect_predictions_score_100(synthetic_datasets, tmp_path):
    from detectron2.data import DatasetCatalog

    from gbw_panoptic.evaluation import GBWPanopticEvaluator, GBWSemSegEvaluator

    dataset_dicts = DatasetCatalog.get(VAL)
    outputs = model_outputs(dataset_dicts, seed=None)
    semantic = _evaluate(GBWSemSegEvaluator(VAL, None), dataset_dicts, outputs)["sem_seg"]
    panoptic = _evaluate(GBWPanopticEvaluator(VAL, str(tmp_path), num_workers=1), dataset_dicts, outputs)["panoptic_seg"]
    assert semantic["mIoU"] == pytest.approx(100) and semantic["pACC"] == pytest.approx(100)
    for key in ("PQ", "SQ", "RQ", "PQ_th", "PQ_st", "mPQ", "mPQ16"):
        assert panoptic[key] == pytest.approx(100), key


def test_panoptic_metrics_equal_panopticapi(synthetic_datasets, tmp_path):
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from panopticapi.evaluation import pq_compute as panopticapi_pq_compute

    from gbw_panoptic.evaluation import GBWPanopticEvaluator

    metadata = MetadataCatalog.get(VAL)
    dataset_dicts = DatasetCatalog.get(VAL)
    outputs = model_outputs(dataset_dicts, seed=1)
    results = _evaluate(GBWPanopticEvaluator(VAL, str(tmp_path), num_workers=2), dataset_dicts, outputs)["panoptic_seg"]

    # panopticapi on the predictions the evaluator wrote, against the dataset's own ground truth.
    reference = panopticapi_pq_compute(
        metadata.panoptic_json,
        str(tmp_path / "panoptic_predictions.json"),
        metadata.panoptic_root,
        str(tmp_path / "panoptic_predictions"),
    )
    for group, suffix in (("All", ""), ("Things", "_th"), ("Stuff", "_st")):
        for metric in ("pq", "sq", "rq"):
            assert results[metric.upper() + suffix] == pytest.approx(100 * reference[group][metric], abs=1e-7)
    assert 0 < results["PQ"] < 100

    contiguous = metadata.stuff_dataset_id_to_contiguous_id
    per_class = np.full(NUM_CLASSES, np.nan)
    for dataset_id, values in reference["per_class"].items():
        if values["pq"] or values["sq"] or values["rq"] or _appears(tmp_path, dataset_id):
            per_class[contiguous[dataset_id]] = 100 * values["pq"]
    assert results["mPQ"] == pytest.approx(np.nanmean(per_class))
    assert results["mPQ16"] == pytest.approx(np.nanmean(per_class[metadata.evaluation_classes_16]))
    assert results["mPQ19sum_div16"] == pytest.approx(np.nansum(per_class) / 16)
    for dataset_id, c in contiguous.items():
        name = metadata.stuff_classes[c]
        assert results[f"PQ-{name}"] == pytest.approx(per_class[c], nan_ok=True)

    report = json.loads((tmp_path / "panoptic_seg.json").read_text())
    assert report["summary"]["PQ"] == pytest.approx(results["PQ"])
    assert {"TP", "FP", "FN"} <= set(report["per_class"][0])
    assert "mPQ19sum_div16" in (tmp_path / "panoptic_seg.md").read_text()


def _appears(tmp_path: Path, dataset_id: int) -> bool:
    """Whether a category has any GT or predicted segment (i.e. counts in panopticapi's means)."""
    for name in ("panoptic_ground_truth.json", "panoptic_predictions.json"):
        annotations = json.loads((tmp_path / name).read_text())["annotations"]
        if any(s["category_id"] == dataset_id for a in annotations for s in a["segments_info"]):
            return True
    return False


def test_build_evaluators_adds_source_subset_and_panoptic(synthetic_datasets, tmp_path):
    from detectron2.config import get_cfg

    from gbw_panoptic.config import add_gbw_panoptic_config
    from gbw_panoptic.evaluation import GBWPanopticEvaluator, GBWSemSegEvaluator, build_evaluators

    cfg = get_cfg()
    add_gbw_panoptic_config(cfg)
    cfg.DATASETS.TRAIN = ("synthetic_source_panoptic_train",)
    evaluators = build_evaluators(cfg, VAL, str(tmp_path))._evaluators
    assert [type(e) for e in evaluators] == [GBWSemSegEvaluator, GBWPanopticEvaluator]
    assert list(evaluators[0]._subsets) == ["19", "16"]
    cfg.MODEL.INS_EMBED_HEAD.ENABLED = False
    assert [type(e) for e in build_evaluators(cfg, VAL, str(tmp_path))._evaluators] == [GBWSemSegEvaluator]


def test_semantic_errors_name_the_file(synthetic_datasets):
    from detectron2.data import DatasetCatalog

    from gbw_panoptic.evaluation import GBWPanopticEvaluator, GBWSemSegEvaluator

    record = DatasetCatalog.get(VAL)[0]
    evaluator = GBWSemSegEvaluator(VAL, None)
    with pytest.raises(ValueError, match=r"prediction for .*leftImg8bit\.png is 10x10 but its labels .*labelTrainIds\.png are 128x256"):
        evaluator.process([record], [{"sem_seg": torch.zeros(NUM_CLASSES, 10, 10)}])
    with pytest.raises(ValueError, match=r"has shape \(3, 128, 256\), expected \(19, H, W\)"):
        evaluator.process([record], [{"sem_seg": torch.zeros(3, 128, 256)}])
    panoptic = GBWPanopticEvaluator(VAL, None)
    with pytest.raises(KeyError, match=r"thing segment with class 3, which is not a thing class"):
        panoptic.process([record], [{"panoptic_seg": (torch.zeros(128, 256), [{"id": 0, "category_id": 3, "isthing": True}])}])


# --- two processes (gloo) give the same numbers as one ---------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _distributed_worker(rank: int, world_size: int, port: int, root: str, output_dir: str) -> None:
    import torch.distributed as dist
    from detectron2.data import DatasetCatalog

    from gbw_panoptic.data.datasets import register_all
    from gbw_panoptic.evaluation import GBWPanopticEvaluator, GBWSemSegEvaluator

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        register_all(root)
        dataset_dicts = DatasetCatalog.get(VAL)
        outputs = model_outputs(dataset_dicts, seed=1)
        results = OrderedDict()
        for evaluator in (GBWSemSegEvaluator(VAL, output_dir), GBWPanopticEvaluator(VAL, output_dir, num_workers=1)):
            results.update(_evaluate(evaluator, dataset_dicts[rank::world_size], outputs[rank::world_size]))
        if rank == 0:
            with open(os.path.join(output_dir, "results.json"), "w") as f:
                json.dump(results, f)
        else:
            assert results == OrderedDict()
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_two_processes_give_the_same_numbers_as_one(synthetic_datasets, tmp_path):
    from detectron2.data import DatasetCatalog

    from gbw_panoptic.evaluation import GBWPanopticEvaluator, GBWSemSegEvaluator

    dataset_dicts = DatasetCatalog.get(VAL)
    outputs = model_outputs(dataset_dicts, seed=1)
    single = OrderedDict()
    for evaluator in (GBWSemSegEvaluator(VAL, str(tmp_path / "one")), GBWPanopticEvaluator(VAL, str(tmp_path / "one"), num_workers=1)):
        single.update(_evaluate(evaluator, dataset_dicts, outputs))

    torch.multiprocessing.spawn(
        _distributed_worker, args=(2, _free_port(), str(synthetic_datasets), str(tmp_path / "two")), nprocs=2
    )
    distributed = json.loads((tmp_path / "two" / "results.json").read_text())
    assert set(distributed) == {"sem_seg", "panoptic_seg"}
    for task, metrics in single.items():
        assert distributed[task].keys() == metrics.keys()
        for key, value in metrics.items():
            assert distributed[task][key] == pytest.approx(value, nan_ok=True), (task, key)
