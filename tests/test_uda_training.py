"""UDA training end to end on the synthetic benchmark: each method trains a few iterations through
``tools/train_net.py``'s code path, DACS internals on real batches, kill-and-resume equality, and a
2-process gloo run on the CPU."""
import json
import math
import os
import stat
import subprocess
import sys

import pytest
import torch

from detectron2.engine import HookBase, default_argument_parser

from gbw_panoptic.uda import UDATrainer, dacs, ema_alpha
from gbw_panoptic.uda.cli import main, run, setup

# Tiny settings: MiT-B0 with 32-channel decoders on 64x64 crops.
TINY = [
    "MODEL.DEVICE", "cpu",
    "MODEL.SEM_SEG_HEAD.EMBED_DIM", "32",
    "MODEL.INS_EMBED_HEAD.EMBED_DIM", "32",
    "INPUT.CROP.SIZE", "[64, 64]",
    "SOLVER.WARMUP_ITERS", "2",
    "TEST.EVAL_PERIOD", "0",
    "UDA.LOG_PERIOD", "1",
    "SEED", "7",
]  # fmt: skip


def _args(repo_root, output_dir, config="dacs_gbw.yaml", extra=(), flags=()):
    argv = [*flags, "--config-file", str(repo_root / "configs" / "synthetic" / config)]
    argv += TINY + ["OUTPUT_DIR", str(output_dir), *extra]
    return default_argument_parser().parse_args(argv)


def _metrics(output_dir):
    with open(os.path.join(output_dir, "metrics.json")) as f:
        return [json.loads(line) for line in f if line.strip()]


class _Killed(RuntimeError):
    pass


def assert_same_training_state(straight, resumed) -> None:
    """The student and the UDA method (teacher, discriminators) of two trainers hold equal state."""
    for name, modules in (("student", (straight.model, resumed.model)), ("method", (straight.method, resumed.method))):
        expected, actual = (m.state_dict() for m in modules)
        assert expected.keys() == actual.keys()
        for key in expected:
            torch.testing.assert_close(actual[key], expected[key], rtol=1e-5, atol=1e-6, msg=f"{name} {key}")


class _KillBeforeIteration(HookBase):
    """Stops training abruptly before ``iteration`` runs (as a killed process would)."""

    def __init__(self, iteration):
        self.iteration = iteration

    def before_step(self):
        if self.trainer.iter == self.iteration:
            raise _Killed(f"killed before iteration {self.iteration}")


def _train(cfg, resume: bool, kill_before=None) -> UDATrainer:
    """Train ``cfg`` (``--resume`` if ``resume``), killed before iteration ``kill_before`` if given."""
    trainer = UDATrainer(cfg)
    if kill_before is not None:
        trainer.register_hooks([_KillBeforeIteration(kill_before)])
    trainer.resume_or_load(resume=resume)
    trainer.train()
    return trainer


@pytest.mark.slow
@pytest.mark.parametrize(
    "config, losses, extra",
    [
        ("mit_b0_source_only_gbw.yaml", ["loss_center", "loss_offset"], []),
        ("dacs_gbw.yaml", ["loss_center", "loss_offset", "loss_mix_sem_seg", "loss_mix_center", "loss_mix_offset"], []),
        ("dacs.yaml", ["loss_center", "loss_mix_sem_seg"], []),
        ("advent_gbw.yaml", ["loss_center", "loss_adv"], []),
        ("minent_gbw.yaml", ["loss_offset", "loss_entropy"], []),
        # The semantic-only model (no instance head) adapted with DACS.
        ("semantic_mit_b0_source_only_gbw.yaml", ["loss_mix_sem_seg"], ["UDA.METHOD", "dacs"]),
    ],
)
def test_each_method_trains_and_logs(synthetic_datasets, repo_root, tmp_path, config, losses, extra):
    args = _args(repo_root, tmp_path, config, extra=["SOLVER.MAX_ITER", "2", "DATASETS.TEST", "()", *extra])
    main(args)
    records = [r for r in _metrics(tmp_path) if "total_loss" in r]
    assert [r["iteration"] for r in records] == [0, 1]
    for record in records:
        for name in ["loss_sem_seg", *losses]:
            assert math.isfinite(record[name]), (name, record)
    last = records[-1]
    gbw_on = config != "dacs.yaml"
    logged_weights = [k for k in last if k.startswith("gbw/source/sem_seg/")]
    assert bool(logged_weights) == gbw_on
    if "loss_mix_sem_seg" in losses:
        assert 0.0 <= last["dacs/pseudo_confidence"] <= 1.0
        assert 0.0 < last["dacs/mixed_fraction"] < 1.0
        if gbw_on:
            mixed = [last[k] for k in last if k.startswith("gbw/mixed/sem_seg/")]
            assert len(mixed) == 19 and sum(mixed) == pytest.approx(19, rel=1e-4)
    if config.startswith("advent"):
        assert math.isfinite(last["advent/disc_loss_source"]) and math.isfinite(last["advent/disc_loss_target"])
    assert (tmp_path / "model_final.pth").is_file()
    assert (tmp_path / "last_checkpoint").read_text() == "model_final.pth"
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path))


