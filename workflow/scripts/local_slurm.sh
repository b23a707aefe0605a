#!/usr/bin/env bash
# A real single-node SLURM cluster on localhost, for testing the SLURM profile.
#
#   local_slurm.sh install   apt-get install slurm-wlm + munge (only if missing)
#   local_slurm.sh start     write the config, start munged, slurmctld, slurmd;
#                            wait until the node is idle (idempotent)
#   local_slurm.sh stop      cancel our jobs, stop the daemons (by PID)
#   local_slurm.sh status    daemons, sinfo, squeue
#   local_slurm.sh env       print `export SLURM_CONF=...` (eval "$(... env)")
#
# Needs root (munged runs as the munge user, slurmctld/slurmd as root) and no
# systemd. No accounting database: use `squeue` for job status (MinJobAge=600
# keeps finished jobs visible to squeue for 10 minutes).
#
# Environment:
#   LOCALLIP_SLURM_DIR        state dir (config, spool, logs, pids, fake GPUs)
#                             [/tmp/locallip-slurm]
#   LOCALLIP_SLURM_PARTITION  partition name                      [debug]
#   LOCALLIP_SLURM_GPUS       number of fake GPUs (gres gpu)      [2]
#   LOCALLIP_SLURM_TIMEOUT    seconds to wait for the node idle   [90]
#   LOCALLIP_SLURM_CTLD_PORT  slurmctld port (slurmd uses +1)     [6817]
#   LOCALLIP_SLURM_LINK_ETC   1: symlink /etc/slurm/slurm.conf to ours when
#                             that path is free (so sinfo etc. work without
#                             SLURM_CONF); 0: never touch /etc      [1]
set -euo pipefail

STATE="${LOCALLIP_SLURM_DIR:-/tmp/locallip-slurm}"
PARTITION="${LOCALLIP_SLURM_PARTITION:-debug}"
NGPUS="${LOCALLIP_SLURM_GPUS:-2}"
TIMEOUT="${LOCALLIP_SLURM_TIMEOUT:-90}"
CTLD_PORT="${LOCALLIP_SLURM_CTLD_PORT:-6817}"
SLURMD_PORT=$((CTLD_PORT + 1))
LINK_ETC="${LOCALLIP_SLURM_LINK_ETC:-1}"

CONF_DIR="$STATE/etc"
CONF="$CONF_DIR/slurm.conf"
RUN_DIR="$STATE/run"
LOG_DIR="$STATE/log"
MUNGE_SOCKET="/run/munge/munge.socket.2"
ETC_CONF="/etc/slurm/slurm.conf"

log() { echo "local_slurm: $*" >&2; }
die() { echo "local_slurm: ERROR: $*" >&2; exit 1; }

have_binaries() {
    command -v slurmctld >/dev/null 2>&1 && command -v slurmd >/dev/null 2>&1 \
        && command -v sinfo >/dev/null 2>&1 && command -v munged >/dev/null 2>&1
}

# pid_alive FILE -> 0 if FILE holds the pid of a live process
pid_alive() {
    local f="$1" pid
    [[ -s "$f" ]] || return 1
    pid="$(tr -dc '0-9' <"$f")"
    [[ -n "$pid" ]] && kill -0 "$pid" 2>/dev/null
}

# stop_pidfile FILE NAME: TERM, wait up to 10 s, then KILL
stop_pidfile() {
    local f="$1" name="$2" pid i
    if ! pid_alive "$f"; then
        rm -f "$f"
        return 0
    fi
    pid="$(tr -dc '0-9' <"$f")"
    log "stopping $name (pid $pid)"
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 50); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.2
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "$name did not stop, sending KILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    rm -f "$f"
}

munge_works() {
    command -v munge >/dev/null 2>&1 || return 1
    munge -n --socket="$MUNGE_SOCKET" 2>/dev/null | unmunge --socket="$MUNGE_SOCKET" >/dev/null 2>&1
}

cmd_install() {
    if have_binaries && command -v munge >/dev/null 2>&1; then
        log "slurm and munge already installed ($(slurmctld -V 2>/dev/null || true))"
        return 0
    fi
    [[ "$(id -u)" == 0 ]] || die "install needs root"
    command -v apt-get >/dev/null 2>&1 || die "no apt-get; install slurm-wlm and munge by hand"
    log "installing slurm-wlm and munge with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends slurm-wlm munge
    have_binaries || die "slurm binaries still missing after apt-get install"
}

real_memory_mb() {
    local m
    m="$(slurmd -C 2>/dev/null | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' | head -n1)"
    if [[ -z "$m" ]]; then
        m="$(awk '/^MemTotal:/ {print int($2/1024)}' /proc/meminfo)"
    fi
    echo "$m"
}

