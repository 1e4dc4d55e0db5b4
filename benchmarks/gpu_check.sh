#!/usr/bin/env bash
# The GPU check of issue 7, in one command on a GPU machine (an H100/H200 node with Python 3.12,
# CuPy, numpy, scipy, psutil and msgpack, but no dask, distributed or zarr, and no network):
#
#   1. is a CUDA GPU usable through CuPy? (else exit 3 at once: nothing is installed or measured)
#   2. install the carried wheels from .whl/ into $LPLR_GPU_SITE (default /tmp/site)
#   3. the `gpu` tests: python3 -m pytest -m gpu tests/test_backend.py
#   4. benchmarks/gpu_bench.py: GPU against CPU on the same data, GB/s, ratios, errors
#
# Run from a copy of the repository with .whl/ beside it (see benchmarks/RESULTS.md, "## GPU").
# Every step has a time limit; the whole check stays under 4 minutes. Arguments go to
# gpu_bench.py (e.g. --gb 4). With $OUT set, the log and gpu_bench.json are written there.
# Exit status: 0 all passed; 1 the tests or the bench failed; 3 no GPU; 4 the wheels are missing.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
SITE=${LPLR_GPU_SITE:-/tmp/site}
BUDGET=230  # seconds for the whole check
start=$SECONDS
if [ -n "${OUT:-}" ]; then
    mkdir -p "$OUT"
    exec > >(tee "$OUT/gpu_check.log") 2>&1
fi
step() { echo "== $* (at $((SECONDS - start)) s)"; }
fail() { echo "gpu_check: $*" >&2; }

step "1/4 a CUDA GPU through CuPy"
if ! timeout 60 "$PY" - <<'EOF'
import sys
try:
    import cupy
    count = cupy.cuda.runtime.getDeviceCount()
except Exception as e:  # ImportError, or CUDA's own errors without a driver or device
    sys.exit(f"gpu_check: no usable CUDA GPU here: {type(e).__name__}: {e}. This check needs a GPU "
             "machine with CuPy; nothing was installed or measured.")
if count < 1:
    sys.exit("gpu_check: CuPy sees no CUDA GPU (check nvidia-smi and CUDA_VISIBLE_DEVICES); nothing was measured.")
props = cupy.cuda.runtime.getDeviceProperties(0)
name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
print(f"{count} GPU(s); device 0: {name}, {props['totalGlobalMem'] / 2**30:.0f} GiB; "
      f"cupy {cupy.__version__}, CUDA runtime {cupy.cuda.runtime.runtimeGetVersion()}; python {sys.version.split()[0]}")
EOF
then
    exit 3
fi

step "2/4 install the carried wheels into $SITE"
shopt -s nullglob
wheels=(.whl/*.whl)
if [ ${#wheels[@]} -eq 0 ]; then
    fail "no wheels in .whl/: download them as benchmarks/RESULTS.md (## GPU) says, and carry .whl"
    exit 4
fi
install() {  # pip when the machine has it, else unpack the wheels (zip files) directly
    if "$PY" -m pip --version >/dev/null 2>&1; then
        timeout 90 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" "$@"
    else
        local w
        for w in "$@"; do timeout 30 "$PY" -m zipfile -e "$w" "$SITE" || return 1; done
    fi
}
if ! install "${wheels[@]}"; then
    fail "could not install the wheels in .whl/ (made for CPython 3.12 on manylinux x86_64)"
    exit 4
fi
if ! "$PY" -c 'import sys, numpy; sys.exit(int(numpy.__version__.split(".")[0]) < 2)'; then
    echo "numpy < 2 here; zarr 3 needs numpy 2: installing .whl/numpy"
    install .whl/numpy/*.whl || { fail "could not install .whl/numpy"; exit 4; }
fi
export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
timeout 60 "$PY" -c 'import numpy, dask, distributed, zarr, numcodecs, lplr_dask
print("numpy", numpy.__version__, "dask", dask.__version__, "distributed", distributed.__version__,
      "zarr", zarr.__version__, "numcodecs", numcodecs.__version__)' || { fail "the installed packages do not import"; exit 4; }

status=0
step "3/4 the gpu tests"
if ! timeout 100 "$PY" -m pytest -m gpu -q -p no:cacheprovider tests/test_backend.py; then
    fail "the gpu tests failed (or took over 100 s); the bench runs anyway"
    status=1
fi

left=$((BUDGET - (SECONDS - start)))
step "4/4 the compress benchmark, GPU against CPU (${left} s left)"
if [ "$left" -lt 30 ]; then
    fail "under 30 s left for the benchmark; skipped"
    exit 1
fi
if ! timeout "$left" "$PY" benchmarks/gpu_bench.py "$@"; then
    fail "the benchmark failed (exit 1: GPU and CPU errors differ by more than 2%; 124: out of time)"
    status=1
fi
step "done, status $status"
exit $status