@pytest.mark.slow
def test_advseg_trains_its_discriminator_and_resumes(synthetic_datasets, repo_root, tmp_path):
    """AdvSeg with GBW through train_net's main: finite losses, the discriminator takes one Adam step per
    iteration on its poly schedule, and a resumed trainer gets its weights and optimizer back."""
    extra = ["SOLVER.MAX_ITER", "3", "SOLVER.CHECKPOINT_PERIOD", "2", "DATASETS.TEST", "()"]
    args = _args(repo_root, tmp_path, "advseg_gbw.yaml", extra=extra)
    initial = UDATrainer(setup(args)).method.discriminator.state_dict()  # main builds the same from SEED
    main(args)
    records = [r for r in _metrics(tmp_path) if "total_loss" in r]
    assert [r["iteration"] for r in records] == [0, 1, 2]
    for record in records:
        for name in ("loss_sem_seg", "loss_center", "loss_offset", "loss_adv", "advseg/disc_loss_source",
                     "advseg/disc_loss_target"):  # fmt: skip
            assert math.isfinite(record[name]), (name, record)
    assert any(k.startswith("gbw/source/sem_seg/") for k in records[-1])

    state = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=False)["trainer"]
    trained = {k[len("discriminator.") :]: v for k, v in state["method"].items() if k.startswith("discriminator.")}
    assert trained.keys() == initial.keys()
    assert all(not torch.equal(trained[k], initial[k]) for k in initial)
    adam_steps = {int(s["step"]) for s in state["method_optimizers"]["discriminator"]["state"].values()}
    assert adam_steps == {3}
    schedule = state["method_schedulers"]["discriminator"]
    assert schedule["last_epoch"] == 3 and schedule["_last_lr"] == [pytest.approx(1e-4 * (1 - 3 / 3) ** 0.9)]

    resumed = UDATrainer(setup(_args(repo_root, tmp_path, "advseg_gbw.yaml", extra=[*extra[:1], "5", *extra[2:]])))
    resumed.resume_or_load(resume=True)
    assert resumed.start_iter == 3
    for key, value in resumed.method.discriminator.state_dict().items():
        assert torch.equal(value, trained[key]), key
    assert {int(s["step"]) for s in resumed.method.disc_optimizer.state_dict()["state"].values()} == {3}


@pytest.mark.slow
def test_gbw_weights_are_written_with_the_metrics_under_their_pass(synthetic_datasets, repo_root, tmp_path):
    """DACS + GBW, metrics written every 2 of 5 iterations: each written iteration holds the class weights
    of its source and mixed passes as ``gbw/<pass>/<loss>/<class>`` (the offset loss: the thing classes),
    those of its own step, and nothing is written in between."""
    extra = ["SOLVER.MAX_ITER", "5", "UDA.LOG_PERIOD", "2", "DATASETS.TEST", "()"]
    trainer = _train(setup(_args(repo_root, tmp_path, extra=extra)), resume=False)
    records = _metrics(tmp_path)
    assert [r["iteration"] for r in records] == [1, 3, 4]
    names, things = trainer.model.class_names, trainer.model.thing_ids
    covered = (("sem_seg", range(19)), ("center", range(19)), ("offset", things))
    expected = {
        f"gbw/{run}/{loss}/{names[c]}" for run in ("source", "mixed") for loss, classes in covered for c in classes
    }
    for record in records:
        assert {k for k in record if k.startswith("gbw/")} == expected
        for run in ("source", "mixed"):
            for loss, classes in covered:
                weights = [record[f"gbw/{run}/{loss}/{names[c]}"] for c in classes]
                assert sum(weights) == pytest.approx(len(classes), rel=1e-4), (run, loss)
    # The last pass of the last step is the mixed one: its weights are the model's last.
    last_mixed = [records[-1][f"gbw/mixed/sem_seg/{name}"] for name in names]
    assert last_mixed == trainer.model.sem_seg_loss.last_weights.tolist()
    assert records[-2]["gbw/mixed/sem_seg/road"] != records[-1]["gbw/mixed/sem_seg/road"]


