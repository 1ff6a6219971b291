#!/usr/bin/env python
"""Leave a working Detectron2 (and panopticapi) in the active Python environment.

Three routes, tried in this order:

1. A ``detectron2`` that already imports and works (for example a build from upstream source with
   the compiled C++/CUDA ops) is left untouched.
2. ``--source PATH_OR_GIT_URL`` (or ``$GBW_DETECTRON2_SOURCE``) installs that source with pip, as
   upstream documents; this builds the C++/CUDA extension ``detectron2._C``.
3. Otherwise the v0.6 release is installed from the package registry, where it is published as
   ``pb1-detectron2==0.6`` (the upstream v0.6 Python sources without the C++ sources). The sdist is
   downloaded, checked against its sha256, and rebuilt into a pure-Python ``detectron2`` wheel:

   * the C++ extension is left out and ``detectron2._C`` becomes a placeholder module whose ops raise
     an error naming the op and how to get the compiled build (only deformable convolution, rotated
     boxes, rotated RoIAlign and the fast COCO box evaluator use them);
   * names removed from current Pillow (``Image.LINEAR``) and NumPy (``np.int``, ``np.float``,
     ``np.bool``, ``np.object``, ``np.str``) are renamed to their current equivalents (its
     ``model_zoo`` imports ``pkg_resources``, as upstream's does: pyproject.toml pins a setuptools
     that still ships it);
   * the model-zoo configs are packaged.

   The wheel is cached (``$GBW_CACHE_DIR``, default ``~/.cache/gbw_panoptic``), so a second
   environment installs it without downloading or building again. The installed copy is never
   edited in place.

panopticapi is handled the same way: an existing install is kept, otherwise the registry's
``panopticapi-lite`` (the same code as upstream's ``panopticapi`` package) is installed.

Running the script twice changes nothing the second time.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Dict, List, Optional

try:
    import tomllib
except ModuleNotFoundError:  # Python < 3.11
    tomllib = None

REPO_ROOT = Path(__file__).resolve().parents[1]
# Bump when the rebuild recipe below changes, so cached wheels are rebuilt.
RECIPE_VERSION = "2"
LOCAL_VERSION_SUFFIX = f"+pb1.noext{RECIPE_VERSION}"
SOURCE_ENV = "GBW_DETECTRON2_SOURCE"

# Shown by every op of the placeholder ``detectron2._C``.
PLACEHOLDER_MODULE = '''\
"""Placeholder for Detectron2's compiled C++/CUDA ops.

