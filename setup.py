"""Build step of slicreg: the shipped weights go into the wheel. Everything else is declared in setup.cfg.

The repository keeps its weights bundles in ``weights/`` (beside the code, each with its model card). A wheel
carries the default bundle (``DEFAULT_BUNDLE`` of slicreg/bundle.py) as package data, ``slicreg/weights/<name>/``,
so that an installed slicreg registers with no download and no clone (:func:`slicreg.bundle.default_bundle_path`
looks there first, then in the clone's ``weights/``). An editable install copies nothing: the clone's ``weights/``
is found as it is."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


def default_bundle_name() -> str:
    """``DEFAULT_BUNDLE`` as written in slicreg/bundle.py (read as text: building must not import torch)."""
    text = (ROOT / "slicreg" / "bundle.py").read_text(encoding="utf-8")
    found = re.search(r'^DEFAULT_BUNDLE\s*=\s*"([^"]+)"', text, flags=re.MULTILINE)
    if found is None:
        raise RuntimeError("slicreg/bundle.py: DEFAULT_BUNDLE = \"...\" not found; the wheel needs its weights")
    return found.group(1)


class BuildPyWithWeights(build_py):
    """``build_py`` that also copies ``weights/<DEFAULT_BUNDLE>/`` to ``<build>/slicreg/weights/<DEFAULT_BUNDLE>/``."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return
        name = default_bundle_name()
        source = ROOT / "weights" / name
        if not (source / "SHA256SUMS").is_file():
            raise RuntimeError(f"{source}: the default weights bundle is missing (a wheel without weights cannot "
                               f"register); check out the repository with its weights/ folder")
        target = Path(self.build_lib) / "slicreg" / "weights" / name
        if target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True)
        for item in sorted(source.iterdir()):
            if item.is_file():
                self.copy_file(str(item), str(target / item.name))


setup(cmdclass={"build_py": BuildPyWithWeights})