@pytest.mark.slow
def test_dacs_teacher_classmix_and_eval_only(synthetic_datasets, repo_root, tmp_path, monkeypatch):
    # Evaluated inside training after each iteration; written under a umask other than the usual.
    extra = ["SOLVER.MAX_ITER", "2", "TEST.EVAL_PERIOD", "1"]
    umask = os.umask(0o027)
    try:
        cfg = setup(_args(repo_root, tmp_path, extra=extra))
        trainer = UDATrainer(cfg)
        trainer.resume_or_load(resume=False)
        trainer.train()
    finally:
        os.umask(umask)
    evaluations = [r for r in _metrics(tmp_path) if "synthetic_target_panoptic_val/panoptic_seg/PQ" in r]
    assert len(evaluations) == 2  # after the first iteration and at the end
    written = [os.path.join(folder, name) for folder, _, names in os.walk(tmp_path) for name in names]
    for name in ("model_final.pth", "metrics.json", "config.yaml", "panoptic_seg.json", "sem_seg_confusion_matrix.npy"):
        assert any(path.endswith(os.sep + name) for path in written), name
    for path in written:  # checkpoints, logs, evaluation results: as a plain open creates them
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o640, path
    student, teacher = trainer.model, trainer.method.teacher.model
    student_state, teacher_state = student.state_dict(), teacher.state_dict()
    assert any(not torch.equal(v, teacher_state[k]) for k, v in student_state.items() if v.dtype.is_floating_point)
    # The teacher's parameters follow teacher = a * teacher + (1 - a) * student with the ramped coefficient.
    before_teacher = {k: v.clone() for k, v in teacher.named_parameters()}
    trainer.method.before_step(student, 2)
    alpha = ema_alpha(2, cfg.UDA.EMA_ALPHA)
    student_params = dict(student.named_parameters())
    for key, value in teacher.named_parameters():
        torch.testing.assert_close(value, alpha * before_teacher[key] + (1 - alpha) * student_params[key])

    # ClassMix on a real batch (no colour augmentation): image and labels come from the same side.
    monkeypatch.setattr(dacs, "strong_augment", lambda images, strength, probability: images)
    source_batch, target_batch = next(iter(trainer.data_loader))
    target_images = torch.stack([x["image"] for x in target_batch]).float()
    pseudo = torch.randint(0, 19, target_images[:, 0].shape)
    weights = torch.rand(pseudo.shape)
    mixed, masks = trainer.method.mixed_batch(source_batch, target_images, pseudo, weights)
    for index, record in enumerate(mixed):
        mask = masks[index]
        source = source_batch[index]
        assert torch.equal(record["image"][:, mask], source["image"].float()[:, mask])
        assert torch.equal(record["image"][:, ~mask], target_images[index][:, ~mask])
        assert torch.equal(record["sem_seg"][mask], source["sem_seg"][mask])
        assert torch.equal(record["sem_seg"][~mask], pseudo[index][~mask])
        assert torch.equal(record["sem_seg_weights"][~mask], weights[index][~mask])
        assert torch.equal(record["center_weights"][~mask], torch.zeros_like(weights[index][~mask]))

    # --eval-only on the trained checkpoint: semantic and panoptic metrics on the target val set.
    results = main(
        _args(repo_root, tmp_path, flags=["--eval-only"], extra=["MODEL.WEIGHTS", str(tmp_path / "model_final.pth")])
    )
    metrics = results["synthetic_target_panoptic_val"]
    assert "mIoU" in metrics["sem_seg"] and "PQ" in metrics["panoptic_seg"]


@pytest.mark.slow
def test_feature_distance_against_initial_weights(synthetic_datasets, repo_root, tmp_path):
    # "Pretrained" weights saved by the test; FD compares the stride-4 features on thing-class cells.
    cfg = setup(_args(repo_root, tmp_path))
    weights = tmp_path / "initial.pth"
    torch.save({"model": UDATrainer.build_model(cfg).state_dict()}, weights)
    extra = ["SOLVER.MAX_ITER", "2", "DATASETS.TEST", "()", "MODEL.WEIGHTS", str(weights), "UDA.FD.FEATURE", "res2"]
    main(_args(repo_root, tmp_path / "run", config="mit_b0_source_only_gbw.yaml", extra=extra))
    records = [r for r in _metrics(tmp_path / "run") if "total_loss" in r]
    # Iteration 0: the student is the initial encoder (distance 0); then it moves away.
    assert records[0]["loss_fd"] == 0.0
    assert records[1]["loss_fd"] > 0.0 and math.isfinite(records[1]["loss_fd"])


