"""Training with several processes: one step of two processes with one image per domain equals one step
of one process with two; the batch split checked before any process starts; DDP searches for unused
parameters exactly for the models and methods whose passes leave some out."""
import os
from typing import Dict, List

import pytest
import torch

from gbw_panoptic.gbw.losses import _ClassWeighting
from gbw_panoptic.uda import UDATrainer, cli, dacs, launch
from gbw_panoptic.uda.output_lock import unlock_output_dir
from gbw_panoptic.uda.runner import StudentForward, StudentRunner, needs_unused_parameter_search
from test_uda_training import _args

# One step of 2 + 2 images. Without randomness that depends on the process: no dropout, a fixed
# ClassMix (the even classes of each source image) and no colour augmentation (their draws come from
# each process's generator), and BatchNorm statistics over the whole batch (Detectron2's naiveSyncBN).
EQUIVALENCE = [
    "SOLVER.MAX_ITER", "1",
    "DATASETS.TEST", "()",
    "SOLVER.IMS_PER_BATCH", "2",
    "DATASETS.TARGET_IMS_PER_BATCH", "2",
    "MODEL.SEM_SEG_HEAD.DROPOUT", "0.0",
    "MODEL.INS_EMBED_HEAD.DROPOUT", "0.0",
    "MODEL.SEM_SEG_HEAD.NORM", "naiveSyncBN",
    "MODEL.INS_EMBED_HEAD.NORM", "naiveSyncBN",
]  # fmt: skip


def _train_one_step(repo_root: str, output_dir: str, config: str) -> Dict[str, object]:
    """One training step of ``config`` with :data:`EQUIVALENCE` in this process (one of a launched group
    or alone): the GBW class weights of every loss call, the step's losses, the student's gradients
    before the optimizer step and its parameters after it."""
    from pathlib import Path

    weights: List[torch.Tensor] = []
    gradients: Dict[str, torch.Tensor] = {}
    solve = _ClassWeighting.class_weights_and_sums

    def recording_solve(self, *args):
        result = solve(self, *args)
        weights.append(result[0].clone())
        return result

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(_ClassWeighting, "class_weights_and_sums", recording_solve)
        patch.setattr(dacs, "class_mix_masks", lambda labels: labels % 2 == 0)
        patch.setattr(dacs, "strong_augment", lambda images, strength, probability: images)
        cfg = cli.setup(_args(Path(repo_root), output_dir, config, extra=EQUIVALENCE))
        try:
            trainer = UDATrainer(cfg)
            names = {id(p): name for name, p in trainer.model.named_parameters()}
            step, losses = trainer.optimizer.step, {}
            run_step = trainer.method.run_step

            def recording_step(*args, **kwargs):
                for group in trainer.optimizer.param_groups:
                    gradients.update({names[id(p)]: p.grad.clone() for p in group["params"] if p.grad is not None})
                return step(*args, **kwargs)

            def recording_run_step(*args, **kwargs):
                output = run_step(*args, **kwargs)
                losses.update(output.losses)
                return output

            trainer.optimizer.step = recording_step
            trainer.method.run_step = recording_run_step
            trainer.train()
        finally:
            unlock_output_dir(cfg.OUTPUT_DIR)
    parameters = {name: p.detach().clone() for name, p in trainer.model.named_parameters()}
    return {"weights": weights, "losses": losses, "gradients": gradients, "parameters": parameters}


# Config -> GBW loss calls of one step (sem_seg, center, offset on the source batch; DACS: and the mixed
# batch). AdvSeg and MinEnt also exercise DDP's unused parameter search (their target pass).
EQUIVALENCE_CONFIGS = {
    "mit_b0_source_only_gbw.yaml": 3,
    "dacs_gbw.yaml": 6,
    "advseg_gbw.yaml": 3,
    "minent_gbw.yaml": 3,
}


def _one_step_worker(repo_root: str, output_dir: str, datasets_root: str) -> None:
    """Runs in each launched process: :func:`_train_one_step` of each of :data:`EQUIVALENCE_CONFIGS`,
    saved as ``{config}.rank{R}.pt``."""
    from detectron2.utils import comm

    from gbw_panoptic.data.datasets import register_all

    register_all(datasets_root)
    for config in EQUIVALENCE_CONFIGS:
        result = _train_one_step(repo_root, os.path.join(output_dir, config), config)
        torch.save(result, os.path.join(output_dir, f"{config}.rank{comm.get_rank()}.pt"))


@pytest.fixture(scope="module")
def two_process_steps(synthetic_datasets, tmp_path_factory) -> Dict[str, List[Dict[str, object]]]:
    """The results of :func:`_train_one_step` in each of 2 launched processes, by config (one launch)."""
    output_dir = tmp_path_factory.mktemp("two_processes")
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    launch(_one_step_worker, 2, dist_url="auto", args=(repo_root, str(output_dir), str(synthetic_datasets)))
    return {
        config: [torch.load(output_dir / f"{config}.rank{rank}.pt", weights_only=False) for rank in range(2)]
        for config in EQUIVALENCE_CONFIGS
    }


@pytest.mark.slow
@pytest.mark.parametrize("config", EQUIVALENCE_CONFIGS)
def test_two_processes_with_one_image_per_domain_train_as_one_process_with_two(
    two_process_steps, repo_root, tmp_path, config
) -> None:
    ranks = two_process_steps[config]
    one = _train_one_step(str(repo_root), str(tmp_path), config)

    assert len(one["weights"]) == EQUIVALENCE_CONFIGS[config]
    for rank in ranks:
        assert len(rank["weights"]) == len(one["weights"])
        for ours, reference in zip(rank["weights"], one["weights"]):
            torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)
    assert ranks[0]["losses"].keys() == one["losses"].keys()
    for name, reference in one["losses"].items():
        # Detectron2 logs the mean of the processes' losses.
        mean = torch.stack([rank["losses"][name] for rank in ranks]).mean()
        torch.testing.assert_close(mean, reference, rtol=1e-4, atol=1e-6, msg=name)
    assert ranks[0]["gradients"].keys() == one["gradients"].keys()
    for name, reference in one["gradients"].items():
        for rank in ranks:
            torch.testing.assert_close(rank["gradients"][name], reference, rtol=1e-3, atol=1e-7, msg=name)
    for name, reference in one["parameters"].items():
        for rank in ranks:
            torch.testing.assert_close(rank["parameters"][name], reference, rtol=1e-4, atol=1e-6, msg=name)


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
