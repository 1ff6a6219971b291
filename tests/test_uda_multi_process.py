"""Training with several processes: the batch split checked before any process starts."""
import pytest

from gbw_panoptic.uda import cli


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
