"""What every command line prints before it does anything: train_net's help, and no warnings on start."""
import subprocess
import sys

import pytest


def test_train_net_help_names_every_uda_method():
    from gbw_panoptic.uda.cli import EPILOG
    from gbw_panoptic.uda.method import uda_method_names

    words = EPILOG.replace(",", " ").split()
    assert [name for name in uda_method_names() if name not in words] == []
    assert "AdvSeg" in EPILOG


@pytest.mark.slow  # a fresh interpreter imports PyTorch and Detectron2
def test_start_prints_no_torch_jit_script_warnings(repo_root):
    """fvcore (imported by Detectron2) scripts two functions at import; current PyTorch warns about each."""
    code = "import sys, gbw_panoptic.modeling; print('fvcore.nn.focal_loss' in sys.modules)"
    result = subprocess.run(
        [sys.executable, "-W", "default", "-c", code], capture_output=True, text=True, timeout=120, cwd=repo_root
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "True"  # the warnings' source was imported
    assert "torch.jit.script" not in result.stderr
