"""The code passes its linters: ruff (lint and format) and mypy, as configured in pyproject.toml.

They run as tests so that the README's one test command (and so CI) runs them. Without ruff or
mypy installed (``pip install -e .[test]`` installs both) they skip, except in CI
(``LPLR_REQUIRE_SERVICES=1``), where that fails.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from _services import require_service

ROOT = Path(__file__).resolve().parent.parent
#: What the linters check: the package, its tests, benchmarks, pipelines and the setup script.
PATHS = ["lplr_dask", "tests", "benchmarks", "pipelines", "dev.py"]


def _tool(name: str) -> str:
    exe = Path(sys.executable).parent / name
    found = str(exe) if exe.exists() else shutil.which(name)
    if found is None:
        require_service(f"{name} is not installed (pip install -e .[test])")
    return found


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)


def test_ruff_lint_is_clean():
    r = _run(_tool("ruff"), "check", *PATHS)
    assert r.returncode == 0, r.stdout + r.stderr


def test_ruff_format_is_clean():
    r = _run(_tool("ruff"), "format", "--check", *PATHS)
    assert r.returncode == 0, "run `ruff format` on:\n" + r.stdout + r.stderr


@pytest.mark.slow
def test_mypy_is_clean():
    r = _run(_tool("mypy"))
    assert r.returncode == 0, r.stdout + r.stderr
