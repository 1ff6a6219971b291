"""Training with several processes: one step of two processes with one image per domain equals one step
of one process with two (batch norm over the whole batch with MODEL.SYNC_BN, over each process's share
without); each UDA method runs to the end, stops on a signal and resumes in two processes; the batch
split checked before any process starts; DDP searches for unused parameters exactly for the models and
methods whose passes leave some out."""
import fcntl
import json
import math
import os
import signal
from pathlib import Path
from typing import Dict, List, Sequence

import pytest
import torch

from gbw_panoptic.gbw.losses import _ClassWeighting
from gbw_panoptic.uda import UDATrainer, cli, dacs, launch
from gbw_panoptic.uda.output_lock import unlock_output_dir
from gbw_panoptic.uda.runner import StudentForward, StudentRunner, needs_unused_parameter_search
from gbw_panoptic.uda.signals import TrainingInterrupted
from test_robustness import _SignalDuringIteration
from test_uda_training import _args, _metrics

# One step of 2 + 2 images. Without randomness that depends on the process: no dropout, a fixed
# ClassMix (the even classes of each source image) and no colour augmentation (their draws come from
# each process's generator), and batch norm statistics over the whole batch (MODEL.SYNC_BN).
EQUIVALENCE = [
    "SOLVER.MAX_ITER", "1",
    "DATASETS.TEST", "()",
    "SOLVER.IMS_PER_BATCH", "2",
    "DATASETS.TARGET_IMS_PER_BATCH", "2",
    "MODEL.SEM_SEG_HEAD.DROPOUT", "0.0",
    "MODEL.INS_EMBED_HEAD.DROPOUT", "0.0",
    "MODEL.SYNC_BN", "True",
]  # fmt: skip


def _train_one_step(repo_root: str, output_dir: str, config: str, extra: Sequence[str] = ()) -> Dict[str, object]:
    """One training step of ``config`` with :data:`EQUIVALENCE` and ``extra`` in this process (one of a
    launched group or alone): the GBW class weights of every loss call, the step's losses, the student's
    gradients before the optimizer step, its parameters and buffers (batch norm statistics) after it."""

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
        cfg = cli.setup(_args(Path(repo_root), output_dir, config, extra=[*EQUIVALENCE, *extra]))
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
    buffers = {name: b.clone() for name, b in trainer.model.named_buffers()}
    return {"weights": weights, "losses": losses, "gradients": gradients, "parameters": parameters, "buffers": buffers}


# Config -> GBW loss calls of one step (sem_seg, center, offset on the source batch; DACS: and the mixed
# batch). AdvSeg and MinEnt also exercise DDP's unused parameter search (their target pass).
EQUIVALENCE_CONFIGS = {
    "mit_b0_source_only_gbw.yaml": 3,
    "dacs_gbw.yaml": 6,
    "advseg_gbw.yaml": 3,
    "minent_gbw.yaml": 3,
}


# The step of this config also runs without MODEL.SYNC_BN (result "per_process").
PER_PROCESS_CONFIG = "mit_b0_source_only_gbw.yaml"


def _uneven_shares() -> Dict[str, List[torch.Tensor]]:
    """Inputs of a 4-channel batch norm, split over 2 processes in shares of other sizes (2 x 4 x 5 x 6 and
    1 x 4 x 7 x 6), the gradients of its outputs alike, and its affine parameters."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(2, 4, 5, 6), (1, 4, 7, 6)]
    return {
        "inputs": [torch.randn(shape, generator=generator) * 3 + 1 for shape in shapes],
        "output_grads": [torch.randn(shape, generator=generator) for shape in shapes],
        "affine": [torch.randn(4, generator=generator), torch.randn(4, generator=generator)],
    }


def _uneven_batch_norm(rank: int) -> Dict[str, torch.Tensor]:
    """This process's forward and backward of :class:`WholeBatchNorm2d` on its share of :func:`_uneven_shares`:
    output, input gradient, its part of the affine parameters' gradients, running statistics."""
    from gbw_panoptic.modeling.batch_norm import WholeBatchNorm2d

    shares = _uneven_shares()
    norm = WholeBatchNorm2d(4)
    with torch.no_grad():
        norm.weight.copy_(shares["affine"][0])
        norm.bias.copy_(shares["affine"][1])
    x = shares["inputs"][rank].clone().requires_grad_()
    output = norm(x)
    output.backward(shares["output_grads"][rank])
    return {"output": output.detach(), "input_grad": x.grad, "weight_grad": norm.weight.grad,
            "bias_grad": norm.bias.grad, **dict(norm.named_buffers())}  # fmt: skip


