"""The tree passes the linter: unused imports, undefined names and import order (pyproject [tool.ruff])."""

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_ruff_is_clean() -> None:
    ruff = Path(sys.executable).parent / "ruff"
    trees = ["sharegpt4v", "tests", "bench", "serving", "components", "pipelines"]
    result = subprocess.run([str(ruff), "check", *trees], cwd=ROOT, capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
