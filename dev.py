#!/usr/bin/env python3
"""Set up and run lplr-dask with nothing but python3: ``python3 dev.py demo`` or ``python3 dev.py test``.

Each command creates ``.venv`` (once) and installs the package with what it needs, then:

- ``demo``: generates a ~2 GB synthetic low-rank-plus-noise matrix as chunked Zarr under
  ``data/`` (once; reused after), compresses it on an embedded LocalCluster, measures the exact
  error, and prints a results table.
- ``test``: runs the test suite (extra arguments go to pytest).
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
EXTRAS = {"demo": "", "test": "[test,pipelines]"}


def _run(*cmd: str | os.PathLike[str], **kw) -> None:
    print("+", " ".join(map(str, cmd)), file=sys.stderr, flush=True)
    subprocess.run([str(c) for c in cmd], check=True, **kw)


def ensure_env(extras: str) -> None:
    """Create .venv and install the package with ``extras`` unless already done for this pyproject."""
    if not (BIN / "python").exists():
        venv.EnvBuilder(with_pip=True).create(VENV)
    digest = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + extras.encode()).hexdigest()[:16]
    stamp = VENV / f".installed-{digest}"
    if stamp.exists():
        return
    _run(BIN / "python", "-m", "pip", "install", "-q", "--disable-pip-version-check", "-e", f"{ROOT}{extras}")
    stamp.touch()


def demo() -> None:
    data = ROOT / "data"
    data.mkdir(exist_ok=True)
    src = data / "demo.zarr"
    lplr = BIN / "lplr"
    if not (src / "zarr.json").exists():
        _run(
            lplr,
            "generate",
            src,
            "--shape",
            "32768x16384",
            "--rank",
            "64",
            "--decay",
            "0.95",
            "--noise",
            "0.05",
            "--chunks",
            "4096x4096",
            "--seed",
            "0",
            "--overwrite",
        )
    else:
        print(f"reusing {src}", file=sys.stderr)
    _run(
        lplr, "compress", src, data / "demo.lplr.zarr", "--rank", "128", "--bits", "4", "4", "--evaluate", "--overwrite"
    )


def test(args: list[str]) -> None:
    env = dict(os.environ)
    _run(BIN / "python", "-m", "pytest", *args, cwd=ROOT, env=env)


def main() -> int:
    if len(sys.argv) < 2 or sys.argv[1] not in EXTRAS:
        print(__doc__, file=sys.stderr)
        return 2
    cmd = sys.argv[1]
    ensure_env(EXTRAS[cmd])
    try:
        demo() if cmd == "demo" else test(sys.argv[2:])
    except subprocess.CalledProcessError as e:
        return e.returncode or 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
