"""The weights of the real-data configs: local files checked when the config is loaded (before anything is
built), with messages that name the key and the download command; R-103 weights in Detectron2's model-zoo
layout load into the ResNet-101 backbone (the MiT formats: tests/test_modeling_backbones.py)."""
import pickle
import re
from pathlib import Path
from typing import List

import pytest
import torch

from gbw_panoptic.uda import check_weights_config
from gbw_panoptic.uda.cli import build_parser, load_config, merged_config

REPO_ROOT = Path(__file__).resolve().parents[1]
R101 = str(REPO_ROOT / "configs" / "gta2cityscapes" / "r101.yaml")
MIT_B5 = str(REPO_ROOT / "configs" / "synthia2cityscapes" / "mit_b5_gbw.yaml")
REAL_CONFIG_FOLDERS = ("synthia2cityscapes", "gta2cityscapes", "synthia2mapillary")


def _cfg(config: str, opts: List[str] = ()):
    return merged_config(build_parser().parse_args(["--config-file", config, *opts]))


def test_real_configs_name_local_weights_and_the_check_says_how_to_get_them(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the configs' relative weights paths do not exist here
    with pytest.raises(FileNotFoundError, match=re.escape(
        "MODEL.WEIGHTS='pretrained/R-103.pkl': no such file (Detectron2's ImageNet ResNet-101 with the DeepLab stem; "
        "download it once on a machine with internet (e.g. a login node): `mkdir -p pretrained && wget -O "
        "pretrained/R-103.pkl https://dl.fbaipublicfiles.com/detectron2/DeepLab/R-103.pkl`)"
    )):  # fmt: skip
        load_config(build_parser().parse_args(["--config-file", R101]))
    with pytest.raises(FileNotFoundError, match=re.escape(
        "MODEL.MIT.PRETRAINED='pretrained/mit-b5' does not exist. Download the ImageNet MiT-B5 weights once (on a "
        "machine with internet, e.g. a login node): `hf download nvidia/mit-b5 --local-dir pretrained/mit-b5`"
    )):  # fmt: skip
        load_config(build_parser().parse_args(["--config-file", MIT_B5]))

    (tmp_path / "pretrained" / "mit-b5").mkdir(parents=True)
    (tmp_path / "pretrained" / "R-103.pkl").write_bytes(b"")
    check_weights_config(_cfg(MIT_B5))
    check_weights_config(_cfg(R101))
    check_weights_config(_cfg(R101, ["MODEL.WEIGHTS", ""]))


def test_a_weights_url_is_refused_with_the_command_that_downloads_it():
    with pytest.raises(ValueError, match=re.escape(
        "MODEL.WEIGHTS='detectron2://DeepLab/R-103.pkl' is a URL, which would be downloaded when the run starts"
    )) as raised:  # fmt: skip
        check_weights_config(_cfg(R101, ["MODEL.WEIGHTS", "detectron2://DeepLab/R-103.pkl"]))
    assert raised.value.args[0].endswith(
        "`mkdir -p pretrained && wget -O pretrained/R-103.pkl https://dl.fbaipublicfiles.com/detectron2/DeepLab/R-103.pkl`, "
        "and set MODEL.WEIGHTS pretrained/R-103.pkl"
    )
    with pytest.raises(ValueError, match=r"wget -O pretrained/model\.pth https://example\.org/run/model\.pth"):
        check_weights_config(_cfg(R101, ["MODEL.WEIGHTS", "https://example.org/run/model.pth"]))


def test_every_real_config_has_its_own_output_dir():
    configs = sorted(
        path for folder in REAL_CONFIG_FOLDERS for path in (REPO_ROOT / "configs" / folder).glob("*.yaml")
        if not path.name.startswith("Base-")
    )  # fmt: skip
    assert len(configs) >= 16
    for config in configs:
        assert _cfg(str(config)).OUTPUT_DIR == f"output/{config.parent.name}/{config.stem}", config


@pytest.mark.slow  # builds the full ResNet-101 model twice
def test_r103_model_zoo_pickle_loads_into_the_resnet101_backbone(tmp_path):
    """R-103.pkl is a pickle of ``{"model": {name: numpy array}, "matching_heuristics": True}`` whose names are
    the backbone's own (``stem.conv1.weight``, ``res2.0.conv1.norm.running_mean``, ...); Detectron2's
    checkpointer matches them to ``backbone.*`` as training loads MODEL.WEIGHTS."""
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.modeling import build_model

    small = ["MODEL.DEVICE", "cpu", "MODEL.SEM_SEG_HEAD.EMBED_DIM", "16", "MODEL.INS_EMBED_HEAD.EMBED_DIM", "16"]
    torch.manual_seed(0)
    source = build_model(_cfg(R101, [*small, "MODEL.WEIGHTS", ""]))
    with torch.no_grad():  # BatchNorm statistics away from their initial values, so a skipped one would show
        for name, buffer in source.backbone.named_buffers():
            if "running" in name:
                buffer.add_(torch.rand_like(buffer))
    backbone = {k: v.numpy() for k, v in source.backbone.state_dict().items() if not k.endswith("num_batches_tracked")}
    assert any(k.startswith("stem.conv3.") for k in backbone)  # the DeepLab stem
    with open(tmp_path / "R-103.pkl", "wb") as f:
        pickle.dump({"model": backbone, "__author__": "test", "matching_heuristics": True}, f)

    cfg = _cfg(R101, [*small, "MODEL.WEIGHTS", str(tmp_path / "R-103.pkl")])
    check_weights_config(cfg)
    torch.manual_seed(1)
    model = build_model(cfg)
    DetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    loaded = model.backbone.state_dict()
    assert set(backbone) <= set(loaded)
    for key, value in backbone.items():
        assert torch.equal(loaded[key], torch.as_tensor(value)), key
