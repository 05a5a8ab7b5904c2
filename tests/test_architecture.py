"""The layering in pyproject.toml's import-linter contracts holds, and a wrong arrow breaks it."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
LINT_IMPORTS = str(Path(sys.executable).parent / "lint-imports")


def lint_imports(root: Path) -> subprocess.CompletedProcess:
    # PYTHONPATH first: the scratch copy's package shadows the installed (editable) one
    env = {**os.environ, "PYTHONPATH": str(root)}
    return subprocess.run([LINT_IMPORTS, "--config", str(root / "pyproject.toml"), "--no-cache"], cwd=root,
                          env=env, capture_output=True, text=True, timeout=120)


def test_the_tree_keeps_its_layers():
    result = lint_imports(REPO)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 broken" in result.stdout


def scratch_copy_with(root: Path, module: str, line: str) -> Path:
    """A copy of the package and its contracts under `root`, with `line` added to `module` (a path)."""
    shutil.copytree(REPO / "embedstore", root / "embedstore", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(REPO / "pyproject.toml", root)
    changed = root / "embedstore" / module
    changed.write_text(changed.read_text() + f"\n{line}\n")
    return root


def test_an_upward_import_breaks_the_layers(tmp_path):
    result = lint_imports(scratch_copy_with(tmp_path, "store/schema.py", "from embedstore.cli.render import out"))
    assert result.returncode != 0
    assert "BROKEN" in result.stdout
    assert "embedstore.store.schema -> embedstore.cli.render" in result.stdout


def test_torch_in_the_store_breaks_its_contract(tmp_path):
    result = lint_imports(scratch_copy_with(tmp_path, "store/info.py", "import torch"))
    assert result.returncode != 0
    assert "embedstore.store is not allowed to import torch" in result.stdout
