#!/usr/bin/env bash
# Start a real single-node SLURM cluster on localhost, for tests (see README.md).
#
#   eval "$(hpc/testing/start_cluster.sh)"     # exports SLURM_CONF (and AESELECT_SLURM_DIR)
#   sbatch --wrap 'hostname'
#   hpc/testing/stop_cluster.sh
#
# Idempotent: if the cluster in the state dir is already up, healthy and its
# generated config is unchanged, it does nothing (prints "# reused").
# Everything lives under one state dir (AESELECT_SLURM_DIR, default
# /tmp/aeselect-slurm): slurm.conf, gres.conf, state, spool, logs, pid files,
# a private munged (own socket and key) and fake GPU device nodes.
# Nothing is written to /etc/slurm or /etc/munge; no system service is used.
#
# stdout: only shell `export` lines and one "# started" / "# reused" comment,
#         so the output can be eval'ed.  Diagnostics go to stderr.
# Exit codes: 0 ok, 2 not root, 3 install failed, 4 start failed.
#
# Env knobs:
#   AESELECT_SLURM_DIR        state dir (default /tmp/aeselect-slurm)
#   AESELECT_SLURM_GPUS       number of fake GPUs on the node (default 2, 0 = none)
#   AESELECT_SLURM_CTLD_PORT  slurmctld port (default 6817)
#   AESELECT_SLURM_SLURMD_PORT slurmd port (default 6818)
#   AESELECT_SLURM_TIMEOUT    seconds to wait for the node to become idle (default 60)
set -euo pipefail

DIR="${AESELECT_SLURM_DIR:-/tmp/aeselect-slurm}"
NGPU="${AESELECT_SLURM_GPUS:-2}"
CTLD_PORT="${AESELECT_SLURM_CTLD_PORT:-6817}"
SLURMD_PORT="${AESELECT_SLURM_SLURMD_PORT:-6818}"
TIMEOUT="${AESELECT_SLURM_TIMEOUT:-60}"
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
T0_US=${EPOCHREALTIME/./}

elapsed() { local us=$((${EPOCHREALTIME/./} - T0_US)); printf '%d.%02d' $((us / 1000000)) $((us % 1000000 / 10000)); }
log() { echo "[start_cluster $(elapsed)s] $*" >&2; }
die() {
    local rc=$1; shift
    echo "[start_cluster] ERROR: $*" >&2
    exit "$rc"
}

# ---------------------------------------------------------------- preconditions
[[ "$DIR" =~ ^/[A-Za-z0-9._/-]+$ ]] ||
    die 4 "AESELECT_SLURM_DIR must be an absolute path of [A-Za-z0-9._/-] only (it goes into slurm.conf; got '$DIR')"
[[ "$NGPU" =~ ^[0-9]+$ ]] || die 4 "AESELECT_SLURM_GPUS must be a number (got '$NGPU')"
if [[ $(id -u) -ne 0 ]]; then
    die 2 "must run as root (it installs packages and runs slurmctld/slurmd as root)"
fi

# ---------------------------------------------------------------- install
export PATH="$PATH:/usr/sbin:/sbin"
have_slurm() {
    local b
    for b in slurmctld slurmd sbatch sinfo scontrol munged; do
        command -v "$b" >/dev/null 2>&1 || return 1
    done
}

install_slurm() {
    command -v apt-get >/dev/null 2>&1 || die 3 "slurm/munge are missing and apt-get is not available"
    local pkgs=(slurmctld slurmd slurm-client munge)
    local created_policy=0
    # Keep package maintainer scripts from starting system services (we run our own).
    if [[ ! -e /usr/sbin/policy-rc.d ]]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        created_policy=1
    fi
    local rc=0
    export DEBIAN_FRONTEND=noninteractive
    log "installing ${pkgs[*]} (apt-get, no update first)"
    if ! apt-get install -y -q --no-install-recommends "${pkgs[@]}" >"$DIR/log/apt.log" 2>&1; then
        log "apt-get install failed (stale or missing package lists?); running apt-get update and retrying"
        if apt-get update -q >>"$DIR/log/apt.log" 2>&1 &&
            apt-get install -y -q --no-install-recommends "${pkgs[@]}" >>"$DIR/log/apt.log" 2>&1; then
            rc=0
        else
            rc=1
        fi
    fi
    [[ $created_policy -eq 1 ]] && rm -f /usr/sbin/policy-rc.d
    if [[ $rc -ne 0 ]]; then
        tail -n 30 "$DIR/log/apt.log" >&2 || true
        die 3 "package installation failed (full log: $DIR/log/apt.log)"
    fi
    have_slurm || die 3 "packages installed but binaries still missing"
    log "installed: $(slurmctld -V 2>/dev/null)"
}

