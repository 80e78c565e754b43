#!/usr/bin/env bash
# Shows the test cluster: which daemons live, sinfo, squeue. Exit 0 only if all daemons
# the chosen accounting needs are alive and slurmctld answers.
#   --logs   also print the tail of every log (what CI prints when a run fails)
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=common.sh
. "$HERE/common.sh"

rc=0
mode=$(cat "$STATE/accounting" 2>/dev/null || echo unknown)
echo "state: $STATE   accounting: $mode"
check() {
    local file=$1 name=$2 needed=$3 pid
    if pid=$(pid_of "$file" "$name"); then
        printf '  %-10s running (pid %s)\n' "$name" "$pid"
    elif [ "$name" = munged ] && munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        printf '  %-10s running (not started by up.sh)\n' "$name"
    else
        printf '  %-10s %s\n' "$name" "$([ "$needed" = 1 ] && echo DOWN || echo 'not running (not needed)')"
        [ "$needed" = 1 ] && rc=1
    fi
}
dbd=0
[ "$mode" = slurmdbd ] && dbd=1
check "$MUNGE_PID" munged 1
check "$MARIADB_PID" mariadbd $dbd
check "$SLURMDBD_PID" slurmdbd $dbd
check "$SLURMCTLD_PID" slurmctld 1
check "$SLURMD_PID" slurmd 1
if command -v sinfo >/dev/null && timeout 10 sinfo -N -o '%N %P %T %c %m %G' 2>/dev/null; then
    timeout 10 squeue -o '%.10i %.9P %.20j %.8T %.10M %R' 2>/dev/null
else
    echo "slurmctld not answering"
    rc=1
fi
if [ "${1:-}" = --logs ]; then
    for f in "$LOG_DIR"/*.log "$LOG_DIR"/daemons.out "$STATE"/munge/munged.log; do
        [ -s "$f" ] || continue
        echo "===== $f (last 50 lines)"
        tail -n 50 "$f"
    done
fi
exit $rc
