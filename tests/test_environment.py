"""The installed environment: Detectron2 (registry or upstream build) with the installer's fixes, panopticapi."""
import importlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch


@pytest.mark.parametrize(
    "module",
    [
        "detectron2",
        "detectron2.layers",
        "detectron2.projects.panoptic_deeplab",
        "detectron2.projects.deeplab",
        "detectron2.evaluation",
        "detectron2.utils.visualizer",
        "detectron2.model_zoo",
        "panopticapi.evaluation",
        "cvxopt",
        "cityscapesscripts.helpers.labels",
    ],
)
def test_module_imports(module):
    importlib.import_module(module)


def test_missing_compiled_op_raises_clear_error():
    import detectron2._C as compiled

    if not getattr(compiled, "IS_PLACEHOLDER", False):
        pytest.skip("Detectron2 was built with its C++ ops; nothing to check")
    with pytest.raises(RuntimeError, match=r"deform_conv_forward.*install_detectron2.py --source"):
        compiled.deform_conv_forward
    # Dunder lookups (done by inspect, pickle, ...) stay plain AttributeErrors.
    assert not hasattr(compiled, "__wrapped__")


def test_rotated_box_op_fails_clearly_only_when_called():
    """Importing the layers works; only calling a compiled op raises, naming the op."""
    import detectron2._C as compiled
    from detectron2.layers.rotated_boxes import pairwise_iou_rotated

    if not getattr(compiled, "IS_PLACEHOLDER", False):
        pytest.skip("Detectron2 was built with its C++ ops")
    boxes = torch.tensor([[5.0, 5.0, 4.0, 4.0, 0.0]])
    with pytest.raises(RuntimeError, match=r"box_iou_rotated is a compiled C\+\+/CUDA op"):
        pairwise_iou_rotated(boxes, boxes)


def test_numpy_and_pillow_renames_work(tmp_path):
    """Call-time NumPy names of v0.6 (here in SemSegEvaluator) work with current NumPy."""
    import numpy as np
    from PIL import Image
    from detectron2.data import DatasetCatalog, MetadataCatalog
    from detectron2.evaluation import SemSegEvaluator
    from detectron2.structures.masks import polygons_to_bitmask

    assert polygons_to_bitmask([], 3, 5).shape == (3, 5)
    gt = np.array([[0, 1], [2, 255]], dtype=np.uint8)
    Image.fromarray(gt).save(tmp_path / "gt.png")
    name = "gbw_env_semseg_smoke"
    if name not in DatasetCatalog.list():
        DatasetCatalog.register(name, lambda: [
            {"file_name": "img.png", "sem_seg_file_name": str(tmp_path / "gt.png")}])
        MetadataCatalog.get(name).set(stuff_classes=["a", "b", "c"], ignore_label=255)
    evaluator = SemSegEvaluator(name, distributed=False)
    evaluator.reset()
    logits = torch.zeros(3, 2, 2)
    logits[0, 0, 0] = logits[1, 0, 1] = logits[1, 1, 0] = 1.0  # class 2 pixel predicted as 1
    evaluator.process([{"file_name": "img.png"}], [{"sem_seg": logits}])
    result = evaluator.evaluate()["sem_seg"]
    assert result["IoU-a"] == pytest.approx(100.0)
    assert result["IoU-b"] == pytest.approx(50.0)
    assert result["IoU-c"] == pytest.approx(0.0)


def test_installer_is_idempotent(repo_root):
    """A second run of the installer finds everything working and changes nothing."""
    freeze = [sys.executable, "-m", "pip", "freeze", "--all"]
    before = subprocess.run(freeze, capture_output=True, text=True, check=True).stdout
    out = subprocess.run(
        [sys.executable, str(repo_root / "tools" / "install_detectron2.py")],
        capture_output=True, text=True, check=True,
    ).stdout
    after = subprocess.run(freeze, capture_output=True, text=True, check=True).stdout
    assert "detectron2" in out and "nothing to do" in out
    assert "panopticapi already works" in out
    assert before == after


def test_env_report_runs():
    out = subprocess.run(
        [sys.executable, "-m", "gbw_panoptic.env"], capture_output=True, text=True, check=True
    ).stdout
    for name in ("torch", "detectron2", "detectron2 C++/CUDA ops", "panopticapi", "cvxopt"):
        assert name in out


def _installer():
    spec = importlib.util.spec_from_file_location("install_detectron2", Path(__file__).resolve().parents[1] / "tools" / "install_detectron2.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_installer_downloads_from_the_indexes_pip_is_configured_with(tmp_path, monkeypatch):
    """Index URLs come from pip's configuration (here the environment), in pip's order; the sdist is
    found on the first index that lists it (a local PEP 503 index here, no network)."""
    empty, local = tmp_path / "empty", tmp_path / "local"
    (local / "pb1-detectron2").mkdir(parents=True)
    (local / "pb1-detectron2" / "pb1-detectron2-0.6.tar.gz").write_bytes(b"sdist")
    (local / "pb1-detectron2" / "index.html").write_text('<a href="pb1-detectron2-0.6.tar.gz#sha256=00">pb1-detectron2-0.6.tar.gz</a>')
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", empty.as_uri())
    monkeypatch.setenv("PIP_EXTRA_INDEX_URL", f"{(tmp_path / 'missing').as_uri()} {local.as_uri()}")
    installer = _installer()
    assert installer.package_indexes() == [empty.as_uri(), (tmp_path / "missing").as_uri(), local.as_uri()]
    url = installer.find_sdist("pb1-detectron2", "pb1-detectron2-0.6.tar.gz")
    assert url == (local / "pb1-detectron2" / "pb1-detectron2-0.6.tar.gz").as_uri()
    with pytest.raises(SystemExit, match=r"pb1-detectron2-0\.7\.tar\.gz is not listed on any of pip's package indexes: .*empty"):
        installer.find_sdist("pb1-detectron2", "pb1-detectron2-0.7.tar.gz")
    # No index configured: pip's own default, whatever it is.
    monkeypatch.delenv("PIP_INDEX_URL")
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL")
    default = installer.package_indexes()
    assert len(default) == 1 and default[0].startswith("https://")