# Refuse to take over a non-empty directory that is not ours (we rm -rf parts of it).
if [[ -d "$DIR" && ! -e "$DIR/.aeselect-slurm" && -n "$(ls -A "$DIR" 2>/dev/null)" ]]; then
    die 4 "$DIR exists, is not empty and was not made by this script; choose another AESELECT_SLURM_DIR"
fi
mkdir -p "$DIR/log"
touch "$DIR/.aeselect-slurm"
chmod 755 "$DIR"

# Serialise concurrent callers (e.g. several pytest-xdist workers).  The daemons
# are started with fd 9 closed, else munged would hold this lock forever.
exec 9>"$DIR/.lock"
flock -w 300 9 || die 4 "could not take the lock $DIR/.lock within 300 s"

if ! have_slurm; then
    install_slurm
fi

# ---------------------------------------------------------------- config
HOST="$(hostname -s)"
CONF="$DIR/etc/slurm.conf"
MUNGE_DIR="$DIR/munge"
MUNGE_SOCKET="$MUNGE_DIR/munge.socket.2"
RUN_DIR="$DIR/run"
DEV_DIR="$DIR/dev"

# Hardware line from slurmd -C (first line), NodeName forced to hostname -s,
# RealMemory reduced by 5% so the node is never drained for "low memory".
hw="$(SLURM_CONF=/dev/null slurmd -C 2>/dev/null | head -n1 || true)"
[[ "$hw" == NodeName=* ]] || die 4 "'slurmd -C' gave no node line (got: '$hw')"
mem="$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")"
[[ -n "$mem" ]] || mem=1024
mem=$((mem * 95 / 100))
hw="$(sed -e "s/^NodeName=[^ ]*/NodeName=$HOST/" -e "s/RealMemory=[0-9]*/RealMemory=$mem/" <<<"$hw")"
gres_node=""
gres_types=""
if [[ $NGPU -gt 0 ]]; then
    gres_node=" Gres=gpu:$NGPU"
    gres_types="GresTypes=gpu"
fi

new_conf="$(
    cat <<EOF
# Generated by hpc/testing/start_cluster.sh -- do not edit (it is regenerated).
ClusterName=aeselect
SlurmctldHost=$HOST(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
SlurmdUser=root
MailProg=/bin/true
AuthType=auth/munge
CredType=cred/munge
# cred_expire=10: a requeued job may start again after ~11 s instead of ~121 s.
AuthInfo=socket=$MUNGE_SOCKET,cred_expire=10
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/slurmd
SlurmctldPidFile=$RUN_DIR/slurmctld.pid
SlurmdPidFile=$RUN_DIR/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
SlurmctldDebug=info
SlurmdDebug=info
MpiDefault=none
SwitchType=switch/none
# proctrack/linuxproc leaves orphans behind; pgid kills the job's process group.
ProctrackType=proctrack/pgid
TaskPlugin=task/none
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
# One line per finished job with its ExitCode (sacct needs slurmdbd).
JobCompType=jobcomp/filetxt
JobCompLoc=$DIR/jobcomp.txt
MinJobAge=3600
ReturnToService=2
KillWait=5
InactiveLimit=0
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,bf_interval=1,sched_interval=2
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
$gres_types
$hw NodeAddr=127.0.0.1$gres_node State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
# A second partition on the same node: two profiles (two "clusters") sharing one phase.
PartitionName=second Nodes=ALL MaxTime=INFINITE State=UP
EOF
)"
new_gres=""
if [[ $NGPU -gt 0 ]]; then
    new_gres="# Generated by hpc/testing/start_cluster.sh: fake GPUs (character devices, major 195).