@pytest.mark.slow
def test_killed_and_resumed_run_equals_uninterrupted(synthetic_datasets, repo_root, tmp_path):
    def train(output_dir, resume, kill_before=None, seed="7"):
        extra = ["SOLVER.MAX_ITER", "6", "SOLVER.CHECKPOINT_PERIOD", "3", "SEED", seed]
        return _train(setup(_args(repo_root, output_dir, extra=extra)), resume, kill_before)

    straight = train(tmp_path / "straight", resume=False)
    with pytest.raises(_Killed):
        train(tmp_path / "resumed", resume=False, kill_before=4)
    assert (tmp_path / "resumed" / "last_checkpoint").read_text() == "model_0000002.pth"
    # Resumed with another SEED: the data streams' seeds and every generator come from the
    # checkpoint, and the loaders start at step 3 without replaying steps 0-2.
    resumed = train(tmp_path / "resumed", resume=True, seed="-1")
    assert resumed.start_iter == 3
    assert [stream.start_step for stream in resumed.data_loader.streams] == [3, 3]
    assert [stream.seed for stream in resumed.data_loader.streams] == [
        stream.seed for stream in straight.data_loader.streams
    ]

    assert_same_training_state(straight, resumed)


@pytest.mark.slow
def test_two_process_gloo_run_on_cpu(synthetic_datasets, repo_root, tmp_path):
    command = [
        sys.executable, str(repo_root / "tools" / "train_net.py"), "--num-gpus", "2", "--dist-url", "auto",
        "--config-file", str(repo_root / "configs" / "synthetic" / "dacs_gbw.yaml"),
        *TINY, "OUTPUT_DIR", str(tmp_path), "SOLVER.MAX_ITER", "2", "DATASETS.TEST", "()",
    ]  # fmt: skip
    env = dict(os.environ, DETECTRON2_DATASETS=str(synthetic_datasets), OMP_NUM_THREADS="1")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    log = (tmp_path / "log.txt").read_text()
    assert "World size: 2" in log
    records = [r for r in _metrics(tmp_path) if "total_loss" in r]
    assert [r["iteration"] for r in records] == [0, 1] and all(math.isfinite(r["total_loss"]) for r in records)
    assert (tmp_path / "model_final.pth").is_file()
    checkpoint = torch.load(tmp_path / "model_final.pth", map_location="cpu", weights_only=False)
    assert len(checkpoint["trainer"]["rng_states"]) == 2  # one RNG state per process


def _report_world(output_dir, config_file, datasets_root):
    """Runs in each launched process: writes what this process sees of the distributed setup."""
    from detectron2.config import get_cfg
    from detectron2.utils import comm
    import torch.distributed as dist

    from gbw_panoptic.config import add_gbw_panoptic_config
    from gbw_panoptic.data import build_uda_train_loader
    from gbw_panoptic.data.datasets import register_all

    register_all(datasets_root)
    cfg = get_cfg()
    add_gbw_panoptic_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(
        ["SOLVER.IMS_PER_BATCH", "4", "DATASETS.TARGET_IMS_PER_BATCH", "2", "INPUT.CROP.SIZE", "[64, 64]"]
    )
    source_batch, target_batch = next(iter(build_uda_train_loader(cfg)))
    report = {
        "rank": comm.get_rank(),
        "local_rank": comm.get_local_rank(),
        "world_size": comm.get_world_size(),
        "local_size": comm.get_local_size(),
        "backend": dist.get_backend(),
        "source_images": len(source_batch),
        "target_images": len(target_batch),
    }
    with open(os.path.join(output_dir, f"rank{comm.get_rank()}.json"), "w") as f:
        json.dump(report, f)


@pytest.mark.slow
def test_launch_gloo_processes_and_batch_semantics(synthetic_datasets, repo_root, tmp_path):
    from gbw_panoptic.uda import launch

    config_file = str(repo_root / "configs" / "synthetic" / "dacs_gbw.yaml")
    args = (str(tmp_path), config_file, str(synthetic_datasets))
    launch(_report_world, 2, dist_url="auto", args=args, backend="gloo")
    reports = sorted((json.loads(p.read_text()) for p in tmp_path.glob("rank*.json")), key=lambda r: r["rank"])
    assert [(r["rank"], r["local_rank"]) for r in reports] == [(0, 0), (1, 1)]
    for report in reports:
        assert report["world_size"] == 2 and report["local_size"] == 2 and report["backend"] == "gloo"
        # Batch sizes are totals over all processes.
        assert report["source_images"] == 2 and report["target_images"] == 1
