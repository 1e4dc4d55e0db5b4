#!/usr/bin/env bash
# Start a single-node SLURM "cluster" on this machine, for tests and demos.
#
# Run as root. Idempotent: if the node is already up and idle, it only says so.
#   cluster/slurm/start-single-node.sh            # install if needed, configure, start, wait
#   cluster/slurm/stop-single-node.sh             # stop the daemons
#
# What it does
#   1. installs the Debian packages slurmctld slurmd slurm-client munge slurm-wlm-torque if any
#      is missing (apt-get update first); slurm-wlm-torque provides the PBS/Torque commands
#      qsub, qstat, qdel (and pbsnodes) as wrappers over SLURM, so that cluster/pbs/compress.pbs
#      and dask-jobqueue's PBSCluster can be run here (the PBS command interface, not a PBS server);
#   2. writes /etc/slurm/slurm.conf for one node named after this host, with this machine's cores
#      and memory, reachable at 127.0.0.1 only, without cgroups (proctrack/linuxproc, task/none),
#      so that it also works inside containers and small VMs;
#   3. starts munged, slurmctld and slurmd (as root; this is a test node, not a production site);
#   4. waits until `sinfo` shows the node idle, or fails with the daemons' log tails.
#
# Environment (all optional)
#   SLURM_NODE_CPUS      CPUs to declare (default: nproc)
#   SLURM_NODE_MEMORY_MB RealMemory to declare in MB (default: 90% of MemTotal)
#   SLURM_OVERSUBSCRIBE  jobs that may share a core (default 4; small machines run several
#                        one-core worker jobs at once)
#   SLURM_START_TIMEOUT  seconds to wait for the node to become idle (default 60)
set -euo pipefail

log() { printf 'start-single-node: %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[[ $(id -u) -eq 0 ]] || die "must run as root (it installs packages and starts system daemons); try: sudo $0"

CONF_DIR=/etc/slurm
CONF=$CONF_DIR/slurm.conf
NODE=$(hostname -s)
CPUS=${SLURM_NODE_CPUS:-$(nproc)}
MEM_KB=$(awk '/^MemTotal:/ {print $2}' /proc/meminfo)
MEM_MB=${SLURM_NODE_MEMORY_MB:-$(( MEM_KB * 9 / 10 / 1024 ))}
OVERSUB=${SLURM_OVERSUBSCRIBE:-4}
TIMEOUT=${SLURM_START_TIMEOUT:-60}
LOG_DIR=/var/log/slurm

node_state() { sinfo --noheader --nodes="$NODE" --format='%T' 2>/dev/null | head -n1 | tr -d '*~#!%$@^-'; }
running() { pgrep -x "$1" >/dev/null 2>&1; }

# 1. packages --------------------------------------------------------------------------------
missing=()
for pkg in slurmctld slurmd slurm-client munge slurm-wlm-torque; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
done
if (( ${#missing[@]} )); then
    log "installing ${missing[*]} (apt-get update first)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || die "apt-get update failed; check the network or the apt sources"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
        || die "apt-get install ${missing[*]} failed"
fi

# Already up? Then there is nothing to do.
if running slurmctld && running slurmd && [[ $(node_state) == idle || $(node_state) == mixed || $(node_state) == allocated ]]; then
    log "already running: node $NODE is $(node_state)"
    exit 0
fi

# 2. configuration ---------------------------------------------------------------------------
mkdir -p "$CONF_DIR" "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd /run/munge /run/slurm
new_conf=$(cat <<CONF
# Written by lplr-dask cluster/slurm/start-single-node.sh: a single-node test cluster.
ClusterName=lplr
SlurmctldHost=$NODE(127.0.0.1)
AuthType=auth/munge
SlurmUser=root
SlurmdUser=root
SlurmctldPort=6817
SlurmdPort=6818
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
# No cgroups: works in containers and VMs without a delegated cgroup tree.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
MpiDefault=none
SwitchType=switch/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
ReturnToService=2
SlurmdTimeout=60
InactiveLimit=0
KillWait=10
MinJobAge=60
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP OverSubscribe=FORCE:$OVERSUB
CONF
)
if [[ ! -f $CONF ]] || [[ $(cat "$CONF") != "$new_conf" ]]; then
    log "writing $CONF (node $NODE: CPUs=$CPUS RealMemory=${MEM_MB}MB)"
    printf '%s\n' "$new_conf" > "$CONF"
fi

# 3. daemons ---------------------------------------------------------------------------------
if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating /etc/munge/munge.key"
    mkdir -p /etc/munge
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
fi
chown -R munge:munge /etc/munge /run/munge /var/lib/munge /var/log/munge 2>/dev/null || true
chmod 0700 /etc/munge; chmod 0400 /etc/munge/munge.key
if ! running munged; then
    log "starting munged"
    runuser -u munge -- /usr/sbin/munged || die "munged did not start; see /var/log/munge/munged.log"
fi
for _ in $(seq 20); do munge -n </dev/null | unmunge >/dev/null 2>&1 && break; sleep 0.5; done
munge -n </dev/null | unmunge >/dev/null 2>&1 || die "munge does not work (munge -n | unmunge failed)"

if ! running slurmctld; then
    log "starting slurmctld"
    /usr/sbin/slurmctld || die "slurmctld did not start; see $LOG_DIR/slurmctld.log"
fi
if ! running slurmd; then
    log "starting slurmd"
    /usr/sbin/slurmd -N "$NODE" || die "slurmd did not start; see $LOG_DIR/slurmd.log"
fi

# 4. wait for the node -----------------------------------------------------------------------
deadline=$(( SECONDS + TIMEOUT ))
state=""
while (( SECONDS < deadline )); do
    state=$(node_state)
    case $state in
        idle|mixed|allocated) log "SLURM is up: node $NODE is $state (sinfo)"; exit 0 ;;
        drained|draining|down|drain|fail)
            # A node left down by an earlier run (e.g. an unexpected reboot): bring it back.
            scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true ;;
    esac
    sleep 1
done
log "node $NODE did not become idle within ${TIMEOUT}s (last state: '${state:-unknown}')"
sinfo -R 2>&1 | sed 's/^/  sinfo -R: /' >&2 || true
tail -n 20 "$LOG_DIR/slurmctld.log" 2>/dev/null | sed 's/^/  slurmctld.log: /' >&2 || true
tail -n 20 "$LOG_DIR/slurmd.log" 2>/dev/null | sed 's/^/  slurmd.log: /' >&2 || true
die "SLURM did not come up; see the log lines above (set SLURM_START_TIMEOUT to wait longer)"