Name=gpu File=$DEV_DIR/nvidia[0-$((NGPU - 1))]"
fi

# ---------------------------------------------------------------- health
export SLURM_CONF="$CONF"

pid_alive() { # pidfile expected-comm
    local pid
    [[ -s "$1" ]] || return 1
    pid="$(tr -dc '0-9' <"$1")"
    [[ -n "$pid" && -r /proc/$pid/comm ]] || return 1
    [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$2" ]]
}

node_state() {
    timeout 10 sinfo -h -N -n "$HOST" -o '%T' 2>/dev/null | head -n1 || true
}

healthy() {
    pid_alive "$MUNGE_DIR/munged.pid" munged || return 1
    pid_alive "$RUN_DIR/slurmctld.pid" slurmctld || return 1
    pid_alive "$RUN_DIR/slurmd.pid" slurmd || return 1
    case "$(node_state)" in
        idle | mixed | allocated | completing) return 0 ;;
        *) return 1 ;;
    esac
}

print_env() {
    {
        echo "export SLURM_CONF=$CONF"
        echo "export AESELECT_SLURM_DIR=$DIR"
    } >"$DIR/env"
    cat "$DIR/env"
    echo "# $1"
}

if [[ -f "$CONF" ]] && [[ "$(cat "$CONF")" == "$new_conf" ]] &&
    [[ "$(cat "$DIR/etc/gres.conf" 2>/dev/null)" == "$new_gres" ]] && healthy; then
    log "cluster in $DIR already up and healthy (node $HOST: $(node_state)); nothing to do"
    print_env reused
    exit 0
fi

# Something of ours may be half up, or the config changed: stop it first.
if compgen -G "$RUN_DIR/*.pid" >/dev/null || [[ -f "$MUNGE_DIR/munged.pid" ]]; then
    log "cluster not healthy or config changed: stopping leftovers first"
    AESELECT_SLURM_DIR="$DIR" AESELECT_SLURM_LOCKED=1 "$HERE/stop_cluster.sh" >&2 || true
fi

# ---------------------------------------------------------------- fresh start
show_logs() {
    local f
    for f in munged.log slurmctld.stdout slurmctld.log slurmd.stdout slurmd.log; do
        if [[ -s "$DIR/log/$f" ]]; then
            echo "----- tail $DIR/log/$f -----" >&2
            tail -n 25 "$DIR/log/$f" >&2
        fi
    done
    echo "----- sinfo -----" >&2
    timeout 10 sinfo -N -l >&2 2>&1 || true
    timeout 10 scontrol show node "$HOST" >&2 2>&1 || true
}
fail() {
    echo "[start_cluster] ERROR: $*" >&2
    show_logs
    echo "[start_cluster] stopping what did start (logs stay in $DIR/log)" >&2
    AESELECT_SLURM_DIR="$DIR" AESELECT_SLURM_LOCKED=1 "$HERE/stop_cluster.sh" >&2 || true
    exit 4
}

port_busy() {
    command -v ss >/dev/null 2>&1 || return 1
    ss -Hltn "sport = :$1" 2>/dev/null | grep -q .
}
for p in "$CTLD_PORT" "$SLURMD_PORT"; do
    if port_busy "$p"; then
        die 4 "TCP port $p is already in use (another slurm? set AESELECT_SLURM_CTLD_PORT/AESELECT_SLURM_SLURMD_PORT)"
    fi
done

# Fresh state every (re)start: job ids restart at 1, so the old job records go too.
rm -rf "$DIR/state" "$DIR/spool" "$RUN_DIR" "$DEV_DIR" "$DIR/etc"
rm -f "$DIR/jobcomp.txt" "$DIR"/log/slurm*.log "$DIR"/log/slurm*.stdout "$DIR/log/munged.log"
mkdir -p "$DIR/etc" "$DIR/state" "$DIR/spool/slurmd" "$RUN_DIR" "$DIR/jobs"
printf '%s\n' "$new_conf" >"$CONF"
printf '%s\n' "$new_gres" >"$DIR/etc/gres.conf"
[[ -n "$new_gres" ]] || : >"$DIR/etc/gres.conf"

