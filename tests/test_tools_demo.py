"""tools/demo.py on images and a video the tests generate, with small checkpoints saved by the tests."""
import argparse
import importlib.util
from pathlib import Path
from typing import List

import cv2
import numpy as np
import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SMALL = ["MODEL.SEM_SEG_HEAD.EMBED_DIM", "16", "MODEL.INS_EMBED_HEAD.EMBED_DIM", "16", "MODEL.DEVICE", "cpu"]


def _demo():
    spec = importlib.util.spec_from_file_location("demo", REPO_ROOT / "tools" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _checkpoint(folder: Path, config: str, opts: List[str]) -> Path:
    """A randomly initialised model of ``config`` saved as ``folder/model.pth``."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    from gbw_panoptic.uda.cli import merged_config

    torch.manual_seed(0)
    cfg = merged_config(argparse.Namespace(config_file=config, opts=opts))
    DetectionCheckpointer(build_model(cfg), save_dir=str(folder)).save("model")
    return folder / "model.pth"


def _image(seed: int, height: int, width: int) -> np.ndarray:
    """Blocks of random colours, RGB uint8."""
    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, (height // 16 + 1, width // 16 + 1, 3), dtype=np.uint8)
    return np.ascontiguousarray(np.repeat(np.repeat(blocks, 16, axis=0), 16, axis=1)[:height, :width])


@pytest.fixture(scope="module")
def panoptic_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("model")
    config = str(REPO_ROOT / "configs" / "synthetic" / "mit_b0_source_only_gbw.yaml")
    return config, _checkpoint(folder, config, SMALL)


def test_expand_inputs_folders_globs_and_files(tmp_path):
    demo = _demo()
    (tmp_path / "a").mkdir()
    for name in ("2.png", "1.JPG", "notes.txt"):
        (tmp_path / "a" / name).write_bytes(b"x")
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "3.jpg").write_bytes(b"x")
    files = demo.expand_inputs([str(tmp_path / "a"), str(tmp_path / "b" / "*.jpg"), str(tmp_path / "a" / "2.png")])
    assert files == [tmp_path / "a" / "1.JPG", tmp_path / "a" / "2.png", tmp_path / "b" / "3.jpg"]
    with pytest.raises(FileNotFoundError, match=r"no file matches --input '.*\*\.bmp'"):
        demo.expand_inputs([str(tmp_path / "*.bmp")])
    with pytest.raises(FileNotFoundError, match="no image file .* in folder"):
        demo.expand_inputs([str(tmp_path / "a"), str(tmp_path)])
    with pytest.raises(FileNotFoundError, match="missing.png: no such file or folder"):
        demo.expand_inputs([str(tmp_path / "missing.png")])
    with pytest.raises(ValueError, match="share a file name"):
        demo.check_unique_names([tmp_path / "a" / "x.png", tmp_path / "b" / "x.jpg"])


def test_demo_draws_what_evaluation_predicts(panoptic_model, tmp_path):
    from detectron2.data import MetadataCatalog

    from gbw_panoptic.data.mapper import GBWPanopticDatasetMapper
    from gbw_panoptic.modeling import load_inference_model
    from gbw_panoptic.uda.cli import merged_config
    from gbw_panoptic.utils.visualization import draw_panoptic

    demo = _demo()
    config, weights = panoptic_model
    photos = tmp_path / "photos"
    photos.mkdir()
    sizes = {"street": (96, 160), "lane": (128, 256)}  # one not at INPUT.BASE_SIZE: resized back
    for seed, (name, (height, width)) in enumerate(sizes.items()):
        cv2.imwrite(str(photos / f"{name}.png"), _image(seed, height, width)[..., ::-1])
    (photos / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot an image")
    out = tmp_path / "pictures"
    argv = ["--config-file", config, "--input", str(photos), "--output", str(out), "--opts", "MODEL.WEIGHTS", str(weights), *SMALL]
    assert demo.main(argv) == 1  # broken.png skipped, the others drawn
    assert sorted(p.name for p in out.iterdir()) == [
        "lane_panoptic.png", "lane_semantic.png", "street_panoptic.png", "street_semantic.png"]  # fmt: skip

    # The picture is the evaluation loader's input through the model's inference forward.
    opts = ["MODEL.WEIGHTS", str(weights), *SMALL]
    cfg = merged_config(argparse.Namespace(config_file=config, opts=opts))
    model = load_inference_model(cfg)
    mapper = GBWPanopticDatasetMapper(cfg, is_train=False, load_labels=False, dataset_name=cfg.DATASETS.TEST[0])
    for name, (height, width) in sizes.items():
        file_name = str(photos / f"{name}.png")
        with torch.no_grad():
            output = model([mapper({"file_name": file_name, "height": height, "width": width, "image_id": name})])[0]
        png, segments_info = output["panoptic_seg"]
        rgb = cv2.imread(file_name)[..., ::-1]
        expected = draw_panoptic(rgb, png.numpy(), segments_info, MetadataCatalog.get(cfg.DATASETS.TEST[0]))
        np.testing.assert_array_equal(cv2.imread(str(out / f"{name}_panoptic.png"))[..., ::-1], expected)
        semantic = cv2.imread(str(out / f"{name}_semantic.png"))
        assert semantic.shape == (height, width, 3) and np.abs(semantic.astype(int) - rgb[..., ::-1]).mean() > 5


def test_demo_video(panoptic_model, tmp_path):
    demo = _demo()
    config, weights = panoptic_model
    video = tmp_path / "drive.mp4"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"mp4v"), 5.0, (160, 96))
    for seed in range(3):
        writer.write(_image(seed, 96, 160))
    writer.release()
    out = tmp_path / "pictures"
    argv = ["--config-file", config, "--video-input", str(video), "--output", str(out), "--opts", "MODEL.WEIGHTS", str(weights), *SMALL]
    assert demo.main(argv) == 0
    assert sorted(p.name for p in out.iterdir()) == ["drive_panoptic.mp4", "drive_semantic.mp4"]
    capture = cv2.VideoCapture(str(out / "drive_panoptic.mp4"))
    assert int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) == 3
    assert (capture.get(cv2.CAP_PROP_FRAME_HEIGHT), capture.get(cv2.CAP_PROP_FRAME_WIDTH)) == (96, 160)
    capture.release()
    (tmp_path / "notes.mp4").write_text("not a video")
    with pytest.raises(OSError, match="notes.mp4"):
        demo.main(["--config-file", config, "--video-input", str(tmp_path / "notes.mp4"), "--output", str(out),
                   "--opts", "MODEL.WEIGHTS", str(weights), *SMALL])  # fmt: skip


def test_demo_errors_name_the_problem(panoptic_model, tmp_path):
    demo = _demo()
    config, weights = panoptic_model
    cv2.imwrite(str(tmp_path / "a.png"), _image(0, 32, 32))
    base = ["--config-file", config, "--output", str(tmp_path / "out")]
    with pytest.raises(FileNotFoundError, match=r"MODEL.WEIGHTS='.*missing.pth': no such file"):
        demo.main([*base, "--input", str(tmp_path / "a.png"), "--opts", "MODEL.WEIGHTS", str(tmp_path / "missing.pth"), *SMALL])
    with pytest.raises(ValueError, match="MODEL.WEIGHTS is empty"):
        demo.main([*base, "--input", str(tmp_path / "a.png"), "--opts", *SMALL])
    with pytest.raises(FileNotFoundError, match="no file matches"):
        demo.main([*base, "--input", str(tmp_path / "*.jpg"), "--opts", "MODEL.WEIGHTS", str(weights)])
    with pytest.raises(FileNotFoundError, match="--video-input .*drive.mp4: no such file"):
        demo.main([*base, "--video-input", str(tmp_path / "drive.mp4"), "--opts", "MODEL.WEIGHTS", str(weights)])
    with pytest.raises(NotADirectoryError, match="a.png is a file"):
        demo.main(["--config-file", config, "--output", str(tmp_path / "a.png"), "--input", str(tmp_path / "a.png")])


def test_demo_draws_the_top_down_models_detections(tmp_path):
    """The top-down model (Mask R-CNN decoder) gets a third picture: every detection of its inference
    forward drawn with its class and score, also those below the panoptic fusion's score threshold."""
    from detectron2.data import MetadataCatalog

    from gbw_panoptic.data.mapper import GBWPanopticDatasetMapper
    from gbw_panoptic.modeling import load_inference_model
    from gbw_panoptic.uda.cli import merged_config
    from gbw_panoptic.utils.visualization import draw_detections

    demo = _demo()
    config = str(REPO_ROOT / "configs" / "synthetic" / "maskrcnn_dacs.yaml")
    opts = ["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", ""]
    (tmp_path / "model").mkdir()
    weights = _checkpoint(tmp_path / "model", config, opts)
    photo = tmp_path / "street.png"
    cv2.imwrite(str(photo), _image(0, 128, 256)[..., ::-1])
    out = tmp_path / "pictures"
    opts[-1] = str(weights)
    assert demo.main(["--config-file", config, "--input", str(photo), "--output", str(out), "--opts", *opts]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["street_detections.png", "street_panoptic.png", "street_semantic.png"]

    cfg = merged_config(argparse.Namespace(config_file=config, opts=opts))
    model = load_inference_model(cfg)
    mapper = GBWPanopticDatasetMapper(cfg, is_train=False, load_labels=False, dataset_name=cfg.DATASETS.TEST[0])
    with torch.no_grad():
        output = model([mapper({"file_name": str(photo), "height": 128, "width": 256, "image_id": "street"})])[0]
    instances = output["instances"]
    assert len(instances) > 0  # an untrained classifier scores every class above Detectron2's 0.05
    assert (instances.scores < cfg.MODEL.TOP_DOWN.MASK_SCORE_THRESHOLD).any()  # drawn, though not fused
    rgb = cv2.imread(str(photo))[..., ::-1]
    expected = draw_detections(rgb, instances, MetadataCatalog.get(cfg.DATASETS.TEST[0]))
    np.testing.assert_array_equal(cv2.imread(str(out / "street_detections.png"))[..., ::-1], expected)
    assert np.abs(expected.astype(int) - rgb).mean() > 1  # the detections changed the picture
