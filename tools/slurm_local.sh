#!/usr/bin/env bash
# A one-node Slurm cluster on this machine, for the tests marked `slurm` (CI: .ci/run):
#   tools/slurm_local.sh start   # waits until the node answers `sinfo` as idle (~20-30 s)
#   tools/slurm_local.sh stop    # ends the daemons that start started, by their pids
# Needs root and Debian's `slurm-wlm` and `munge` (apt-get install slurm-wlm munge). start
# writes /etc/slurm/slurm.conf, where every Slurm command looks for it, and refuses to
# replace one it did not write; stop removes it again. Both can be run twice.
# State, logs and the started pids live in $SLURM_LOCAL_STATE (default /var/tmp/sagan_slurm).
set -euo pipefail
state="${SLURM_LOCAL_STATE:-/var/tmp/sagan_slurm}"
conf=/etc/slurm/slurm.conf
marker="# written by tools/slurm_local.sh"
pids="$state/pids"  # "<name> <pid>" of each daemon start started

die() { echo "slurm_local.sh: $*" >&2; exit 1; }

alive() {  # alive NAME PID: the process is running and is that daemon (not a reused pid)
    [[ -r /proc/$2/comm ]] && [[ "$(cat "/proc/$2/comm")" == "$1" ]]
}

recorded() {  # recorded NAME: the pid start recorded for NAME, if that process still runs
    local name pid
    [[ -f $pids ]] || return 1
    while read -r name pid; do
        if [[ $name == "$1" ]] && alive "$name" "$pid"; then echo "$pid"; return 0; fi
    done < "$pids"
    return 1
}

from_pidfile() {  # from_pidfile NAME FILE: wait for the daemon's pid file, record its pid
    local i
    for i in $(seq 100); do
        if [[ -s $2 ]] && alive "$1" "$(cat "$2")"; then
            echo "$1 $(cat "$2")" >> "$pids"
            return 0
        fi
        sleep 0.1
    done
    die "$1 did not start; its log: ${3:-none}"
}

write_conf() {
    if [[ -e $conf ]] && ! grep -qxF "$marker" "$conf"; then
        die "$conf exists and was not written by this script: a Slurm is configured here already; leave it be"
    fi
    local node host
    node="$(slurmd -C | head -n 1)"  # NodeName=<host> CPUs=... RealMemory=...: this machine as it is
    host="$(hostname -s)"
    mkdir -p "$state/ctld" "$state/d" /etc/slurm
    cat > "$conf" <<EOF
$marker
ClusterName=sagan-local
SlurmctldHost=$host
SlurmUser=root
AuthType=auth/munge
# a requeued job waits this long before it may start again (Slurm's default: 120 s)
AuthInfo=cred_expire=5
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
# look for startable jobs (a requeued one) every 2 s, not every 30-60 s: tests wait for them
SchedulerParameters=bf_interval=2,sched_interval=2
MpiDefault=none
ReturnToService=2
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
StateSaveLocation=$state/ctld
SlurmdSpoolDir=$state/d
SlurmctldPidFile=$state/slurmctld.pid
SlurmdPidFile=$state/slurmd.pid
SlurmctldLogFile=$state/slurmctld.log
SlurmdLogFile=$state/slurmd.log
$node
PartitionName=local Nodes=$host Default=YES MaxTime=INFINITE State=UP
EOF
}

wait_idle() {
    local node t s
    node="$(hostname -s)"
    for t in $(seq 120); do
        s="$(sinfo -h -n "$node" -o %t 2>/dev/null || true)"
        case "$s" in
            idle|mix|alloc) echo "slurm_local.sh: node $node is $s after ${t} s"; return 0 ;;
            down*|drain*|drng*) scontrol update nodename="$node" state=resume 2>/dev/null || true ;;
        esac
        sleep 1
    done
    die "node $node not idle after 120 s (sinfo says '${s:-nothing}'); see $state/slurmctld.log and $state/slurmd.log"
}

start() {
    [[ $(id -u) == 0 ]] || die "start needs root (the daemons run as root and munge)"
    command -v slurmctld >/dev/null && command -v munged >/dev/null \
        || die "slurm-wlm and munge are not installed: apt-get install slurm-wlm munge"
    mkdir -p "$state"
    write_conf
    if ! recorded munged >/dev/null; then
        if pgrep -x munged >/dev/null; then
            echo "slurm_local.sh: using the munged that already runs"
        else
            mkdir -p /run/munge && chown munge:munge /run/munge && chmod 755 /run/munge
            rm -f /run/munge/munged.pid
            runuser -u munge -- munged
            from_pidfile munged /run/munge/munged.pid /var/log/munge/munged.log
        fi
    fi
    if ! recorded slurmctld >/dev/null; then
        rm -f "$state/slurmctld.pid"
        slurmctld
        from_pidfile slurmctld "$state/slurmctld.pid" "$state/slurmctld.log"
    fi
    if ! recorded slurmd >/dev/null; then
        rm -f "$state/slurmd.pid"
        slurmd
        from_pidfile slurmd "$state/slurmd.pid" "$state/slurmd.log"
    fi
    wait_idle
}

stop() {
    local name pid i
    if recorded slurmctld >/dev/null && [[ -f $conf ]] && grep -qxF "$marker" "$conf"; then
        # jobs a failed test left behind: cancelled first, so no job process outlives its cluster
        scancel --full --quiet --user "$(id -un)" 2>/dev/null || true
        for i in $(seq 60); do [[ -z $(squeue --noheader 2>/dev/null) ]] && break; sleep 1; done
    fi
    if [[ -f $pids ]]; then
        while read -r name pid; do  # slurmd first, munged last: the order start recorded, reversed
            if alive "$name" "$pid"; then
                kill -TERM "$pid"
                for i in $(seq 100); do alive "$name" "$pid" || break; sleep 0.1; done
                if alive "$name" "$pid"; then kill -KILL "$pid"; fi
                echo "slurm_local.sh: stopped $name (pid $pid)"
            fi
        done < <(tac "$pids")
        rm -f "$pids"
    fi
    if [[ -f $conf ]] && grep -qxF "$marker" "$conf"; then
        rm -f "$conf"
    fi
}

case "${1:-}" in
    start) start ;;
    stop) stop ;;
    *) die "usage: tools/slurm_local.sh start|stop" ;;
esac