if [[ $NGPU -gt 0 ]]; then
    mkdir -p "$DEV_DIR"
    for ((i = 0; i < NGPU; i++)); do
        mknod "$DEV_DIR/nvidia$i" c 195 "$i" || die 4 "mknod $DEV_DIR/nvidia$i failed (needs root / CAP_MKNOD)"
    done
fi

# --- munged: private instance, own socket + key, runs as user munge.
MUNGE_USER=munge
getent passwd "$MUNGE_USER" >/dev/null || die 4 "user '$MUNGE_USER' does not exist (is the munge package installed?)"
mkdir -p "$MUNGE_DIR"
if [[ ! -s "$MUNGE_DIR/munge.key" ]]; then
    dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1024 count=1 status=none
fi
chown -R "$MUNGE_USER:$MUNGE_USER" "$MUNGE_DIR"
chmod 755 "$MUNGE_DIR"
chmod 600 "$MUNGE_DIR/munge.key"
log "starting munged (socket $MUNGE_SOCKET)"
runuser -u "$MUNGE_USER" -- munged \
    --socket="$MUNGE_SOCKET" \
    --key-file="$MUNGE_DIR/munge.key" \
    --pid-file="$MUNGE_DIR/munged.pid" \
    --log-file="$MUNGE_DIR/munged.log" \
    --seed-file="$MUNGE_DIR/munged.seed" 9>&- ||
    { tail -n 20 "$MUNGE_DIR/munged.log" >&2 2>/dev/null || true; die 4 "munged failed to start"; }
ln -sf "$MUNGE_DIR/munged.log" "$DIR/log/munged.log"
for _ in $(seq 50); do [[ -S "$MUNGE_SOCKET" ]] && break; sleep 0.1; done
[[ -S "$MUNGE_SOCKET" ]] || fail "munged socket $MUNGE_SOCKET did not appear"
munge -S "$MUNGE_SOCKET" -n | unmunge -S "$MUNGE_SOCKET" >/dev/null 2>&1 ||
    fail "munge/unmunge round trip through $MUNGE_SOCKET failed"

# --- slurmctld, then slurmd (both daemonise; pid files in $RUN_DIR).
log "starting slurmctld (port $CTLD_PORT)"
slurmctld -i -f "$CONF" >>"$DIR/log/slurmctld.stdout" 2>&1 9>&- || fail "slurmctld exited with $?"
for _ in $(seq 100); do timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP' && break; sleep 0.1; done
timeout 5 scontrol ping 2>/dev/null | grep -q 'is UP' || fail "slurmctld does not answer 'scontrol ping'"

log "starting slurmd (port $SLURMD_PORT)"
slurmd -f "$CONF" >>"$DIR/log/slurmd.stdout" 2>&1 9>&- || fail "slurmd exited with $?"

log "waiting for node $HOST to become idle"
deadline=$(($(date +%s) + TIMEOUT))
state=""
while :; do
    state="$(node_state)"
    case "$state" in
        idle) break ;;
        *drain* | *fail*) fail "node $HOST is '$state' (see Reason= below)" ;;
    esac
    # slurmd writes its pid file right after daemonising; give it 5 s.
    if ! pid_alive "$RUN_DIR/slurmd.pid" slurmd && [[ $(date +%s) -ge $((deadline - TIMEOUT + 5)) ]]; then
        fail "slurmd is not running"
    fi
    [[ $(date +%s) -lt $deadline ]] || fail "node $HOST not idle after ${TIMEOUT}s (state '$state')"
    sleep 0.2
done
log "cluster up: node $HOST idle ($(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$hw") CPUs, ${NGPU} fake GPUs), SLURM_CONF=$CONF"
print_env started
