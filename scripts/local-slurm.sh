#!/usr/bin/env bash
# A real single-node Slurm cluster on loopback, for tests and local use.
#
#   bash scripts/local-slurm.sh [start]   install (if missing), configure, start; idempotent
#   bash scripts/local-slurm.sh stop      stop slurmd and slurmctld (munged is left running)
#   bash scripts/local-slurm.sh status    show daemons and sinfo
#
# Needs root on Debian/Ubuntu (apt-get). Accounting (slurmdbd/sacct) is NOT set up:
# use squeue / `scontrol show job` (harness/launch/slurm.py) for job state.
#
# Environment overrides: SLURM_PARTITION (default debug), SLURM_START_TIMEOUT (s, default 60).
set -euo pipefail

CONF_DIR=/etc/slurm
CONF="$CONF_DIR/slurm.conf"
STATE_DIR=/var/spool/slurmctld
SPOOL_DIR=/var/spool/slurmd
LOG_DIR=/var/log/slurm
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid
PARTITION="${SLURM_PARTITION:-debug}"
START_TIMEOUT="${SLURM_START_TIMEOUT:-60}"
NODE="$(hostname -s)"

log() { echo "local-slurm: $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

# True if the pid in file $1 is alive and runs command $2.
pid_alive() {
    local pidfile=$1 name=$2 pid
    [[ -s $pidfile ]] || return 1
    pid=$(<"$pidfile")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    [[ -r /proc/$pid/comm && $(</proc/"$pid"/comm) == "$name" ]]
}

install_packages() {
    local missing=()
    command -v slurmctld >/dev/null 2>&1 && command -v slurmd >/dev/null 2>&1 \
        && command -v sinfo >/dev/null 2>&1 || missing+=(slurm-wlm)
    command -v munged >/dev/null 2>&1 || missing+=(munge)
    ((${#missing[@]} == 0)) && return 0
    [[ $(id -u) -eq 0 ]] || die "need root to install ${missing[*]}"
    command -v apt-get >/dev/null 2>&1 || die "apt-get not found; install ${missing[*]} by hand"
    # Refresh the package lists only if apt does not know a candidate for every package.
    local pkg need_update=0
    for pkg in "${missing[@]}"; do
        # (no `| grep -q`: with pipefail, grep's early exit makes the pipe fail)
        if [[ $(apt-cache policy "$pkg" 2>/dev/null) != *"Candidate: "[0-9]* ]]; then
            need_update=1
        fi
    done
    if ((need_update)); then
        log "apt-get update"
        apt-get update -qq
    fi
    log "installing ${missing[*]}"
    if ! DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${missing[@]}" >/dev/null; then
        ((need_update)) && die "apt-get install ${missing[*]} failed"
        log "install failed with the cached package lists: apt-get update and retry"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
            "${missing[@]}" >/dev/null || die "apt-get install ${missing[*]} failed"
    fi
}

start_munge() {
    mkdir -p /run/munge /var/lib/munge /var/log/munge /etc/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    chmod 0755 /run/munge
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating /etc/munge/munge.key"
        if command -v mungekey >/dev/null 2>&1; then
            mungekey --create --keyfile=/etc/munge/munge.key
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1024 count=1 status=none
        fi
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        # A stale pid/socket from a dead munged makes it refuse to start.
        if ! pid_alive /run/munge/munged.pid munged; then
            rm -f /run/munge/munged.pid /run/munge/munge.socket.2 /run/munge/munge.socket.2.lock
        fi
        runuser -u munge -- /usr/sbin/munged
        local i
        for i in $(seq 1 50); do
            munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
            sleep 0.1
        done
        munge -n | unmunge >/dev/null || die "munged does not answer"
    fi
}

# RealMemory: available memory less 20% (at least 1 GiB) headroom, rounded down to whole GiB.
# MemAvailable drifts (page cache), so keep the value already configured while it still fits
# and is not far below the fresh one: a changed slurm.conf means restarting the daemons.
real_memory_mb() {
    local avail_mb mb headroom old=""
    avail_mb=$(($(awk '/^MemAvailable:/ {print $2}' /proc/meminfo) / 1024))
    headroom=$((avail_mb / 5))
    ((headroom < 1024)) && headroom=1024
    mb=$(((avail_mb - headroom) / 1024 * 1024))
    ((mb < 512)) && mb=512
    if [[ -f $CONF ]]; then
        old=$(sed -n 's/^NodeName=.* RealMemory=\([0-9][0-9]*\).*/\1/p' "$CONF" | head -n1)
    fi
    if [[ -n $old ]] && ((old <= avail_mb && old * 4 >= mb * 3)); then
        mb=$old
    fi
    echo "$mb"
}

render_conf() {
    local cpus mem
    cpus=$(nproc)
    mem=$(real_memory_mb)
    cat <<EOF
# Written by scripts/local-slurm.sh: single-node cluster on loopback. Edits are overwritten.
ClusterName=localcluster
SlurmctldHost=${NODE}(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
# cred_expire also sets how long a requeued job waits before it may start again
# (default 120 s); keep requeue (submitit preemption/checkpoint) tests quick.
AuthInfo=cred_expire=20
CryptoType=crypto/munge
MpiDefault=none
SwitchType=switch/none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
StateSaveLocation=${STATE_DIR}
SlurmdSpoolDir=${SPOOL_DIR}
SlurmctldPidFile=${CTLD_PID}
SlurmdPidFile=${SLURMD_PID}
SlurmctldLogFile=${LOG_DIR}/slurmctld.log
SlurmdLogFile=${LOG_DIR}/slurmd.log
SlurmctldPort=6817
SlurmdPort=6818
ReturnToService=2
# Finished jobs stay visible in squeue/scontrol for 10 min (no accounting here).
MinJobAge=600
JobRequeue=1
# Short kill wait: submitit ignores SIGTERM, so scancel/timeouts would otherwise take 30 s.
KillWait=5
InactiveLimit=0
Waittime=0
# Quick scheduling so tests do not wait for the periodic passes.
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=2,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without a default, a job without --mem would get the whole node's memory.
DefMemPerCPU=1024
# Deliver --signal (e.g. submitit's USR2@90) on preemption too, not only near the time limit.
SlurmctldParameters=preempt_send_user_signal
NodeName=${NODE} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem} State=UNKNOWN
# OverSubscribe=FORCE:4 lets up to 4 jobs share each core, so 1-CPU jobs (array tasks)
# run side by side on a small machine.
PartitionName=${PARTITION} Nodes=${NODE} Default=YES MaxTime=INFINITE OverSubscribe=FORCE:4 State=UP
EOF
}

write_conf() {
    # Prints "changed" if the file was (re)written.
    mkdir -p "$CONF_DIR" "$STATE_DIR" "$SPOOL_DIR" "$LOG_DIR"
    local new
    new=$(render_conf)
    if [[ -f $CONF ]] && [[ "$(<"$CONF")" == "$new" ]]; then
        return 0
    fi
    printf '%s\n' "$new" >"$CONF.tmp"
    mv "$CONF.tmp" "$CONF"
    echo changed
}

stop_daemon() {
    local pidfile=$1 name=$2 pid i
    pid_alive "$pidfile" "$name" || { rm -f "$pidfile"; return 0; }
    pid=$(<"$pidfile")
    kill "$pid" 2>/dev/null || true
    for i in $(seq 1 100); do
        [[ -d /proc/$pid ]] || break
        sleep 0.1
    done
    if [[ -d /proc/$pid ]]; then
        log "$name ($pid) did not stop, sending SIGKILL"
        kill -9 "$pid" 2>/dev/null || true
    fi
    rm -f "$pidfile"
}

node_state() { sinfo -h -n "$NODE" -o '%T' 2>/dev/null | head -n1; }

wait_for_node() {
    local deadline=$((SECONDS + START_TIMEOUT)) state="" i=0
    while ((SECONDS < deadline)); do
        state=$(node_state || true)
        case "$state" in
            idle | mixed | allocated | completing) return 0 ;;
            drain* | down* | fail* | inval*)
                # Left DOWN/DRAIN by an earlier run (or slurmd restarted): put it back.
                # Retried every 2 s: it is refused while slurmd has not registered yet.
                if ((i % 4 == 0)); then
                    scontrol update nodename="$NODE" state=resume >/dev/null 2>&1 || true
                fi
                ;;
        esac
        i=$((i + 1))
        sleep 0.5
    done
    die "node $NODE not idle after ${START_TIMEOUT}s (state: '${state:-none}'); see $LOG_DIR/slurmctld.log and $LOG_DIR/slurmd.log, and 'scontrol show node $NODE' for the Reason"
}

cmd_start() {
    [[ $(id -u) -eq 0 ]] || die "must run as root"
    install_packages
    start_munge
    local changed
    changed=$(write_conf)
    if [[ -n $changed ]] && { pid_alive "$CTLD_PID" slurmctld || pid_alive "$SLURMD_PID" slurmd; }; then
        log "slurm.conf changed: restarting daemons"
        stop_daemon "$SLURMD_PID" slurmd
        stop_daemon "$CTLD_PID" slurmctld
    fi
    if ! pid_alive "$CTLD_PID" slurmctld; then
        # Daemonizes itself; keeps saved state (jobs, node state) across restarts.
        slurmctld || die "slurmctld failed to start; see $LOG_DIR/slurmctld.log"
    fi
    if ! pid_alive "$SLURMD_PID" slurmd; then
        slurmd || die "slurmd failed to start; see $LOG_DIR/slurmd.log"
    fi
    wait_for_node
    local part
    part=$(sinfo -h -o '%P %c %m %T' -n "$NODE" | head -n1)
    echo "local-slurm: up: node $NODE, partition/cpus/mem(MB)/state: $part; sacct disabled"
}

cmd_stop() {
    [[ $(id -u) -eq 0 ]] || die "must run as root"
    stop_daemon "$SLURMD_PID" slurmd
    stop_daemon "$CTLD_PID" slurmctld
    echo "local-slurm: stopped slurmd and slurmctld (munged left running)"
}

cmd_status() {
    local rc=0
    if pid_alive /run/munge/munged.pid munged; then echo "munged:    running"; else echo "munged:    stopped"; fi
    if pid_alive "$CTLD_PID" slurmctld; then echo "slurmctld: running ($(<"$CTLD_PID"))"; else echo "slurmctld: stopped"; rc=1; fi
    if pid_alive "$SLURMD_PID" slurmd; then echo "slurmd:    running ($(<"$SLURMD_PID"))"; else echo "slurmd:    stopped"; rc=1; fi
    if command -v sinfo >/dev/null 2>&1; then sinfo 2>&1 || rc=1; fi
    return $rc
}

case "${1:-start}" in
    start) cmd_start ;;
    stop) cmd_stop ;;
    status) cmd_status ;;
    *) echo "usage: $0 [start|stop|status]" >&2; exit 2 ;;
esac
