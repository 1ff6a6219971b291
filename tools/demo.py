#!/usr/bin/env python
"""Panoptic and semantic pictures of a trained model's predictions on your own images or a video.

The model predicts exactly as in evaluation: the config's test-time resize (``INPUT.BASE_SIZE``), the
model's inference forward (HRDA: the sliding ``MODEL.HRDA.TEST_WINDOW_SIZE`` windows), the outputs
resized back to the image. Segments are drawn by Detectron2's ``Visualizer`` with the class names and
colours of the config's dataset (the first registered one of ``DATASETS.TEST``, ``DATASETS.TRAIN``).

For every input image ``NAME.EXT``, ``--output`` receives ``NAME_panoptic.png`` (models with an
instance decoder), ``NAME_semantic.png`` and, for the top-down model (Mask R-CNN decoder,
``MODEL.MASK_ON``), ``NAME_detections.png``: every detection with its class and score, those below the
panoptic fusion's ``MODEL.TOP_DOWN.MASK_SCORE_THRESHOLD`` included; for ``--video-input NAME.EXT``,
``NAME_panoptic.mp4``, ``NAME_semantic.mp4`` (and ``NAME_detections.mp4``). Files that cannot be read are reported and skipped (exit status 1).

Examples:
    python tools/demo.py --config-file configs/synthia2cityscapes/mit_b5_gbw.yaml \\
        --input photos/ 'street/*.jpg' one.png --output pictures/ \\
        --opts MODEL.WEIGHTS output/synthia2cityscapes/mit_b5_gbw/model_final.pth
    python tools/demo.py --config-file configs/synthetic/dacs_gbw.yaml --video-input drive.mp4 \\
        --output pictures/ --opts MODEL.WEIGHTS output/run/model_final.pth MODEL.DEVICE cpu
"""
import argparse
import contextlib
import glob
import logging
import os
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import cv2
import numpy as np
import torch
from tqdm import tqdm

from gbw_panoptic.utils.visualization import draw_detections, draw_panoptic, draw_semantic

logger = logging.getLogger("demo")

#: Extensions of the files taken from a folder given to ``--input`` (globs and file names take any file).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm")
#: Frame rate of the output video when the input's is unknown.
DEFAULT_FPS = 30.0


