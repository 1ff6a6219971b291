#!/usr/bin/env python
"""Side-by-side pictures of panoptic predictions: input | ground truth | prediction [| center | offset]
[| detections].

Two sources of predictions:

- ``--predictions DIR``: the ``panoptic_predictions.json`` + ``panoptic_predictions/`` that the
  panoptic evaluator wrote (``OUTPUT_DIR/inference/<dataset>``);
- ``--config-file CFG MODEL.WEIGHTS CKPT``: runs the model on the dataset as evaluation does (HRDA: the
  sliding test windows), and also draws the center heatmap and the offset field (hue = direction,
  brightness = length) of the bottom-up instance head, or the top-down model's Mask R-CNN detections
  with their scores (those below the panoptic fusion's score threshold included). A semantic-only model
  gets semantic ground truth and prediction panels instead.

Segments are drawn by Detectron2's ``Visualizer`` with the dataset's class names and colours.
One PNG per image is written to ``--output-dir``.

Examples:
    python tools/visualize.py --dataset cityscapes_panoptic_val --predictions output/run/inference/cityscapes_panoptic_val
    python tools/visualize.py --dataset synthetic_target_panoptic_val \\
        --config-file configs/synthetic/dacs_gbw.yaml MODEL.WEIGHTS output/run/model_final.pth MODEL.DEVICE cpu
"""
import argparse
import itertools
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple

import cv2
import numpy as np
import torch
from tqdm import tqdm

from gbw_panoptic.utils.visualization import draw_detections, draw_panoptic, draw_semantic

logger = logging.getLogger("visualize")

TITLE_HEIGHT = 24  # pixels of the title strip above each panel

Panels = List[Tuple[str, np.ndarray]]


def titled(title: str, image: np.ndarray) -> np.ndarray:
    """``image`` (RGB uint8 HxWx3) with a black title strip of TITLE_HEIGHT pixels on top."""
    strip = np.zeros((TITLE_HEIGHT, image.shape[1], 3), dtype=np.uint8)
    cv2.putText(strip, title, (4, TITLE_HEIGHT - 7), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1, cv2.LINE_AA)
    return np.concatenate([strip, image], axis=0)


def compose(panels: Panels) -> np.ndarray:
    """Panels side by side, each under its title: (TITLE_HEIGHT + H) x (n W) x 3 RGB."""
    return np.concatenate([titled(title, image) for title, image in panels], axis=1)


def center_panel(image: np.ndarray, center: np.ndarray) -> np.ndarray:
    """Center heatmap (HxW, ~[0, 1]) as a JET colour map blended with ``image``."""
    heat = cv2.applyColorMap((255 * np.clip(center, 0, 1)).astype(np.uint8), cv2.COLORMAP_JET)[..., ::-1]
    return (0.4 * image + 0.6 * heat).astype(np.uint8)


def offset_panel(offset: np.ndarray) -> np.ndarray:
    """Offset field (2xHxW, dy, dx in pixels): hue = direction, brightness = length / max length."""
    dy, dx = offset
    length = np.hypot(dx, dy)
    hsv = np.zeros(dx.shape + (3,), dtype=np.uint8)
    hsv[..., 0] = ((np.arctan2(dy, dx) + np.pi) / (2 * np.pi) * 179).astype(np.uint8)
    hsv[..., 1] = 255
    hsv[..., 2] = (255 * length / max(float(length.max()), 1e-6)).astype(np.uint8)
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB)


def ground_truth_panel(record: Dict[str, Any], image: np.ndarray, metadata: Any) -> np.ndarray:
    """The dataset's panoptic ground truth of ``record`` (VOID not drawn)."""
    from gbw_panoptic.evaluation.panoptic_io import read_panoptic_png

    return draw_panoptic(image, read_panoptic_png(record["pan_seg_file_name"]).astype(np.int64), record["segments_info"], metadata)


def contiguous_segments(segments_info: List[Dict[str, Any]], metadata: Any) -> List[Dict[str, Any]]:
    """COCO segments (dataset ``category_id``) with contiguous ``category_id`` and ``isthing``."""
    things = metadata.thing_dataset_id_to_contiguous_id
    stuff = metadata.stuff_dataset_id_to_contiguous_id
    converted = []
    for segment in segments_info:
        category = segment["category_id"]
        if category not in things and category not in stuff:
            raise KeyError(f"segment {segment['id']} has category_id {category}, not a category of the dataset")
        isthing = category in things
        converted.append({"id": segment["id"], "category_id": (things if isthing else stuff)[category], "isthing": isthing})
    return converted


def predictions_folder_panels(folder: Path, dataset_name: str, dataset_dicts: List[Dict[str, Any]], metadata: Any) -> Iterator[Tuple[Dict[str, Any], Panels]]:
    """Panels of the images that have a prediction in ``folder`` (written by GBWPanopticEvaluator).

    Raises ValueError naming the prediction PNG when its size differs from its image's."""
    from gbw_panoptic.data.image_io import read_image
    from gbw_panoptic.evaluation.panoptic_io import read_panoptic_png

    candidates = [folder, folder / "inference" / dataset_name]  # evaluation folder or run folder
    found = [candidate for candidate in candidates if (candidate / "panoptic_predictions.json").is_file()]
    if not found:
        raise FileNotFoundError(
            f"no panoptic_predictions.json in {' or '.join(str(c) for c in candidates)}: --predictions expects "
            f"the folder the panoptic evaluator wrote (OUTPUT_DIR/inference/<dataset>) or the run folder"
        )
    folder = found[0]
    json_file = folder / "panoptic_predictions.json"
    predictions = {annotation["image_id"]: annotation for annotation in json.loads(json_file.read_text())["annotations"]}
    for record in dataset_dicts:
        annotation = predictions.get(record["image_id"])
        if annotation is None:
            continue
        image = read_image(record["file_name"], format="RGB")
        prediction_file = folder / "panoptic_predictions" / annotation["file_name"]
        panoptic = read_panoptic_png(prediction_file).astype(np.int64)
        if panoptic.shape != image.shape[:2]:
            raise ValueError(
                f"prediction PNG {prediction_file} is {panoptic.shape[0]}x{panoptic.shape[1]} (HxW) but its image "
                f"{record['file_name']} is {image.shape[0]}x{image.shape[1]}; predictions must be at the image size"
            )
        yield record, [
            ("input", image),
            ("ground truth", ground_truth_panel(record, image, metadata)),
            ("prediction", draw_panoptic(image, panoptic, contiguous_segments(annotation["segments_info"], metadata), metadata)),
        ]


