"""Print the versions this project runs on: ``python -m gbw_panoptic.env``.

Like Detectron2's ``collect_env``, but also says whether Detectron2's C++ ops are compiled or the
placeholder of the registry build, and reports the packages GBW-specific code needs.
"""
from __future__ import annotations

import importlib
import platform
import sys
from typing import List, Tuple

from tabulate import tabulate


def _version(module_name: str) -> str:
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # report, never fail: this is a diagnostic tool
        return f"not available ({type(e).__name__}: {e})"
    version = getattr(module, "__version__", None)
    if version is None:
        try:
            from importlib.metadata import version as dist_version

            version = dist_version({"panopticapi": "panopticapi-lite"}.get(module_name, module_name))
        except Exception:
            version = "installed"
    return f"{version} @ {module.__path__[0] if hasattr(module, '__path__') else module.__file__}"


def detectron2_ops_status() -> str:
    """Whether ``detectron2._C`` is the compiled extension or the registry build's placeholder."""
    try:
        import detectron2._C as compiled
    except Exception as e:
        return f"missing ({type(e).__name__}: {e})"
    if getattr(compiled, "IS_PLACEHOLDER", False):
        return "not compiled (registry build; placeholder detectron2._C)"
    return f"compiled ({compiled.__file__})"


def collect_env_info() -> List[Tuple[str, str]]:
    """Rows of (name, value) describing the environment."""
    import torch

    rows = [
        ("sys.platform", sys.platform),
        ("Python", sys.version.replace("\n", " ")),
        ("machine", platform.machine()),
        ("gbw_panoptic", _version("gbw_panoptic")),
        ("torch", _version("torch")),
        ("torchvision", _version("torchvision")),
        ("detectron2", _version("detectron2")),
        ("detectron2 C++/CUDA ops", detectron2_ops_status()),
        ("panopticapi", _version("panopticapi")),
        ("cvxopt", _version("cvxopt")),
        ("cityscapesscripts", _version("cityscapesscripts")),
        ("transformers", _version("transformers")),
        ("numpy", _version("numpy")),
        ("PIL", _version("PIL")),
        ("cv2", _version("cv2")),
        ("CUDA available", str(torch.cuda.is_available())),
        ("torch CUDA build", str(torch.version.cuda)),
    ]
    if torch.cuda.is_available():
        for index in range(torch.cuda.device_count()):
            rows.append((f"GPU {index}", torch.cuda.get_device_name(index)))
    rows.append(("CPU threads (torch)", str(torch.get_num_threads())))
    return rows


def main() -> None:
    print(tabulate(collect_env_info()))


if __name__ == "__main__":
    main()
