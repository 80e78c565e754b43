#!/usr/bin/env bash
# Stops the test cluster that slurm/up.sh started, by the pids in its pid files; safe to repeat.
# Job state, accounting database and logs stay, so `up.sh` resumes where it left off.
#   --purge   also cancel all jobs and delete the state directory (job ids restart at 1).
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=common.sh
. "$HERE/common.sh"

purge=0
case "${1:-}" in
    --purge) purge=1 ;;
    "") ;;
    *) echo "usage: $0 [--purge]" >&2; exit 2 ;;
esac
[ "$(id -u)" = 0 ] || { echo "slurm/down.sh: must run as root" >&2; exit 1; }

if ((purge)) && pid_of "$SLURMCTLD_PID" slurmctld >/dev/null; then
    # Running job steps outlive slurmd; once the spool directory is gone nothing could reap them.
    ids=$(squeue -h -o %i 2>/dev/null || true)
    if [ -n "$ids" ]; then
        # shellcheck disable=SC2086
        scancel $ids 2>/dev/null || true
        for ((i = 0; i < 150; i++)); do
            [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
            sleep 0.1
        done
    fi
fi

# Each daemon takes 1-2 s to exit, so independent ones stop together. slurmctld flushes job records
# to slurmdbd (through munge) as it exits, so slurmdbd goes after it, and the database and munge last.
stop_pidfile "$SLURMD_PID" slurmd 15 &
stop_pidfile "$SLURMCTLD_PID" slurmctld 30 &
wait
stop_pidfile "$SLURMDBD_PID" slurmdbd 30
stop_pidfile "$MARIADB_PID" mariadbd 60 &
stop_pidfile "$MUNGE_PID" munged 10 &
wait

if ((purge)); then
    rm -rf "$STATE"
    if grep -qs "$SHIM_MARK" "$SHIM"; then rm -f "$SHIM"; fi
    echo "slurm down: daemons stopped, $STATE removed"
else
    echo "slurm down: daemons stopped (state kept in $STATE)"
fi
