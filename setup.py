"""Package list for setuptools (metadata lives in pyproject.toml).

The repository keeps ``datamodules/`` and ``callbacks/`` next to ``mmembed/`` (the layout is part of the design), but
installs them as ``mmembed.datamodules`` and ``mmembed.callbacks`` (``[tool.setuptools.package-dir]`` in
pyproject.toml): generic top-level names would collide with other projects in site-packages. pyproject.toml alone
cannot list packages found by ``find_packages`` *and* mapped ones, hence this file.
"""

from setuptools import find_packages, setup

setup(packages=[*find_packages(include=["mmembed", "mmembed.*"]), "mmembed.datamodules", "mmembed.callbacks"])