def _one_step_worker(repo_root: str, output_dir: str) -> None:
    """Runs in each launched process: :func:`_train_one_step` of each of :data:`EQUIVALENCE_CONFIGS` and of
    :data:`PER_PROCESS_CONFIG` without MODEL.SYNC_BN, and :func:`_uneven_batch_norm`, saved as
    ``{config, "per_process" or "uneven_batch_norm"}.rank{R}.pt``."""
    from detectron2.utils import comm

    steps = [(config, config, ()) for config in EQUIVALENCE_CONFIGS]
    steps.append(("per_process", PER_PROCESS_CONFIG, ("MODEL.SYNC_BN", "False")))
    for name, config, extra in steps:
        result = _train_one_step(repo_root, os.path.join(output_dir, name), config, extra)
        torch.save(result, os.path.join(output_dir, f"{name}.rank{comm.get_rank()}.pt"))
    rank = comm.get_rank()
    torch.save(_uneven_batch_norm(rank), os.path.join(output_dir, f"uneven_batch_norm.rank{rank}.pt"))


@pytest.fixture(scope="module")
def two_process_steps(two_processes) -> Dict[str, List[Dict[str, object]]]:
    """The results of :func:`_one_step_worker` in each of the 2 launched processes, by config, ``"per_process"``
    and ``"uneven_batch_norm"``."""
    output_dir = two_processes / "steps"
    return {
        name: [torch.load(output_dir / f"{name}.rank{rank}.pt", weights_only=False) for rank in range(2)]
        for name in [*EQUIVALENCE_CONFIGS, "per_process", "uneven_batch_norm"]
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
    # Batch norm's running statistics (and every other buffer) are those of the whole batch.
    assert ranks[0]["buffers"].keys() == one["buffers"].keys()
    for name, reference in one["buffers"].items():
        for rank in ranks:
            torch.testing.assert_close(rank["buffers"][name], reference, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.slow
def test_without_sync_bn_each_process_normalises_its_own_image(two_process_steps) -> None:
    """MODEL.SYNC_BN False: each process's batch norm statistics are those of its image. The ASPP's first
    layers see the same inputs in both runs (the encoder holds no batch statistics), so there the mean of
    the two processes' running means is the whole batch's, which MODEL.SYNC_BN gives every process."""
    synced = two_process_steps[PER_PROCESS_CONFIG][0]["buffers"]
    ranks = [rank["buffers"] for rank in two_process_steps["per_process"]]
    layers = [name[: -len(".running_var")] for name in synced if name.endswith(".running_var")]
    first = [name for name in layers if name.endswith((".aspp.0.norm", ".depthwise.norm"))]
    assert len(layers) > len(first) > 0
    for layer in layers:
        assert not torch.allclose(ranks[0][f"{layer}.running_var"], ranks[1][f"{layer}.running_var"]), layer
    for layer in first:
        mean = (ranks[0][f"{layer}.running_mean"] + ranks[1][f"{layer}.running_mean"]) / 2
        torch.testing.assert_close(mean, synced[f"{layer}.running_mean"], rtol=1e-4, atol=1e-6, msg=layer)
        assert not torch.allclose(ranks[0][f"{layer}.running_mean"], synced[f"{layer}.running_mean"]), layer


@pytest.mark.slow
def test_whole_batch_norm_over_shares_of_other_sizes_is_batch_norm_of_the_whole_batch(two_process_steps) -> None:
    """The reference: ``nn.BatchNorm2d`` in one process on every pixel of both shares, as one 1 x 4 x N x 1
    batch (batch norm reduces over the batch and pixels alike)."""
    shares, ranks = _uneven_shares(), two_process_steps["uneven_batch_norm"]

    def pixels(tensors: List[torch.Tensor]) -> torch.Tensor:
        return torch.cat([t.transpose(0, 1).reshape(4, -1) for t in tensors], dim=1)[None, :, :, None]

    reference = torch.nn.BatchNorm2d(4)
    with torch.no_grad():
        reference.weight.copy_(shares["affine"][0])
        reference.bias.copy_(shares["affine"][1])
    x = pixels(shares["inputs"]).requires_grad_()
    output = reference(x)
    output.backward(pixels(shares["output_grads"]))
    sizes = [t[:, 0].numel() for t in shares["inputs"]]
    for rank, share, result in zip(range(2), shares["inputs"], ranks):
        for name, whole in (("output", output.detach()), ("input_grad", x.grad)):
            expected = whole[0, :, :, 0].split(sizes, dim=1)[rank].reshape(4, share.shape[0], *share.shape[2:])
            torch.testing.assert_close(result[name], expected.transpose(0, 1), rtol=1e-5, atol=1e-5, msg=name)
        for name, buffer in reference.named_buffers():
            torch.testing.assert_close(result[name], buffer, rtol=1e-5, atol=1e-6, msg=name)
    for name, parameter in reference.named_parameters():  # each process's part is its share's
        total = ranks[0][f"{name}_grad"] + ranks[1][f"{name}_grad"]
        torch.testing.assert_close(total, parameter.grad, rtol=1e-5, atol=1e-5, msg=name)


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


# Method -> synthetic config and its overrides for the runs of 2 processes (1 + 1 images each), 3
# iterations, batch norm over the whole batch.
METHOD_RUNS = {
    "source_only": ("mit_b0_source_only_gbw.yaml", []),
    "dacs": ("dacs_gbw.yaml", []),
    "advent": ("advent_gbw.yaml", []),
    "advseg": ("advseg_gbw.yaml", []),
    "minent": ("minent_gbw.yaml", []),
    "hrda": (
        "hrda_panoptic_dacs_gbw.yaml",
        ["MODEL.HRDA.DETAIL_CROP_SIZE", "[32, 32]", "MODEL.HRDA.ATTENTION_EMBED_DIM", "16"],
    ),
}
RUN = ["SOLVER.MAX_ITER", "3", "SOLVER.CHECKPOINT_PERIOD", "100", "DATASETS.TEST", "()", "MODEL.SYNC_BN", "True"]
# The methods whose resumed run is compared with an uninterrupted one, as their single-process tests do.
COMPARED_WITH_UNINTERRUPTED = ("dacs", "hrda")


def _method_runs_worker(repo_root: str, output_dir: str) -> None:
    """Runs in each launched process, for each of :data:`METHOD_RUNS`: a run stopped by a SIGTERM that only
    process 1 receives, at iteration 1 (``interrupted``; what ended it saved as ``stop.rank{R}.json``), that
    run resumed to the end and, for :data:`COMPARED_WITH_UNINTERRUPTED`, the run without interruption
    (``straight``)."""
    from detectron2.utils import comm

    rank = comm.get_rank()
    for method, (config, extra) in METHOD_RUNS.items():

        def args(name: str, flags: Sequence[str] = ()):
            output = os.path.join(output_dir, method, name)
            return _args(Path(repo_root), output, config, extra=[*RUN, *extra], flags=flags)

        if method in COMPARED_WITH_UNINTERRUPTED:
            cli.main(args("straight"))
        cfg = cli.setup(args("interrupted"))
        trainer = UDATrainer(cfg)
        if rank == 1:
            trainer.register_hooks([_SignalDuringIteration(1, signal.SIGTERM)])
        trainer.resume_or_load(resume=False)
        stop = {"stopped": None}
        try:
            trainer.train()
        except TrainingInterrupted as e:
            stop = {"stopped": str(e), "checkpoint": e.checkpoint}
        with open(os.path.join(output_dir, method, f"stop.rank{rank}.json"), "w") as f:
            json.dump(stop, f)
        cli.main(args("interrupted", flags=["--resume"]))


@pytest.fixture(scope="module")
def two_process_runs(two_processes) -> Path:
    """The folder of :func:`_method_runs_worker`'s runs in the 2 launched processes."""
    return two_processes / "runs"


def _two_process_worker(repo_root: str, output_dir: str, datasets_root: str) -> None:
    """Runs in each launched process: :func:`_one_step_worker` in ``output_dir/steps``, then
    :func:`_method_runs_worker` in ``output_dir/runs`` (one launch: the processes start, import the package
    and join their group once)."""
    from gbw_panoptic.data.datasets import register_all

    register_all(datasets_root)
    for name, worker in (("steps", _one_step_worker), ("runs", _method_runs_worker)):
        folder = os.path.join(output_dir, name)
        os.makedirs(folder, exist_ok=True)
        worker(repo_root, folder)


@pytest.fixture(scope="module")
def two_processes(synthetic_datasets, tmp_path_factory, worker_id) -> Path:
    """The folder in which :func:`_two_process_worker` ran in 2 launched processes, once per test session even
    when several pytest-xdist workers run tests that need it: the first launches, the others wait on a file
    lock and read the same folder."""
    repo_root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    # With xdist, the parent of a worker's base folder is the session's, shared by all its workers.
    name = "two_processes"
    folder = tmp_path_factory.getbasetemp().parent / name if worker_id != "master" else tmp_path_factory.mktemp(name)
    with open(f"{folder}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
        if not (folder / "launched").exists():
            folder.mkdir(exist_ok=True)
            launch(_two_process_worker, 2, dist_url="auto", args=(repo_root, str(folder), str(synthetic_datasets)))
            (folder / "launched").touch()
    return folder


def _assert_same_checkpoint(expected_path: Path, actual_path: Path) -> None:
    """Student, UDA method (teacher, discriminator) and optimizer moments of two checkpoints are equal."""
    expected, actual = (torch.load(p, map_location="cpu", weights_only=False) for p in (expected_path, actual_path))
    for part, state_expected, state_actual in (
        ("model", expected["model"], actual["model"]),
        ("method", expected["trainer"]["method"], actual["trainer"]["method"]),
        ("optimizer", expected["trainer"]["optimizer"]["state"], actual["trainer"]["optimizer"]["state"]),
    ):
        assert state_expected.keys() == state_actual.keys(), part
        for key, value in state_expected.items():
            torch.testing.assert_close(state_actual[key], value, rtol=1e-5, atol=1e-6, msg=f"{part} {key}")


@pytest.mark.slow
@pytest.mark.parametrize("method", METHOD_RUNS)
def test_each_method_runs_stops_and_resumes_in_two_processes(two_process_runs, method) -> None:
    runs = two_process_runs / method
    # The signal reached process 1 alone; both stopped after the same iteration, and the main process
    # wrote its checkpoint.
    stops = [json.loads((runs / f"stop.rank{rank}.json").read_text()) for rank in range(2)]
    assert all(stop["stopped"].startswith("SIGTERM: training stopped after iteration 1 of 3") for stop in stops), stops
    assert [os.path.basename(stop["checkpoint"]) for stop in stops] == ["model_0000001.pth"] * 2
    # Resumed at iteration 2, nothing replayed, to the end.
    losses = [r for r in _metrics(runs / "interrupted") if "total_loss" in r]
    assert [r["iteration"] for r in losses] == [0, 1, 2]
    assert all(math.isfinite(r["total_loss"]) for r in losses)
    assert (runs / "interrupted" / "last_checkpoint").read_text() == "model_final.pth"
    if method in COMPARED_WITH_UNINTERRUPTED:
        _assert_same_checkpoint(runs / "straight" / "model_final.pth", runs / "interrupted" / "model_final.pth")