write_config() {
    local host="$1" cpus mem last
    cpus="$(nproc)"
    mem="$(real_memory_mb)"
    last=$((NGPUS - 1))
    mkdir -p "$CONF_DIR" "$RUN_DIR" "$LOG_DIR" "$STATE/spool/ctld" "$STATE/spool/d" "$STATE/dev"
    local i
    # Fake GPU device files: character devices (a /dev/null clone, 1:3) where
    # mknod is allowed -- slurm then sets CUDA_VISIBLE_DEVICES like on a real
    # cluster; plain empty files otherwise (slurmd logs "not a valid character
    # or block device" but schedules them all the same).
    for i in $(seq 0 "$last"); do
        if [[ ! -c "$STATE/dev/fakegpu$i" ]]; then
            rm -f "$STATE/dev/fakegpu$i"
            mknod "$STATE/dev/fakegpu$i" c 1 3 2>/dev/null || : >"$STATE/dev/fakegpu$i"
        fi
    done
    cat >"$CONF.tmp" <<EOF
# Written by workflow/scripts/local_slurm.sh -- single-node test cluster.
ClusterName=locallip
SlurmctldHost=${host}(127.0.0.1)
SlurmctldPort=${CTLD_PORT}
SlurmdPort=${SLURMD_PORT}
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CryptoType=crypto/munge
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
SchedulerType=sched/backfill
ReturnToService=2
# No accounting database: job status via squeue; keep finished jobs visible.
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
JobCompType=jobcomp/none
MinJobAge=600
InactiveLimit=0
KillWait=10
Waittime=0
SlurmctldTimeout=30
SlurmdTimeout=60
StateSaveLocation=${STATE}/spool/ctld
SlurmdSpoolDir=${STATE}/spool/d
SlurmctldPidFile=${RUN_DIR}/slurmctld.pid
SlurmdPidFile=${RUN_DIR}/slurmd.pid
SlurmctldLogFile=${LOG_DIR}/slurmctld.log
SlurmdLogFile=${LOG_DIR}/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
GresTypes=gpu
NodeName=${host} NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem} Gres=gpu:${NGPUS} State=UNKNOWN
PartitionName=${PARTITION} Nodes=${host} Default=YES MaxTime=INFINITE State=UP
EOF
    mv "$CONF.tmp" "$CONF"
    # fake GPUs: a count without File= leaves the node INVALID
    cat >"$CONF_DIR/gres.conf" <<EOF
AutoDetect=off
NodeName=${host} Name=gpu File=${STATE}/dev/fakegpu[0-${last}]
EOF
    # No cgroup.conf: proctrack/linuxproc + task/none need no cgroups (and
    # slurm 22.05 has no CgroupPlugin=disabled -- such a file breaks slurmd).
    rm -f "$CONF_DIR/cgroup.conf"
}

link_etc_conf() {
    [[ "$LINK_ETC" == 1 ]] || return 0
    if [[ -L "$ETC_CONF" ]]; then
        ln -sfn "$CONF" "$ETC_CONF"
    elif [[ ! -e "$ETC_CONF" ]]; then
        mkdir -p "$(dirname "$ETC_CONF")"
        ln -s "$CONF" "$ETC_CONF"
    else
        log "$ETC_CONF is a real file; left alone -- export SLURM_CONF=$CONF"
    fi
}

start_munge() {
    if munge_works; then
        log "munged already running"
        return 0
    fi
    if [[ ! -s /etc/munge/munge.key ]]; then
        log "creating munge key"
        mkdir -p /etc/munge
        if command -v mungekey >/dev/null 2>&1; then
            mungekey --create --keyfile=/etc/munge/munge.key --force
        else
            dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
        fi
    fi
    chown munge:munge /etc/munge /etc/munge/munge.key
    chmod 700 /etc/munge
    chmod 400 /etc/munge/munge.key
    mkdir -p /run/munge /var/lib/munge /var/log/munge
    chown munge:munge /run/munge /var/lib/munge /var/log/munge
    chmod 755 /run/munge
    log "starting munged"
    if command -v runuser >/dev/null 2>&1; then
        runuser -u munge -- /usr/sbin/munged --force
    else
        su -s /bin/sh munge -c "/usr/sbin/munged --force"
    fi
    local i
    for i in $(seq 1 50); do
        munge_works && break
        sleep 0.2
    done
    # remember that we started it, so that `stop` stops it too
    cp /run/munge/munged.pid "$RUN_DIR/munged.pid" 2>/dev/null || true
    munge_works || die "munged did not come up (see /var/log/munge/munged.log)"
}

node_state() {
    # first node state, lower case, e.g. idle, idle*, down*, drained, inval
    SLURM_CONF="$CONF" sinfo -h -N -n "$1" -o '%T' 2>/dev/null | head -n1 | tr 'A-Z' 'a-z'
}

