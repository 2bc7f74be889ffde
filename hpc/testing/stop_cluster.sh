#!/usr/bin/env bash
# Stop the test SLURM cluster started by start_cluster.sh (see README.md).
#
#   hpc/testing/stop_cluster.sh            # cancel jobs, stop slurmd, slurmctld, munged
#   hpc/testing/stop_cluster.sh --purge    # ... and delete the state dir
#
# Daemons are found ONLY through the pid files in the state dir (and the pid's
# /proc/<pid>/comm must match), never by process name: other clusters or
# sessions on the machine are left alone.  Safe to call when nothing runs.
set -euo pipefail

DIR="${AESELECT_SLURM_DIR:-/tmp/aeselect-slurm}"
PURGE=0
for a in "$@"; do
    case "$a" in
        --purge) PURGE=1 ;;
        -h | --help) sed -n '2,9p' "$0"; exit 0 ;;
        *) echo "usage: $0 [--purge]" >&2; exit 2 ;;
    esac
done
export PATH="$PATH:/usr/sbin:/sbin"
log() { echo "[stop_cluster] $*" >&2; }

if [[ ! -d "$DIR" ]]; then
    log "no state dir $DIR: nothing to stop"
    exit 0
fi

# start_cluster.sh calls us while it holds the lock.
if [[ "${AESELECT_SLURM_LOCKED:-0}" != 1 ]]; then
    exec 9>"$DIR/.lock"
    flock -w 120 9 || { log "could not take the lock $DIR/.lock"; exit 1; }
fi

export SLURM_CONF="$DIR/etc/slurm.conf"

pid_of() { # pidfile expected-comm -> prints pid if that process is alive
    local pid
    [[ -s "$1" ]] || return 1
    pid="$(tr -dc '0-9' <"$1")"
    [[ -n "$pid" && "$(cat "/proc/$pid/comm" 2>/dev/null)" == "$2" ]] || return 1
    echo "$pid"
}

alive() { [[ -d /proc/$1 && "$(cat "/proc/$1/comm" 2>/dev/null)" == "$2" ]]; }

stop_daemons() { # pidfile:comm ... -- SIGTERM them together, wait (15 s), then SIGKILL
    local spec pf comm pid
    local -a pids=() comms=() pfs=()
    for spec in "$@"; do
        pf="${spec%%:*}" comm="${spec##*:}"
        if pid="$(pid_of "$pf" "$comm")"; then
            log "stopping $comm (pid $pid)"
            kill -TERM "$pid" 2>/dev/null || true
            pids+=("$pid") comms+=("$comm")
        fi
        pfs+=("$pf")
    done
    local i left
    for _ in $(seq 150); do
        left=0
        for i in "${!pids[@]}"; do alive "${pids[$i]}" "${comms[$i]}" && left=1; done
        [[ $left -eq 0 ]] && break
        sleep 0.1
    done
    for i in "${!pids[@]}"; do
        if alive "${pids[$i]}" "${comms[$i]}"; then
            log "${comms[$i]} (pid ${pids[$i]}) ignored SIGTERM for 15 s: SIGKILL"
            kill -KILL "${pids[$i]}" 2>/dev/null || true
            for _ in $(seq 50); do alive "${pids[$i]}" "${comms[$i]}" || break; sleep 0.1; done
        fi
    done
    rm -f "${pfs[@]}"
}

# 1. Cancel this cluster's jobs while the controller is up, so no slurmstepd /
#    job processes outlive the daemons.
if pid_of "$DIR/run/slurmctld.pid" slurmctld >/dev/null && [[ -f "$SLURM_CONF" ]]; then
    jobs="$(timeout 10 squeue -h -o '%A' 2>/dev/null || true)"
    if [[ -n "$jobs" ]]; then
        log "cancelling jobs: $(echo $jobs)"
        # shellcheck disable=SC2086
        timeout 10 scancel $jobs 2>/dev/null || true
        for _ in $(seq 150); do
            [[ -z "$(timeout 5 squeue -h -t RUNNING,COMPLETING,SUSPENDED -o '%A' 2>/dev/null)" ]] && break
            sleep 0.1
        done
    fi
fi

# 2. Daemons: slurmd and slurmctld together (each takes ~1.5-2 s), munged last.
stop_daemons "$DIR/run/slurmd.pid:slurmd" "$DIR/run/slurmctld.pid:slurmctld"
stop_daemons "$DIR/munge/munged.pid:munged"

if [[ $PURGE -eq 1 ]]; then
    if [[ ! -e "$DIR/.aeselect-slurm" ]]; then
        log "not purging $DIR: it has no .aeselect-slurm marker (not made by start_cluster.sh)"
        exit 1
    fi
    log "removing $DIR"
    rm -rf "$DIR"
else
    log "stopped (state and logs kept in $DIR)"
fi
