"""Training with several processes: the batch split checked before any process starts; DDP searches
for unused parameters exactly for the models and methods whose passes leave some out."""
from typing import List

import pytest
import torch

from gbw_panoptic.uda import UDATrainer, cli
from gbw_panoptic.uda.output_lock import unlock_output_dir
from gbw_panoptic.uda.runner import StudentForward, StudentRunner, needs_unused_parameter_search
from test_uda_training import _args


@pytest.mark.parametrize(
    "flags, overrides, message",
    [
        (
            ["--num-gpus", "4"],
            [],
            r"SOLVER.IMS_PER_BATCH=2 .* world size of 4 \(--num-gpus 4 x --num-machines 1\): set "
            r"SOLVER.IMS_PER_BATCH to a multiple of 4 \(4, 8, 12, .*divides 2 \(1, 2\)",
        ),
        (
            ["--num-gpus", "1", "--num-machines", "2", "--machine-rank", "1", "--dist-url", "tcp://127.0.0.1:1"],
            ["DATASETS.TARGET_IMS_PER_BATCH", "3"],
            r"DATASETS.TARGET_IMS_PER_BATCH=3 .* world size of 2 .* multiple of 2 \(2, 4, 6, .*divides 3 \(1, 3\)",
        ),
    ],
)
def test_a_batch_the_world_size_does_not_divide_is_refused_before_any_process_starts(
    repo_root, tmp_path, monkeypatch, flags, overrides, message
) -> None:
    def no_launch(*args, **kwargs):
        raise AssertionError("processes were launched")

    monkeypatch.setattr(cli, "launch", no_launch)
    config = str(repo_root / "configs" / "synthetic" / "dacs_gbw.yaml")
    argv = [*flags, "--config-file", config, "OUTPUT_DIR", str(tmp_path / "out"), *overrides]
    with pytest.raises(ValueError, match=message):
        cli.run(argv)
    assert not (tmp_path / "out").exists()  # nothing locked or written


def test_a_batch_the_world_size_divides_is_accepted(repo_root) -> None:
    cfg = cli.merged_config(
        cli.build_parser().parse_args(["--config-file", str(repo_root / "configs" / "synthetic" / "dacs_gbw.yaml")])
    )
    cli.check_batch_split(cfg, num_gpus=2, num_machines=1)
    with pytest.raises(ValueError, match="SOLVER.IMS_PER_BATCH=2"):
        cli.check_batch_split(cfg, num_gpus=1, num_machines=4)


@pytest.mark.parametrize(
    "config, extra, needed",
    [
        ("mit_b0_source_only_gbw.yaml", [], False),
        ("dacs_gbw.yaml", [], False),
        ("hrda_panoptic_dacs_gbw.yaml", [], False),
        ("advseg_gbw.yaml", [], True),
        ("minent_gbw.yaml", [], True),
        ("minent_gbw.yaml", ["MODEL.INS_EMBED_HEAD.ENABLED", "False"], False),
    ],
)
def test_unused_parameter_search_is_on_exactly_when_a_pass_leaves_parameters_out(
    synthetic_datasets, repo_root, tmp_path, monkeypatch, config, extra, needed
) -> None:
    """One step in one process: the parameters autograd reaches in each student pass (a forward through
    the runner and its backward, as DDP sees it) against :func:`needs_unused_parameter_search`."""
    passes: List[int] = []  # per pass: the number of trainable parameters it did not reach
    forwarded = []
    student_forward, backward = StudentForward.forward, StudentRunner.backward

    def recording_forward(self, *args, **kwargs):
        forwarded.append(True)
        return student_forward(self, *args, **kwargs)

    def recording_backward(self, loss: torch.Tensor) -> None:
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        reached = set()
        hooks = [p.register_post_accumulate_grad_hook(lambda p: reached.add(id(p))) for p in trainable]
        try:
            backward(self, loss)
        finally:
            for hook in hooks:
                hook.remove()
        if forwarded:  # a backward of the discriminator alone follows no student forward
            passes.append(sum(id(p) not in reached for p in trainable))
        forwarded.clear()

    monkeypatch.setattr(StudentForward, "forward", recording_forward)
    monkeypatch.setattr(StudentRunner, "backward", recording_backward)
    cfg = cli.setup(_args(repo_root, tmp_path, config, extra=["SOLVER.MAX_ITER", "1", "DATASETS.TEST", "()", *extra]))
    try:
        trainer = UDATrainer(cfg)
        trainer.train()
    finally:
        unlock_output_dir(cfg.OUTPUT_DIR)
    assert len(passes) >= 1
    assert any(passes) == needed == needs_unused_parameter_search(trainer.model, trainer.method.semantic_only_pass)
