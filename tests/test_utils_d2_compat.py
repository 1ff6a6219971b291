"""The Detectron2 compatibility module: the local process group and the loss metrics."""
import json
import subprocess
import sys

from detectron2.utils.events import EventStorage


def test_local_process_group_gives_detectron2_the_local_rank(tmp_path):
    """In a one-process gloo group, Detectron2's local rank and size need the group the module creates."""
    script = (
        "import json, torch.distributed as dist\n"
        "from detectron2.utils import comm\n"
        "from gbw_panoptic.utils.d2_compat import create_local_process_group\n"
        f"dist.init_process_group('gloo', init_method='file://{tmp_path / 'rendezvous'}', world_size=1, rank=0)\n"
        "create_local_process_group(1)\n"
        "print(json.dumps([comm.get_local_rank(), comm.get_local_size()]))\n"
        "dist.destroy_process_group()\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    assert json.loads(result.stdout.splitlines()[-1]) == [0, 1]


def test_loss_metrics_are_written_to_the_event_storage():
    import torch

    from gbw_panoptic.utils import d2_compat

    losses = {"loss_a": torch.tensor(1.5), "loss_b": torch.tensor(0.25)}
    with EventStorage(7) as storage:
        d2_compat.write_loss_metrics(losses, 0.125, 7)
        latest = storage.latest()
    assert latest["total_loss"][0] == 1.75 and latest["data_time"][0] == 0.125