def expand_inputs(patterns: Sequence[str]) -> List[Path]:
    """The files named by ``patterns``: a folder gives its images (:data:`IMAGE_EXTENSIONS`, sorted, not
    recursive), a glob (``*``, ``?``, ``[``; ``**`` recursive) the files it matches (sorted), anything else
    is a file name. Each file once, in the order given.

    Raises:
        FileNotFoundError: a pattern names a missing file, or a folder or glob holds no matching file;
            the message names the pattern.
    """
    files: List[Path] = []
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        if os.path.isdir(expanded):
            matched = sorted(p for p in Path(expanded).iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
            what = f"no image file ({', '.join(IMAGE_EXTENSIONS)}) in folder {pattern}"
        elif glob.has_magic(expanded):
            matched = sorted(Path(p) for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
            what = f"no file matches --input {pattern!r}"
        else:
            matched = [Path(expanded)] if os.path.isfile(expanded) else []
            what = f"--input {pattern}: no such file or folder"
        if not matched:
            raise FileNotFoundError(what)
        files.extend(matched)
    return list(dict.fromkeys(files))


def check_unique_names(files: Sequence[Path]) -> None:
    """Raise ValueError naming the files whose pictures would overwrite each other (same file stem)."""
    counts = Counter(path.stem for path in files)
    clashes = [str(path) for path in files if counts[path.stem] > 1]
    if clashes:
        raise ValueError(
            f"these inputs share a file name, so their pictures would overwrite each other: {', '.join(clashes)}; "
            "run them with separate --output folders"
        )


def dataset_metadata(cfg: Any) -> Any:
    """The ``MetadataCatalog`` entry of the first registered dataset of DATASETS.TEST, DATASETS.TRAIN (the
    one the model takes its classes from)."""
    from detectron2.data import MetadataCatalog

    import gbw_panoptic.data  # noqa: F401  (registers the builtin datasets)

    names = [name for name in (*cfg.DATASETS.TEST, *cfg.DATASETS.TRAIN) if name in MetadataCatalog.list()]
    if not names:
        raise ValueError(
            f"none of DATASETS.TEST {tuple(cfg.DATASETS.TEST)} and DATASETS.TRAIN {tuple(cfg.DATASETS.TRAIN)} is a "
            "registered dataset; the pictures need its class names and colours"
        )
    return MetadataCatalog.get(names[0])


class Predictor:
    """The model of ``cfg`` with ``MODEL.WEIGHTS`` loaded, predicting one RGB image as evaluation does."""

    def __init__(self, cfg: Any):
        from detectron2.data import transforms as T

        from gbw_panoptic.data.mapper import build_augmentations
        from gbw_panoptic.modeling import load_inference_model

        if cfg.INPUT.FORMAT not in ("RGB", "BGR"):
            raise ValueError(f"INPUT.FORMAT={cfg.INPUT.FORMAT!r}: the demo feeds RGB or BGR images")
        self.model = load_inference_model(cfg)
        self.augmentations = T.AugmentationList(build_augmentations(cfg, is_train=False))
        self.input_format = cfg.INPUT.FORMAT
        self.detections = bool(cfg.MODEL.MASK_ON)  # a Mask R-CNN decoder: its detections are drawn too

    def __call__(self, rgb: np.ndarray) -> Dict[str, Any]:
        """The model's output for ``rgb`` (uint8 HxWx3): ``"sem_seg"`` (C x H x W logits) and, with the
        instance head, ``"panoptic_seg"`` at the image's size."""
        from detectron2.data import transforms as T

        image = rgb if self.input_format == "RGB" else rgb[..., ::-1]
        aug_input = T.AugInput(np.ascontiguousarray(image))
        self.augmentations(aug_input)
        inputs = {
            "image": torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1))),
            "height": rgb.shape[0],
            "width": rgb.shape[1],
        }
        with torch.no_grad():
            return self.model([inputs])[0]


def pictures(rgb: np.ndarray, output: Dict[str, Any], metadata: Any, detections: bool) -> Dict[str, np.ndarray]:
    """``{"panoptic": ..., "semantic": ..., "detections": ...}`` drawn on ``rgb``, RGB uint8 like it: the
    segments (only with an instance decoder), the class map, and with ``detections`` (a Mask R-CNN
    decoder, ``MODEL.MASK_ON``) every detection with its class and score, those the panoptic fusion's
    score threshold leaves out included."""
    drawn = {}
    if "panoptic_seg" in output:
        png, segments_info = output["panoptic_seg"]
        drawn["panoptic"] = draw_panoptic(rgb, png.to("cpu").numpy(), segments_info, metadata)
    drawn["semantic"] = draw_semantic(rgb, output["sem_seg"].argmax(0).to("cpu").numpy(), metadata)
    if detections:
        drawn["detections"] = draw_detections(rgb, output["instances"], metadata)
    return drawn


def run_images(predictor: Predictor, metadata: Any, files: Sequence[Path], output: Path) -> Tuple[int, List[str]]:
    """Pictures of every file in ``output``; returns (images drawn, error messages of unreadable files)."""
    from gbw_panoptic.data.image_io import ImageReadError, read_image
    from gbw_panoptic.evaluation.panoptic_io import write_png

    drawn, errors = 0, []
    for path in tqdm(files, desc="demo", unit="img"):
        try:
            rgb = read_image(str(path), format="RGB")
        except ImageReadError as e:
            logger.error("skipped: %s", e)
            errors.append(str(e))
            continue
        for kind, picture in pictures(rgb, predictor(rgb), metadata, predictor.detections).items():
            write_png(output / f"{path.stem}_{kind}.png", picture)
        drawn += 1
    return drawn, errors