diagnose() {
    local host="$1"
    echo "---- sinfo -R ----" >&2
    SLURM_CONF="$CONF" sinfo -R 2>&1 | tail -n 5 >&2 || true
    echo "---- scontrol show node ----" >&2
    SLURM_CONF="$CONF" scontrol show node "$host" 2>&1 | tail -n 25 >&2 || true
    echo "---- $LOG_DIR/slurmctld.log (tail) ----" >&2
    tail -n 20 "$LOG_DIR/slurmctld.log" >&2 2>/dev/null || true
    echo "---- $LOG_DIR/slurmd.log (tail) ----" >&2
    tail -n 20 "$LOG_DIR/slurmd.log" >&2 2>/dev/null || true
}

cmd_start() {
    have_binaries || die "slurm binaries not found; run '$0 install' (needs apt, root)"
    [[ "$(id -u)" == 0 ]] || die "start needs root"
    local host
    host="$(hostname -s)"
    export SLURM_CONF="$CONF"

    if pid_alive "$RUN_DIR/slurmctld.pid" && pid_alive "$RUN_DIR/slurmd.pid"; then
        log "slurmctld and slurmd already running (state dir $STATE)"
    else
        write_config "$host"
        link_etc_conf
        start_munge
        if ! pid_alive "$RUN_DIR/slurmctld.pid"; then
            log "starting slurmctld"
            slurmctld -f "$CONF" || die "slurmctld failed to start; see $LOG_DIR/slurmctld.log"
        fi
        # slurmctld must answer before slurmd registers
        local i
        for i in $(seq 1 50); do
            scontrol ping >/dev/null 2>&1 && break
            sleep 0.2
        done
        if ! pid_alive "$RUN_DIR/slurmd.pid"; then
            log "starting slurmd"
            slurmd -f "$CONF" -N "$host" || die "slurmd failed to start; see $LOG_DIR/slurmd.log"
        fi
    fi

    local deadline=$((SECONDS + TIMEOUT)) state="" resumed=0
    while ((SECONDS < deadline)); do
        state="$(node_state "$host")"
        case "$state" in
            idle|mixed|allocated|completing)
                log "node $host is $state; partition $PARTITION; $NGPUS fake GPUs"
                log "SLURM_CONF=$CONF"
                return 0 ;;
            down*|drain*|drained*)
                # e.g. down after a restart with old state: resume once
                if ((resumed == 0)) && pid_alive "$RUN_DIR/slurmd.pid"; then
                    sleep 2
                    scontrol update NodeName="$host" State=RESUME >/dev/null 2>&1 || true
                    resumed=1
                fi ;;
            inval*)
                diagnose "$host"
                die "node $host is INVALID (config does not match the machine)" ;;
        esac
        pid_alive "$RUN_DIR/slurmctld.pid" || { diagnose "$host"; die "slurmctld died"; }
        pid_alive "$RUN_DIR/slurmd.pid" || { diagnose "$host"; die "slurmd died"; }
        sleep 0.5
    done
    diagnose "$host"
    die "node $host not idle after ${TIMEOUT}s (state: '${state:-no answer}')"
}

cmd_stop() {
    export SLURM_CONF="$CONF"
    if pid_alive "$RUN_DIR/slurmctld.pid"; then
        # our private cluster: cancel whatever is still queued/running
        local ids
        ids="$(squeue -h -o '%i' 2>/dev/null | tr '\n' ' ' || true)"
        if [[ -n "${ids// /}" ]]; then
            log "cancelling jobs: $ids"
            # shellcheck disable=SC2086
            scancel $ids 2>/dev/null || true
            sleep 1
        fi
    fi
    stop_pidfile "$RUN_DIR/slurmd.pid" slurmd
    stop_pidfile "$RUN_DIR/slurmctld.pid" slurmctld
    # munged only if this script started it
    if [[ -s "$RUN_DIR/munged.pid" ]]; then
        stop_pidfile "$RUN_DIR/munged.pid" munged
    fi
    if [[ -L "$ETC_CONF" && "$(readlink "$ETC_CONF")" == "$CONF" ]]; then
        rm -f "$ETC_CONF"
    fi
    log "stopped"
}

cmd_status() {
    export SLURM_CONF="$CONF"
    local rc=0 d
    for d in slurmctld slurmd munged; do
        if pid_alive "$RUN_DIR/$d.pid"; then
            echo "$d: running (pid $(tr -dc '0-9' <"$RUN_DIR/$d.pid"))"
        elif [[ "$d" == munged ]] && munge_works; then
            echo "munged: running (not started by this script)"
        else
            echo "$d: not running"
            rc=1
        fi
    done
    echo "SLURM_CONF=$CONF"
    if ((rc == 0)); then
        sinfo -N -o '%N %P %T %c %m %G' || rc=1
        squeue || true
    fi
    return "$rc"
}

case "${1:-}" in
    install) cmd_install ;;
    start)   cmd_start ;;
    stop)    cmd_stop ;;
    restart) cmd_stop; cmd_start ;;
    status)  cmd_status ;;
    env)     echo "export SLURM_CONF=$CONF" ;;
    *)
        echo "usage: $0 {install|start|stop|restart|status|env}" >&2
        exit 2 ;;
esac
