"""Packaging and architecture: one ``omx`` namespace, and imports that go one way."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
LAYERS = {"runtime": "runtime", "functions": "functions", "mesh": "mesh", "storage": "storage", "cli": "cli"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(out), str(ROOT)], check=True, capture_output=True, timeout=300)
    return next(out.glob("omx-*.whl"))


def test_wheel_installs_only_the_omx_namespace(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {n.split("/")[0] for n in names if not n.split("/")[0].endswith((".dist-info", ".data"))}
    assert top == {"omx"}
    for layer in LAYERS:
        assert f"omx/{layer}/__init__.py" in names
    entry_points = next(n for n in names if n.endswith("entry_points.txt"))
    text = zipfile.ZipFile(wheel).read(entry_points).decode()
    assert "omx = omx.cli.main:main" in text and "ollama-distributed = omx.cli.main:main" in text


def test_wheel_ships_the_dashboard(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    shipped = {f"omx/runtime/web/{p.name}" for p in (ROOT / "runtime" / "web").iterdir()
               if p.suffix in (".html", ".js", ".css")}
    assert "omx/runtime/web/index.html" in shipped and "omx/runtime/web/main.js" in shipped
    assert shipped <= names


def _mirror_package(root: Path) -> Path:
    """Copy the layer folders into one ``root/omx`` tree laid out as the wheel lays them out.

    import-linter and mypy read the package from disk, and the folders only become
    ``omx.<layer>`` through setup.py's package_dir mapping. Returns ``root``.
    """
    mirror = root / "omx"
    shutil.copytree(ROOT / "omx", mirror, ignore=shutil.ignore_patterns("__pycache__"))
    for layer, folder in LAYERS.items():
        shutil.copytree(ROOT / folder, mirror / layer, ignore=shutil.ignore_patterns("__pycache__"))
    return root


def test_import_direction_is_enforced(tmp_path: Path) -> None:
    _mirror_package(tmp_path / "src")
    lint = Path(sys.executable).with_name("lint-imports")
    result = subprocess.run([str(lint), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
                            cwd=tmp_path, env={"PYTHONPATH": str(tmp_path / "src"), "PATH": "/usr/bin:/bin"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "KEPT" in result.stdout and "BROKEN" not in result.stdout


_FIND_CYCLES = """
import grimp

# Imports under TYPE_CHECKING name types only; every other import, at the top or in a function, counts.
graph = grimp.build_graph("omx", exclude_type_checking_imports=True)
for module in sorted(graph.modules):
    for imported in sorted(graph.find_modules_directly_imported_by(module)):
        back = graph.find_shortest_chain(importer=imported, imported=module)
        if back:
            print(" -> ".join((module, *back)))
"""


def test_no_import_cycles(tmp_path: Path) -> None:
    """No module imports one that (directly or not) imports it back, not even from inside a function."""
    _mirror_package(tmp_path / "src")
    result = subprocess.run([sys.executable, "-c", _FIND_CYCLES], cwd=tmp_path,
                            env={"PYTHONPATH": str(tmp_path / "src"), "PATH": "/usr/bin:/bin"},
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "", "import cycles:\n" + result.stdout


def test_mypy_strict_passes(tmp_path: Path) -> None:
    root = _mirror_package(tmp_path)
    mypy = Path(sys.executable).with_name("mypy")
    result = subprocess.run([str(mypy), "--strict", "--ignore-missing-imports", "--no-incremental", "-p", "omx"],
                            cwd=root, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
