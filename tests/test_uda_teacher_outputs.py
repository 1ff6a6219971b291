"""The EMA teacher predicts the class logits alone (``EMATeacher.predict_sem_seg``, ``predict_dense``'s
``outputs``): the same logits as a prediction of every output, the instance head never run, the DACS
step unchanged."""
import copy
import json
import subprocess
import sys
from pathlib import Path
from typing import Dict, List

import pytest
import torch
from detectron2.utils.events import EventStorage
from test_modeling_hrda import _model as _hrda_model
from test_modeling_meta_arch import CITYSCAPES_CLASSES, _batch, _cfg, _small_model
from torch import nn

from gbw_panoptic.uda import EMATeacher
from gbw_panoptic.uda.dacs import DACS
from gbw_panoptic.uda.runner import StudentRunner

REPO_ROOT = Path(__file__).resolve().parents[1]
INSTANCE_HRDA = ["MODEL.INS_EMBED_HEAD.ENABLED", True, "MODEL.INS_EMBED_HEAD.EMBED_DIM", 16]


def _count_calls(*modules: nn.Module) -> Dict[str, int]:
    """A counter of the forward calls of each module (by its index), updated by forward hooks."""
    calls = {str(index): 0 for index in range(len(modules))}
    for index, module in enumerate(modules):

        def hook(*_, key=str(index)):
            calls[key] += 1

        module.register_forward_hook(hook)
    return calls


def _batch_norm_buffers(module: nn.Module) -> Dict[str, torch.Tensor]:
    return {
        name: value.clone()
        for name, value in module.named_buffers()
        if name.endswith(("running_mean", "running_var", "num_batches_tracked"))
    }


def test_teacher_class_logits_equal_those_of_the_full_prediction_without_the_instance_head():
    student = _small_model().train()
    teacher = EMATeacher(student, alpha=0.9)
    images = student.preprocess_image(_batch()).tensor
    calls = _count_calls(teacher.model.sem_seg_head, teacher.model.ins_embed_head)
    semantic_before = _batch_norm_buffers(teacher.model.sem_seg_head)
    instance_before = _batch_norm_buffers(teacher.model.ins_embed_head)
    assert instance_before and semantic_before
    with torch.no_grad():
        logits = teacher.predict_sem_seg(images)
    assert calls == {"0": 1, "1": 0}
    # The instance head's batch norm saw no batch; the semantic head's did (it runs on batch statistics).
    for name, value in _batch_norm_buffers(teacher.model.ins_embed_head).items():
        assert torch.equal(value, instance_before[name]), name
    semantic_after = _batch_norm_buffers(teacher.model.sem_seg_head)
    changed = [name for name, value in semantic_after.items() if not torch.equal(value, semantic_before[name])]
    assert changed
    with torch.no_grad():
        full = teacher.model.predict_dense(images)
    assert calls == {"0": 2, "1": 1}
    assert set(full) == {"sem_seg", "center", "offset"}
    assert torch.equal(logits, full["sem_seg"])

    # The average still covers every parameter, the instance head's included.
    with torch.no_grad():
        for parameter in student.parameters():
            parameter.add_(1.0)
    before = {name: value.clone() for name, value in teacher.model.named_parameters()}
    teacher.update(student, iteration=3)
    students = dict(student.named_parameters())
    for name, value in teacher.model.named_parameters():
        torch.testing.assert_close(value, 0.75 * before[name] + 0.25 * students[name], rtol=0, atol=1e-6)
    assert any(name.startswith("ins_embed_head.") for name in before)


def test_predict_dense_computes_the_requested_outputs_only():
    model = _small_model().eval()
    images = model.preprocess_image(_batch()).tensor
    calls = _count_calls(model.sem_seg_head, model.ins_embed_head)
    assert model.dense_outputs == ("sem_seg", "center", "offset")
    with torch.no_grad():
        full = model.predict_dense(images)
        instance = model.predict_dense(images, outputs=("offset", "center"))
        center = model.predict_dense(images, outputs=["center"])
    assert calls == {"0": 1, "1": 3}
    assert list(instance) == ["center", "offset"] and list(center) == ["center"]
    for name, value in (*instance.items(), *center.items()):
        assert torch.equal(value, full[name]), name
    for outputs in (("depth",), (), ("sem_seg", "sem_seg"), "sem_seg"):
        with pytest.raises(ValueError, match="outputs must name distinct outputs"):
            model.predict_dense(images, outputs=outputs)

    semantic_only = _small_model(["MODEL.INS_EMBED_HEAD.ENABLED", False]).eval()
    assert semantic_only.dense_outputs == ("sem_seg",)
    with torch.no_grad():
        assert list(semantic_only.predict_dense(images, outputs=("sem_seg",))) == ["sem_seg"]
    with pytest.raises(ValueError, match="outputs must name distinct outputs"):
        semantic_only.predict_dense(images, outputs=("center",))


