"""Maps the layer folders at the repository root onto the one ``omx`` namespace."""

import os

from setuptools import setup

LAYERS = {
    "omx": "omx",
    "omx.runtime": "runtime",
    "omx.functions": "functions",
    "omx.mesh": "mesh",
    "omx.storage": "storage",
    "omx.cli": "cli",
}


def _packages() -> list[str]:
    found = []
    for package, folder in LAYERS.items():
        for root, _dirs, files in os.walk(folder):
            if "__init__.py" in files and "__pycache__" not in root:
                rel = os.path.relpath(root, folder)
                found.append(package if rel == "." else package + "." + rel.replace(os.sep, "."))
    return sorted(found)


setup(packages=_packages(), package_dir=LAYERS)
