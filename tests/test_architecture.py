"""The import layers of docs/ARCHITECTURE.md, checked by import-linter (the contracts in pyproject.toml).

import-linter (grimp) reads the package from the file system, and pyproject's `package-dir` maps several
top-level folders into the one `sprintrt` namespace, which an editable install does not lay out on disk.
So the checks run on a copy laid out as a wheel installs it.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PYPROJECT = ROOT / "pyproject.toml"


def installed_layout(dest: Path) -> Path:
    """Copy every package's .py files to where a wheel puts them (pyproject's package-dir); returns `dest`."""
    package_dir = tomllib.loads(PYPROJECT.read_text())["tool"]["setuptools"]["package-dir"]
    for package, folder in package_dir.items():
        target = dest.joinpath(*package.split("."))
        target.mkdir(parents=True, exist_ok=True)
        for source in (ROOT / folder).glob("*.py"):
            shutil.copy2(source, target / source.name)
    return dest


def lint_imports(layout: Path) -> subprocess.CompletedProcess:
    lint = Path(sys.executable).with_name("lint-imports")
    env = dict(os.environ, PYTHONPATH=str(layout))  # the copy, ahead of the editable install
    return subprocess.run([str(lint), "--no-cache", "--no-logo", str(PYPROJECT)], capture_output=True, text=True,
                          cwd=layout, env=env, timeout=300)


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> Path:
    return installed_layout(tmp_path_factory.mktemp("layout"))


def test_the_import_contracts_hold(layout):
    r = lint_imports(layout)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Contracts: 3 kept, 0 broken." in r.stdout


@pytest.mark.parametrize("module,line,contract", [
    # the runtime learning the machine from a build module: the import issue #25 removed
    ("runtime/engine.py", "from sprintrt.engines import ort_build", "Layers"),
    # the ground floor reaching up into a layer
    ("sprintrt/specs.py", "import sprintrt.export.wrappers", "Layers"),
    # the run side importing PyTorch at module import
    ("runtime/pipeline.py", "import torch", "without PyTorch"),
    # a module the layers do not name
    ("sprintrt/helpers.py", "", "Layers"),
])
def test_a_wrong_way_import_breaks_a_contract(layout, tmp_path, module, line, contract):
    broken = tmp_path / "broken"
    shutil.copytree(layout, broken)
    package, _, name = module.rpartition("/")
    folder = "sprintrt" if package == "sprintrt" else f"sprintrt/{package}"
    path = broken / folder / name
    path.write_text((path.read_text() if path.exists() else "") + f"\n{line}\n")
    r = lint_imports(broken)
    assert r.returncode != 0 and "BROKEN" in r.stdout, r.stdout + r.stderr
    assert contract in r.stdout.split("Broken contracts")[-1], r.stdout