def video_frames(capture: "cv2.VideoCapture") -> Iterator[np.ndarray]:
    """The frames of an open capture as RGB uint8 HxWx3, to its end."""
    while True:
        ok, frame = capture.read()
        if not ok:
            return
        yield np.ascontiguousarray(frame[..., ::-1])


def run_video(predictor: Predictor, metadata: Any, video: Path, output: Path) -> int:
    """``<stem>_<kind>.mp4`` videos of the pictures of every frame of ``video`` in ``output``; returns the
    number of frames drawn.

    Raises:
        OSError: ``video`` cannot be opened or has no frame, or an output video cannot be written.
    """
    from gbw_panoptic.utils.io import atomic_path

    capture = cv2.VideoCapture(str(video))
    if not capture.isOpened():
        raise OSError(f"cannot open video {video} (not a video file, or a codec OpenCV lacks)")
    fps = capture.get(cv2.CAP_PROP_FPS) or DEFAULT_FPS
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    frames = 0
    writers: Dict[str, cv2.VideoWriter] = {}
    try:
        with contextlib.ExitStack() as stack:  # writers released before their files are moved into place
            for rgb in tqdm(video_frames(capture), desc="demo", unit="frame", total=total):
                for kind, picture in pictures(rgb, predictor(rgb), metadata, predictor.detections).items():
                    if kind not in writers:
                        target = output / f"{video.stem}_{kind}.mp4"
                        size = (picture.shape[1], picture.shape[0])
                        writer = cv2.VideoWriter(stack.enter_context(atomic_path(target)), cv2.VideoWriter_fourcc(*"mp4v"), fps, size)
                        stack.callback(writer.release)
                        if not writer.isOpened():
                            raise OSError(f"cannot write video {target} (OpenCV's mp4v codec)")
                        writers[kind] = writer
                    writers[kind].write(np.ascontiguousarray(picture[..., ::-1]))
                frames += 1
            if frames == 0:
                raise OSError(f"video {video} has no frame that OpenCV can decode")
    finally:
        capture.release()
    return frames


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE", help="the model's config file")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", help="image files, folders (their images) or globs such as 'dir/*.jpg'")
    source.add_argument("--video-input", type=Path, help="a video file (any format OpenCV reads)")
    parser.add_argument("--output", type=Path, required=True, help="folder for the pictures (created)")
    parser.add_argument(
        "--opts", default=[], nargs=argparse.REMAINDER,
        help="config overrides KEY VALUE ..., at the end; the checkpoint as MODEL.WEIGHTS /path/to/model.pth",
    )  # fmt: skip
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.output.exists() and not args.output.is_dir():
        raise NotADirectoryError(f"--output {args.output} is a file; give a folder")
    files = []
    if args.video_input is not None and not args.video_input.is_file():
        raise FileNotFoundError(f"--video-input {args.video_input}: no such file")
    if args.input is not None:
        files = expand_inputs(args.input)
        check_unique_names(files)
    from gbw_panoptic.uda.cli import merged_config

    cfg = merged_config(args)  # as training merges it
    cfg.freeze()
    metadata = dataset_metadata(cfg)
    predictor = Predictor(cfg)
    args.output.mkdir(parents=True, exist_ok=True)
    if args.video_input is not None:
        frames = run_video(predictor, metadata, args.video_input, args.output)
        logger.info("drew %d frames of %s into %s", frames, args.video_input, args.output)
        return 0
    drawn, errors = run_images(predictor, metadata, files, args.output)
    logger.info("drew %d of %d images into %s", drawn, len(files), args.output)
    if errors:
        logger.error("%d unreadable files skipped:\n  %s", len(errors), "\n  ".join(errors))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
