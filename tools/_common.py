"""What several tools share: the machine a benchmark ran on, interleaved timing, JSON reports, and the
records of a run's ``metrics.json``. Tools import it as ``_common`` (``tools/`` is on ``sys.path`` when a
tool runs)."""
import json
import os
import platform
import time
from pathlib import Path
from typing import Callable, Dict, List, Sequence, Tuple

import torch
from tqdm import tqdm

from gbw_panoptic.utils.io import write_json

__all__ = ["cpu_name", "machine_info", "read_metrics", "time_round_robin", "write_report"]


def cpu_name() -> str:
    """The CPU model from /proc/cpuinfo where there is one, else what platform reports."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def machine_info(device: torch.device, load_before: Sequence[float], load_after: Sequence[float]) -> Dict[str, object]:
    """What a benchmark report says about the machine: device, CPUs, threads, versions, load averages."""
    return {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "loadavg_before": list(load_before),
        "loadavg_after": list(load_after),
    }


def write_report(path: str, report: Dict[str, object]) -> Path:
    """Write ``report`` as JSON to ``path`` (parents created), atomically."""
    write_json(path, report)
    return Path(path)


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_round_robin(
    paths: Dict[str, Callable[[], object]], repeats: int, warmup: int, device: torch.device, progress: tqdm
) -> Tuple[Dict[str, List[float]], Dict[str, List[float]]]:
    """Wall-clock and CPU seconds (this process, all threads) per call of each path, the paths
    interleaved repeat by repeat. On a loaded CPU the CPU seconds barely depend on the load."""
    for _ in range(warmup):
        for run in paths.values():
            run()
    wall: Dict[str, List[float]] = {name: [] for name in paths}
    cpu: Dict[str, List[float]] = {name: [] for name in paths}
    for _ in range(repeats):
        for name, run in paths.items():
            _synchronize(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            run()
            _synchronize(device)
            wall[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)
        progress.update(1)
    return wall, cpu


def read_metrics(path: Path) -> List[Dict[str, float]]:
    """The records of ``metrics.json`` (one JSON object per line), or of ``<run dir>/metrics.json``."""
    if path.is_dir():
        path = path / "metrics.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (expected a Detectron2 metrics.json or a run folder holding one)")
    records = []
    with open(path) as f:
        for number, line in enumerate(f, start=1):
            line = line.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}, line {number}: not a JSON object ({error.msg})") from None
            if "iteration" not in record:
                raise ValueError(f"{path}, line {number}: record without 'iteration'")
            records.append(record)
    return records