This Detectron2 was installed by gbw-panoptic's tools/install_detectron2.py from the package
registry without its C++ extension. Everything written in Python works; the few compiled ops
(deformable convolution, rotated boxes / RoIAlign, the fast COCO box evaluator) raise an error.
"""

IS_PLACEHOLDER = True


class MissingCompiledOpError(RuntimeError):
    """Raised when a compiled Detectron2 op is used in a build without the C++ extension."""


def __getattr__(name):
    if name.startswith("__") and name.endswith("__"):
        raise AttributeError(name)
    raise MissingCompiledOpError(
        f"detectron2._C.{name} is a compiled C++/CUDA op, and this Detectron2 was installed "
        "without its C++ extension (registry build from pb1-detectron2==0.6). To use it, install "
        "Detectron2 from upstream source, which compiles the ops: "
        "python tools/install_detectron2.py --source "
        "git+https://github.com/facebookresearch/detectron2.git "
        "(or: python -m pip install --no-build-isolation "
        "'git+https://github.com/facebookresearch/detectron2.git')."
    )
'''

# (pattern, replacement) applied to every .py file of the sdist.
SOURCE_RENAMES = [
    (re.compile(r"\bImage\.LINEAR\b"), "Image.BILINEAR"),
    (re.compile(r"\bnp\.(int|float|bool|object|str)\b"), r"\1"),
]

# Run in a subprocess: imports what this project uses and exercises a Pillow- and a
# NumPy-dependent code path, then prints a JSON line.
PROBE = r'''
import json, importlib
info = {"ok": False}
try:
    import detectron2
    info["version"] = detectron2.__version__
    info["path"] = detectron2.__path__[0]
    for name in ("detectron2.layers", "detectron2.projects.panoptic_deeplab",
                 "detectron2.evaluation", "detectron2.utils.visualizer",
                 "detectron2.data.transforms", "detectron2.model_zoo"):
        importlib.import_module(name)
    from detectron2.structures.masks import polygons_to_bitmask
    polygons_to_bitmask([], 4, 4)
    import detectron2._C as C
    info["compiled_ops"] = not getattr(C, "IS_PLACEHOLDER", False)
    info["ok"] = True
except Exception as e:
    info["error"] = f"{type(e).__name__}: {e}"
print("PROBE" + json.dumps(info))
'''


def log(message: str) -> None:
    print(f"[install_detectron2] {message}", flush=True)


def run(cmd: List[str], **kwargs) -> subprocess.CompletedProcess:
    log("$ " + " ".join(cmd))
    return subprocess.run(cmd, check=True, **kwargs)


def pip(*args: str) -> None:
    run([sys.executable, "-m", "pip", *args])


def probe_detectron2() -> Dict:
    """Import Detectron2 in a fresh interpreter and report whether it works."""
    out = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True)
    for line in out.stdout.splitlines():
        if line.startswith("PROBE"):
            return json.loads(line[len("PROBE"):])
    return {"ok": False, "error": (out.stderr or out.stdout).strip()[-2000:]}


def probe_panopticapi() -> bool:
    code = "import panopticapi.evaluation, panopticapi.utils"
    return subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def project_settings() -> Dict[str, str]:
    """The registry pins from ``[tool.gbw_panoptic]`` of pyproject.toml (the one place of pins)."""
    defaults = {
        "detectron2-registry": "pb1-detectron2==0.6",
        "detectron2-registry-sha256": "",
        "panopticapi-registry": "panopticapi-lite==0.2.0",
    }
    pyproject = REPO_ROOT / "pyproject.toml"
    if tomllib is not None and pyproject.is_file():
        with open(pyproject, "rb") as f:
            defaults.update(tomllib.load(f).get("tool", {}).get("gbw_panoptic", {}))
    return defaults


def cache_dir() -> Path:
    root = os.environ.get("GBW_CACHE_DIR") or Path.home() / ".cache" / "gbw_panoptic"
    path = Path(root) / "wheels"
    path.mkdir(parents=True, exist_ok=True)
    return path


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pip_config() -> Dict[str, str]:
    """pip's configuration as ``pip config list`` prints it: ``{"global.index-url": ..., ...}``,
    environment variables as ``":env:.index-url"``."""
    out = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True)
    config = {}
    for line in out.stdout.splitlines():
        key, separator, value = line.partition("=")
        if separator:
            config[key.strip()] = value.strip().strip("'\"")
    return config


def pip_default_index() -> str:
    """The index pip uses when none is configured, read from pip itself."""
    code = "from pip._internal.models.index import PyPI; print(PyPI.simple_url)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    if out.returncode != 0 or not out.stdout.strip():
        raise SystemExit(
            "cannot read pip's default package index from this pip; configure one: "
            "pip config set global.index-url URL (or set PIP_INDEX_URL)"
        )
    return out.stdout.strip()


def package_indexes() -> List[str]:
    """The simple-index (PEP 503) URLs pip installs from, in pip's order: its index URL, then its
    extra index URLs, from the environment (``PIP_INDEX_URL``, ``PIP_EXTRA_INDEX_URL``) or pip's
    configuration files (``install`` section, then ``global``); pip's default index when no index
    URL is configured."""
    config = pip_config()

    def setting(name: str) -> Optional[str]:
        for scope in (":env:", "install", "global"):
            if config.get(f"{scope}.{name}"):
                return config[f"{scope}.{name}"]
        return None

    index = setting("index-url") or pip_default_index()
    return [index, *(setting("extra-index-url") or "").split()]


def _page_of(page_url: str) -> str:
    """The URL to read for a simple-index page: a local index folder's ``index.html``, as pip reads it."""
    parsed = urllib.parse.urlparse(page_url)
    if parsed.scheme == "file":
        folder = Path(urllib.request.url2pathname(parsed.path))
        if folder.is_dir():
            return (folder / "index.html").as_uri()
    return page_url


