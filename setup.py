"""The C extension of gbw-panoptic; everything else is declared in pyproject.toml."""
from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "gbw_panoptic.evaluation._png_runs",
            sources=["projects/gbw_panoptic/gbw_panoptic/evaluation/_png_runs.c"],
        )
    ]
)