def model_panels(cfg: Any, dataset_name: str, metadata: Any, dense: bool) -> Iterator[Tuple[Dict[str, Any], Panels]]:
    """Panels of every image of ``dataset_name`` predicted by the model of ``cfg`` (``MODEL.WEIGHTS``) as
    evaluation predicts them (HRDA: the sliding test windows)."""
    from gbw_panoptic.data import build_test_loader
    from gbw_panoptic.data.image_io import read_image
    from gbw_panoptic.modeling import inference_dense_predictions, load_inference_model

    model = load_inference_model(cfg)
    dense = dense and "center" in model.dense_outputs  # the bottom-up instance head's center and offset
    for batch in build_test_loader(cfg, dataset_name):
        with torch.no_grad():
            if dense:
                images = model.preprocess_image(batch)
                predictions = inference_dense_predictions(model, images.tensor)
                outputs = model.postprocess(predictions, batch, images.image_sizes)
            else:
                outputs = model(batch)
        for index, (record, output) in enumerate(zip(batch, outputs)):
            image = read_image(record["file_name"], format="RGB")
            height, width = image.shape[:2]
            if "panoptic_seg" not in output:  # semantic-only model
                labels = read_image(record["sem_seg_file_name"]).astype(np.int64)
                prediction = output["sem_seg"].argmax(0).to("cpu").numpy()
                yield record, [
                    ("input", image),
                    ("ground truth", draw_semantic(image, labels, metadata)),
                    ("prediction", draw_semantic(image, prediction, metadata)),
                ]
                continue
            png, segments_info = output["panoptic_seg"]
            panels = [
                ("input", image),
                ("ground truth", ground_truth_panel(record, image, metadata)),
                ("prediction", draw_panoptic(image, png.to("cpu").numpy(), segments_info, metadata)),
            ]
            if cfg.MODEL.MASK_ON:  # the top-down model's Mask R-CNN detections, with their scores
                panels.append(("detections", draw_detections(image, output["instances"], metadata)))
            if dense:
                resized = model.resize_to_output(
                    {name: value[index] for name, value in predictions.items()}, images.image_sizes[index], height, width
                )
                panels.append(("center heatmap", center_panel(image, resized["center"][0].to("cpu").numpy())))
                panels.append(("offset field", offset_panel(resized["offset"].to("cpu").numpy())))
            yield record, panels


def load_config(config_file: str, opts: List[str]) -> Any:
    """The config of ``config_file`` with the ``KEY VALUE`` overrides ``opts``, as training merges it."""
    import gbw_panoptic.modeling  # noqa: F401  (registers the meta-architecture, backbones and heads)
    from gbw_panoptic.uda.cli import merged_config

    cfg = merged_config(argparse.Namespace(config_file=config_file, opts=opts))
    cfg.freeze()
    return cfg


def main(argv: Optional[List[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dataset", required=True, help="registered dataset name, e.g. cityscapes_panoptic_val")
    parser.add_argument("--datasets-root", default=None, help="root of the datasets (default: $DETECTRON2_DATASETS or ./datasets)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--predictions", type=Path, help="folder written by the panoptic evaluator (panoptic_predictions.json) or the run folder holding it under inference/<dataset>")
    source.add_argument("--config-file", help="model config; give the checkpoint as MODEL.WEIGHTS in the overrides")
    parser.add_argument("--output-dir", type=Path, default=Path("visualizations"), help="where to write the PNGs")
    parser.add_argument("--max-images", type=int, default=None, help="draw at most this many images")
    parser.add_argument("--no-dense", action="store_true", help="leave out the center heatmap and offset field panels (bottom-up models; the top-down model has a detections panel instead)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ... (with --config-file)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from detectron2.data import DatasetCatalog, MetadataCatalog

    from gbw_panoptic.data.datasets import register_all
    from gbw_panoptic.evaluation.panoptic_io import write_png

    if args.datasets_root:
        register_all(args.datasets_root)
    if args.dataset not in DatasetCatalog.list():
        parser.error(f"dataset {args.dataset!r} is not registered (is --datasets-root right?)")
    metadata = MetadataCatalog.get(args.dataset)
    if args.predictions is not None:
        pictures = predictions_folder_panels(args.predictions, args.dataset, DatasetCatalog.get(args.dataset), metadata)
    else:
        pictures = model_panels(load_config(args.config_file, args.opts), args.dataset, metadata, dense=not args.no_dense)

    args.output_dir.mkdir(parents=True, exist_ok=True)
    written = 0
    for record, panels in tqdm(itertools.islice(pictures, args.max_images), desc="visualize", unit="img"):
        path = args.output_dir / f"{os.path.splitext(os.path.basename(record['file_name']))[0]}.png"
        write_png(path, compose(panels))
        written += 1
    logger.info("wrote %d pictures to %s", written, args.output_dir)
    if written == 0:
        logger.error("no image of %s had a prediction", args.dataset)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