def find_sdist(name: str, wanted: str) -> str:
    """URL of the file ``wanted`` on the simple-index page of ``name`` of the first of pip's package
    indexes (:func:`package_indexes`) that lists it."""
    pages = []
    for index in package_indexes():
        page_url = f"{index.rstrip('/')}/{name}/"
        pages.append(page_url)
        try:
            with urllib.request.urlopen(_page_of(page_url), timeout=60) as response:
                page = response.read().decode("utf-8")
        except (OSError, ValueError) as error:  # not on this index (HTTP 404, missing folder...)
            log(f"{page_url}: {error}")
            continue
        links = [urllib.parse.urljoin(page_url, href) for href in re.findall(r'href="([^"]+)"', page)]
        matches = [link for link in links if urllib.parse.urlparse(link).path.endswith("/" + wanted)]
        if matches:
            return matches[0].split("#")[0]
    raise SystemExit(f"{wanted} is not listed on any of pip's package indexes: {', '.join(pages)}")


def download_sdist(requirement: str, expected_sha256: str, dest: Path) -> Path:
    """Download the sdist of ``requirement`` (``name==version``) from pip's package indexes.

    ``pip download`` cannot be used: it refuses the sdist because its metadata declares a direct
    URL dependency (panopticapi, in the ``all`` extra). The simple-index pages (PEP 503) of the
    indexes pip is configured with are read instead and the archive is verified against the
    pinned sha256.
    """
    name, version = requirement.split("==")
    wanted = f"{name}-{version}.tar.gz"
    log(f"looking up {requirement} on pip's package indexes")
    url = find_sdist(name, wanted)
    dest.mkdir(parents=True, exist_ok=True)
    archive = dest / wanted
    log(f"downloading {wanted}")
    with urllib.request.urlopen(url, timeout=300) as response:
        archive.write_bytes(response.read())
    actual = sha256_of(archive)
    if expected_sha256 and actual != expected_sha256:
        raise SystemExit(
            f"{wanted}: sha256 {actual} does not match the pinned {expected_sha256} "
            "(pyproject.toml [tool.gbw_panoptic] detectron2-registry-sha256)"
        )
    return archive


def patch_sources(src: Path) -> Dict[str, int]:
    """Rebuild recipe applied to the extracted sdist; returns the count of renames per file."""
    changed: Dict[str, int] = {}
    for py in sorted(src.rglob("*.py")):
        if py.name == "setup.py" and py.parent == src:
            continue
        text = py.read_text(encoding="utf-8")
        total = 0
        for pattern, replacement in SOURCE_RENAMES:
            text, n = pattern.subn(replacement, text)
            total += n
        if total:
            py.write_text(text, encoding="utf-8")
            changed[str(py.relative_to(src))] = total
    (src / "detectron2" / "_C.py").write_text(PLACEHOLDER_MODULE, encoding="utf-8")

    setup_py = src / "setup.py"
    setup = setup_py.read_text(encoding="utf-8")
    replacements = [
        ('name="pb1-detectron2"', 'name="detectron2"'),
        ("ext_modules=get_extensions(),", "ext_modules=[],"),
        (
            'package_data={"detectron2.model_zoo": get_model_zoo_configs()},',
            'package_data={"detectron2.model_zoo": ["configs/**/*.yaml", "configs/**/*.py"]},',
        ),
    ]
    for old, new in replacements:
        if old not in setup:
            raise SystemExit(f"setup.py of the sdist does not contain {old!r}; recipe is out of date")
        setup = setup.replace(old, new)
    setup_py.write_text(setup, encoding="utf-8")
    return changed


