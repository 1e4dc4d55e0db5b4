#!/usr/bin/env bash
# Start the services the test suite needs; .ci/run calls this as root before pytest.
#
# Today that is the single-node SLURM of cluster/slurm/start-single-node.sh, for the tests
# marked `slurm` (tests/test_slurm.py). Idempotent: an already running SLURM is left as it is.
# Without root it cannot start daemons: it says so and exits 1 when LPLR_REQUIRE_SERVICES=1
# (CI, where the slurm tests would fail anyway), 0 otherwise (they will skip).
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf 'start-services: %s\n' "$*" >&2; }

if [[ $(id -u) -ne 0 ]]; then
    say "not root: cannot start SLURM (run: sudo .ci/start-services.sh)"
    [[ ${LPLR_REQUIRE_SERVICES:-} == 1 ]] && exit 1
    exit 0
fi

say "starting the single-node SLURM (cluster/slurm/start-single-node.sh)"
cluster/slurm/start-single-node.sh
say "SLURM is up:"
sinfo >&2