@pytest.mark.parametrize("size", [(64, 96), (60, 90)])  # aligned, and padded to a multiple of 32
def test_hrda_teacher_class_logits_skip_the_instance_head_and_its_attention(size):
    student = _hrda_model(INSTANCE_HRDA).train()
    teacher = EMATeacher(student, alpha=0.9)
    images = student.preprocess_image(_batch(height=64, width=96)).tensor[..., : size[0], : size[1]]
    model = teacher.model
    calls = _count_calls(model.sem_seg_head, model.ins_embed_head, model.scale_attention, model.instance_attention)
    with torch.no_grad():
        logits = teacher.predict_sem_seg(images)
    assert calls["1"] == 0 and calls["3"] == 0 and calls["0"] > 0 and calls["2"] == 1
    with torch.no_grad():
        full = model.predict_dense(images)
    assert calls["1"] > 0 and calls["3"] == 1
    assert logits.shape == (2, 19, *size)
    assert torch.equal(logits, full["sem_seg"])


class _AllOutputsTeacher(EMATeacher):
    """The teacher predicting every output and keeping the class logits."""

    def predict_sem_seg(self, images: torch.Tensor) -> torch.Tensor:
        return self.model.predict_dense(images)["sem_seg"]


def _dacs_step(model: nn.Module, teacher_class: type) -> List[torch.Tensor]:
    """Gradients of ``model`` after one DACS step (iteration 1: the teacher is averaged first) whose
    teacher is a ``teacher_class``."""
    opts = [
        "MODEL.SEM_SEG_HEAD.EMBED_DIM", 16, "MODEL.INS_EMBED_HEAD.EMBED_DIM", 16,
        "DATASETS.TRAIN", "()", "DATASETS.TEST", f"('{CITYSCAPES_CLASSES}',)", "UDA.METHOD", "dacs",
        "UDA.MIX_INSTANCES", True,
    ]  # fmt: skip
    cfg = _cfg(opts=opts)
    method = DACS(cfg, model)
    method.teacher = teacher_class(model, method.teacher.alpha)
    method.train()
    runner = StudentRunner(model, amp=False, grad_scaler=torch.amp.GradScaler("cpu", enabled=False))
    generator = torch.Generator().manual_seed(3)
    target = [
        {"image": torch.randint(0, 256, (3, 48, 64), dtype=torch.uint8, generator=generator), "height": 48, "width": 64}
        for _ in range(2)
    ]
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.mul_(1.01)  # the student moves away from the teacher's copy
    torch.manual_seed(11)
    model.zero_grad(set_to_none=True)
    with EventStorage(1):
        method.before_step(model, 1)
        losses = method.run_step(runner, _batch(), target, 1).losses
    assert {"loss_mix_sem_seg", "loss_mix_center", "loss_mix_offset"} <= set(losses)
    return [parameter.grad.clone() for parameter in model.parameters() if parameter.grad is not None]


def test_dacs_step_is_unchanged_by_the_class_logits_only_teacher():
    reference_model = _small_model().train()
    model = copy.deepcopy(reference_model)
    calls = _count_calls(model.ins_embed_head)
    reference = _dacs_step(reference_model, _AllOutputsTeacher)
    gradients = _dacs_step(model, EMATeacher)
    assert calls["0"] == 2  # the student's source and mixed passes; the teacher's prediction did not run it
    assert len(gradients) == len(reference) > 0
    for gradient, expected in zip(gradients, reference):
        assert torch.equal(gradient, expected)


@pytest.mark.slow
def test_bench_train_step_compares_the_teachers_and_finds_the_same_training(tmp_path: Path) -> None:
    out = tmp_path / "step.json"
    result = subprocess.run(
        [
            sys.executable, str(REPO_ROOT / "tools" / "bench_train_step.py"), "--compare", "teacher",
            "--repeats", "2", "--warmup", "0", "--batches", "1", "--out", str(out),
            "SOLVER.IMS_PER_BATCH", "1", "DATASETS.TARGET_IMS_PER_BATCH", "1",
        ],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "ratio of medians (class logits only / all outputs)" in result.stdout
    report = json.loads(out.read_text())
    assert report["compare"] == "teacher"
    assert report["arms"] == ["teacher: all outputs (reference)", "teacher: class logits only"]
    assert all(len(seconds) == 2 for seconds in report["seconds"].values())
    assert report["identical_after_all_steps"] == {"students_identical": True, "teacher_parameters_identical": True}


@pytest.mark.slow
def test_bench_train_step_refuses_to_compare_teachers_without_one(tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable, str(REPO_ROOT / "tools" / "bench_train_step.py"), "--compare", "teacher",
            "--config-file", str(REPO_ROOT / "configs" / "synthetic" / "mit_b0_source_only.yaml"),
            "--repeats", "1", "--out", str(tmp_path / "step.json"),
        ],
        cwd=REPO_ROOT, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode != 0 and "needs a method with an EMA teacher" in result.stderr