def build_registry_wheel(requirement: str, expected_sha256: str) -> Path:
    """Build (or reuse from the cache) the pure-Python Detectron2 wheel from the registry sdist."""
    key = (expected_sha256 or requirement)[:16]
    target = cache_dir() / f"detectron2-{key}-recipe{RECIPE_VERSION}"
    wheels = sorted(target.glob("detectron2-*.whl")) if target.is_dir() else []
    if wheels:
        log(f"using the cached wheel {wheels[0]}")
        return wheels[0]
    with tempfile.TemporaryDirectory(prefix="gbw_d2_") as tmp:
        tmp_path = Path(tmp)
        archive = download_sdist(requirement, expected_sha256, tmp_path / "sdist")
        with tarfile.open(archive) as tar:
            tar.extractall(tmp_path / "src", filter="data")
        (src,) = [p for p in (tmp_path / "src").iterdir() if (p / "setup.py").is_file()]
        changed = patch_sources(src)
        for name, count in changed.items():
            log(f"renamed {count} removed API name(s) in {name}")
        log("placeholder detectron2/_C.py written; C++ extension left out of the build")
        staging = tmp_path / "wheel"
        env = dict(os.environ, D2_VERSION_SUFFIX=LOCAL_VERSION_SUFFIX)
        run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
             "--wheel-dir", str(staging), str(src)], env=env)
        (wheel,) = staging.glob("detectron2-*.whl")
        target.mkdir(parents=True, exist_ok=True)
        final = target / wheel.name
        shutil.move(str(wheel), str(final) + ".partial")
        os.replace(str(final) + ".partial", final)
        return final


def install_detectron2(source: Optional[str], force: bool) -> None:
    settings = project_settings()
    if source:
        log(f"installing Detectron2 from {source} (builds the C++/CUDA ops)")
        pip("install", "--no-build-isolation", source)
    else:
        status = probe_detectron2()
        if status["ok"] and not force:
            ops = "compiled" if status["compiled_ops"] else "placeholder, not compiled"
            log(f"detectron2 {status['version']} already works ({status['path']}; C++ ops: {ops}); "
                "nothing to do")
            return
        if not status["ok"] and "version" in status:
            log(f"the installed detectron2 does not work ({status['error']}); replacing it")
        wheel = build_registry_wheel(settings["detectron2-registry"],
                                     settings["detectron2-registry-sha256"])
        pip("install", "--force-reinstall", "--no-deps", str(wheel))
        # Its pure-Python dependencies, resolved by pip (most are pinned in pyproject.toml).
        pip("install", str(wheel))
    status = probe_detectron2()
    if not status["ok"]:
        raise SystemExit(f"detectron2 still does not work after installing: {status['error']}")
    ops = "compiled" if status["compiled_ops"] else "placeholder, not compiled"
    log(f"detectron2 {status['version']} works (C++ ops: {ops})")


def install_panopticapi() -> None:
    if probe_panopticapi():
        log("panopticapi already works; nothing to do")
        return
    requirement = project_settings()["panopticapi-registry"]
    # panopticapi-lite declares numpy<2 and scikit-image, which its code never imports; its real
    # needs (numpy, Pillow) are already installed with the project.
    pip("install", "--no-deps", requirement)
    if not probe_panopticapi():
        raise SystemExit(f"panopticapi does not import after installing {requirement}")
    log(f"panopticapi installed from {requirement}")


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument(
        "--source", default=os.environ.get(SOURCE_ENV),
        help="a Detectron2 source to install with pip instead of the registry build: a local "
             "checkout or a git URL such as git+https://github.com/facebookresearch/detectron2.git "
             f"(default: ${SOURCE_ENV})")
    parser.add_argument("--force", action="store_true",
                        help="reinstall the registry build even if a working detectron2 exists")
    parser.add_argument("--skip-panopticapi", action="store_true", help="leave panopticapi alone")
    args = parser.parse_args(argv)
    if not args.skip_panopticapi:
        install_panopticapi()  # first: Detectron2's evaluation package imports it
    install_detectron2(args.source, args.force)


if __name__ == "__main__":
    main()
