#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for the `slurm` tests and for trying the Dask +
# SLURMCluster engine: `scripts/slurm-local.sh start|stop|status`.
#   start: installs Debian's slurm-wlm and munge if missing (needs root and apt), writes a minimal
#          slurm.conf under $SLURM_LOCAL_DIR (default /tmp/astra-slurm) for this host with all its
#          cores in partition "debug", starts munged, slurmctld and slurmd, waits for the node.
#   stop:  cancels every job, stops the three daemons it started (by their pid files).
# Plain processes, no systemd or cgroups (proctrack/linuxproc, task/none): it works in containers.
set -euo pipefail

DIR="${SLURM_LOCAL_DIR:-/tmp/astra-slurm}"
CONF="$DIR/slurm.conf"
HOST="$(hostname -s)"
export SLURM_CONF="$CONF"

install() {
    if command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null; then
        return
    fi
    if [ "$(id -u)" != 0 ]; then
        echo "slurm-local: slurm-wlm and munge are not installed and installing them needs root" >&2
        exit 1
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
}

write_conf() {
    mkdir -p "$DIR/state" "$DIR/spool" "$DIR/log" "$DIR/run"
    local cpus mem
    cpus="$(nproc)"
    mem="$(awk '/MemTotal/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)"
    cat > "$CONF" <<CONF
ClusterName=astra-local
SlurmctldHost=$HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldPort=${SLURM_LOCAL_CTLD_PORT:-6817}
SlurmdPort=${SLURM_LOCAL_D_PORT:-6818}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
MpiDefault=none
ReturnToService=2
SchedulerType=sched/backfill
InactiveLimit=0
KillWait=5
MinJobAge=60
SlurmctldTimeout=30
SlurmdTimeout=30
NodeName=$HOST CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF
    # slurm.conf is also looked for in /etc/slurm by commands that ignore SLURM_CONF (srun from
    # inside jobs reads the daemon's copy): link it when nothing else is there.
    if [ ! -e /etc/slurm/slurm.conf ] && [ -w /etc/slurm ]; then ln -s "$CONF" /etc/slurm/slurm.conf; fi
}

start_munge() {
    if [ -S /run/munge/munge.socket.2 ] && munge -n >/dev/null 2>&1; then return; fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge 2>/dev/null || true
    if [ ! -s /etc/munge/munge.key ]; then
        dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
    fi
    chown munge:munge /etc/munge/munge.key && chmod 0400 /etc/munge/munge.key
    runuser -u munge -- /usr/sbin/munged --force
    for _ in $(seq 50); do munge -n >/dev/null 2>&1 && return; sleep 0.1; done
    echo "slurm-local: munged did not start" >&2
    exit 1
}

alive() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
    install
    write_conf
    start_munge
    alive "$DIR/run/slurmctld.pid" || slurmctld -f "$CONF"
    alive "$DIR/run/slurmd.pid" || slurmd -f "$CONF"
    for _ in $(seq 60); do
        state="$(sinfo -h -n "$HOST" -o %t 2>/dev/null || true)"
        case "$state" in
            idle*|mix*|alloc*) echo "slurm-local: node $HOST $state (partition debug, $(nproc) CPUs)"; return ;;
            down*|drain*) scontrol update nodename="$HOST" state=resume 2>/dev/null || true ;;
        esac
        sleep 1
    done
    echo "slurm-local: node $HOST did not come up (state '${state:-none}'); logs in $DIR/log" >&2
    tail -n 20 "$DIR/log/slurmctld.log" "$DIR/log/slurmd.log" >&2 || true
    exit 1
}

stop() {
    if [ -f "$CONF" ]; then scancel --user="$(id -un)" 2>/dev/null || true; fi
    for daemon in slurmd slurmctld; do
        pidfile="$DIR/run/$daemon.pid"
        if alive "$pidfile"; then
            pid="$(cat "$pidfile")"
            kill "$pid"
            for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        fi
    done
    if [ -f /run/munge/munged.pid ] && kill -0 "$(cat /run/munge/munged.pid)" 2>/dev/null; then
        kill "$(cat /run/munge/munged.pid)"
    fi
    echo "slurm-local: stopped"
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    status) sinfo -h 2>/dev/null || { echo "slurm-local: not running"; exit 1; } ;;
    *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
