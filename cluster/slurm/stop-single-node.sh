#!/usr/bin/env bash
# Stop the single-node SLURM started by cluster/slurm/start-single-node.sh.
#
# Run as root. Cancels this node's jobs, then stops slurmd, slurmctld and munged (in that order),
# waiting up to 20 s for each to exit. Leaves packages and /etc/slurm/slurm.conf in place, so
# start-single-node.sh starts it again in seconds. Idempotent: stopping what is not running is fine.
set -euo pipefail

log() { printf 'stop-single-node: %s\n' "$*" >&2; }
[[ $(id -u) -eq 0 ]] || { log "ERROR: must run as root; try: sudo $0"; exit 1; }

if command -v scancel >/dev/null && pgrep -x slurmctld >/dev/null; then
    scancel --full --nodelist="$(hostname -s)" 2>/dev/null || true
fi

stop() {
    local name=$1
    local pids
    pids=$(pgrep -x "$name" || true)
    if [[ -z $pids ]]; then
        log "$name is not running"
        return
    fi
    log "stopping $name (pid $pids)"
    # shellcheck disable=SC2086  # several pids are several arguments
    kill -TERM $pids 2>/dev/null || true
    for _ in $(seq 40); do
        pgrep -x "$name" >/dev/null || return 0
        sleep 0.5
    done
    log "$name did not exit after SIGTERM; sending SIGKILL"
    # shellcheck disable=SC2086
    kill -KILL $pids 2>/dev/null || true
}

stop slurmd
stop slurmctld
stop munged
