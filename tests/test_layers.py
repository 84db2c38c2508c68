"""The package's layers and the absence of import circles, as pyproject.toml's import-linter contracts state them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def lint_imports() -> str:
    found = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if found is None:
        pytest.skip("import-linter is not installed (it is in the dev extra)")
    return found


def test_import_contracts_hold():
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([lint_imports(), "--no-cache"], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "2 kept, 0 broken" in proc.stdout


def test_an_upward_import_breaks_the_layers(tmp_path):
    """The contracts can fail: a copy of the package where the data layer imports the pipeline is refused."""
    shutil.copytree(REPO / "src" / "alignloop", tmp_path / "alignloop")
    (tmp_path / "pyproject.toml").write_text((REPO / "pyproject.toml").read_text(encoding="utf-8"), encoding="utf-8")
    with (tmp_path / "alignloop" / "data" / "io.py").open("a", encoding="utf-8") as fh:
        fh.write("\nimport alignloop.pipeline  # noqa: E402,F401\n")
    env = {**os.environ, "PYTHONPATH": str(tmp_path)}
    proc = subprocess.run([lint_imports(), "--no-cache"], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode != 0
    assert "alignloop.data is not allowed to import alignloop.pipeline" in proc.stdout
