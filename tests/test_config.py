"""The ``lplr:`` keys of the Dask configuration: defaults from ``lplr_dask/lplr.yaml``; the user's win."""

from __future__ import annotations

import importlib.resources
import json
import os
import subprocess
import sys
from pathlib import Path

import dask
import pytest
import yaml

import lplr_dask  # noqa: F401  (loads the defaults, as any use of the package does)
from lplr_dask import config, progress

REPO = Path(__file__).resolve().parent.parent
YAML = yaml.safe_load((importlib.resources.files("lplr_dask") / "lplr.yaml").read_text())

#: The defaults that the code had before they moved into lplr.yaml.
DEFAULTS = {
    "lplr.max-rank": 4096,  # new with issue 15: the largest rank a budget or a fair rank sets
    "lplr.progress.interval": "30s",
    "lplr.cluster.connect-timeout": "30s",
    "lplr.cluster.worker-timeout": "600s",
    "lplr.cluster.no-workers-timeout": "120s",
    "lplr.chunking.max-tasks": 20000,
    "lplr.central.in-process-bytes": "1GiB",  # new with issue 16: the steps between the passes in the client
    "lplr.array.max-bytes": "256MiB",  # new with issue 18: np.asarray(factors) reconstructs up to this
}


def _leaves(mapping: dict, prefix: str = "") -> dict[str, object]:
    """``{"a": {"b": 1}}`` as ``{"a.b": 1}``."""
    flat: dict[str, object] = {}
    for key, value in mapping.items():
        if isinstance(value, dict):
            flat.update(_leaves(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _python(code: str, tmp_path: Path, **env: str) -> str:
    """Run `code` in a fresh interpreter that sees no Dask settings but `env`; its stdout."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DASK_")}
    clean["PYTHONPATH"] = os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])
    clean["DASK_CONFIG"] = str(tmp_path)  # the user's config directory: only what a test puts there
    r = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env={**clean, **env}, cwd=tmp_path
    )
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_the_yaml_holds_the_lplr_keys_and_their_old_defaults():
    assert set(YAML) == {"lplr"}
    assert _leaves(YAML) == DEFAULTS
    assert config.defaults == YAML


def test_the_yaml_keys_are_dask_defaults_after_import(tmp_path):
    registered = dask.config.merge(*dask.config.defaults)
    assert _leaves({"lplr": registered["lplr"]}) == DEFAULTS
    # in a fresh process without settings of the user's, they are the values too
    code = "import json, dask, lplr_dask; print(json.dumps(dask.config.get('lplr')))"
    out = _python(code, tmp_path)
    assert json.loads(out) == YAML["lplr"]


def test_the_dask_cli_shows_them_once_lplr_dask_is_imported(tmp_path):
    code = (
        "import sys, lplr_dask\nfrom dask.cli import run_cli\nsys.argv = ['dask', 'config', 'get', 'lplr']\nrun_cli()\n"
    )
    assert yaml.safe_load(_python(code, tmp_path)) == YAML["lplr"]


def test_an_environment_variable_wins(tmp_path):
    code = (
        "import json, dask, lplr_dask\n"
        "from lplr_dask import progress\n"
        "print(json.dumps([dask.config.get('lplr.progress.interval'), progress.interval(),\n"
        "                  dask.config.get('lplr.cluster.no-workers-timeout'),\n"
        "                  dask.config.get('lplr.cluster.connect-timeout')]))\n"
    )
    env = {"DASK_LPLR__PROGRESS__INTERVAL": "5s", "DASK_LPLR__CLUSTER__NO_WORKERS_TIMEOUT": "2s"}
    assert json.loads(_python(code, tmp_path, **env)) == ["5s", 5.0, "2s", "30s"]


def test_max_rank_from_the_environment(tmp_path):
    code = "import lplr_dask\nfrom lplr_dask.options import configured_max_rank\nprint(configured_max_rank())\n"
    assert _python(code, tmp_path).strip() == "4096"
    assert _python(code, tmp_path, DASK_LPLR__MAX_RANK="64").strip() == "64"


def test_a_users_yaml_file_wins(tmp_path):
    (tmp_path / "mine.yaml").write_text("lplr:\n  cluster:\n    worker-timeout: 1800s\n")
    code = (
        "import dask, lplr_dask\n"
        "print(dask.config.get('lplr.cluster.worker-timeout'), dask.config.get('lplr.progress.interval'))\n"
    )
    assert _python(code, tmp_path).split() == ["1800s", "30s"]


def test_dask_config_set_wins():
    with dask.config.set({"lplr.progress.interval": "2s", "lplr.cluster.connect-timeout": "7s"}):
        assert progress.interval() == 2.0
        assert dask.config.get("lplr.cluster.connect-timeout") == "7s"
    before = os.environ.get("DASK_LPLR__CLUSTER__CONNECT_TIMEOUT", "30s")
    assert dask.config.get("lplr.cluster.connect-timeout") == before


def test_dask_config_get_lplr_from_the_dask_command():
    """`dask config get lplr` in a fresh process: Dask's CLI loads the ``dask_cli`` entry point,
    which imports the package and so its defaults; ``dask lplr`` is the lplr command."""
    import importlib.metadata
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    if not any(ep.name == "lplr" for ep in importlib.metadata.entry_points(group="dask_cli")):
        pytest.skip("lplr-dask is not installed (pip install -e .): its dask_cli entry point is absent")
    dask_exe = Path(sys.executable).parent / "dask"
    exe = str(dask_exe) if dask_exe.exists() else shutil.which("dask")
    assert exe, "the dask command comes with dask"
    r = subprocess.run([exe, "config", "get", "lplr.progress.interval"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "30s", (r.stdout, r.stderr)
    r = subprocess.run([exe, "lplr", "--version"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.startswith("lplr "), (r.stdout, r.stderr)
