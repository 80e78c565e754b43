#!/usr/bin/env bash
# Shows the test cluster: which daemons live, sinfo, squeue. Exit 0 only if all daemons
# the chosen accounting needs are alive and slurmctld answers.
#   --logs      also print the tail of every log (what CI prints when a run fails)
#   --nodes 2   the two-node cluster (up.sh --nodes 2) instead: also its namespaces and bridge
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=common.sh
. "$HERE/common.sh"
parse_nodes "$@" || exit 2
use_cluster "$NODES"

rc=0
mode=$(cat "$C_STATE/accounting" 2>/dev/null || echo unknown)
echo "cluster: $CLUSTER   state: $C_STATE   accounting: $mode   SLURM_CONF=$SLURM_CONF"
check() {
    local file=$1 name=$2 needed=$3 label=${4:-$2} pid
    if pid=$(pid_of "$file" "$name"); then
        printf '  %-16s running (pid %s)\n' "$label" "$pid"
    elif [ "$name" = munged ] && munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        printf '  %-16s running (not started by up.sh)\n' "$label"
    else
        printf '  %-16s %s\n' "$label" "$([ "$needed" = 1 ] && echo DOWN || echo 'not running (not needed)')"
        [ "$needed" = 1 ] && rc=1
    fi
}
dbd=0
[ "$mode" = slurmdbd ] && dbd=1
check "$MUNGE_PID" munged 1
check "$MARIADB_PID" mariadbd $dbd
check "$SLURMDBD_PID" slurmdbd $dbd
check "$CTLD_PID" slurmctld 1
if ((NODES == 1)); then
    check "$SLURMD_PID" slurmd 1
else
    for node in $C_NODES; do
        check "$(slurmd_pidfile "$node")" slurmd 1 "slurmd $node"
    done
    if ip -4 addr show dev "$BRIDGE" 2>/dev/null | grep -q "inet $BRIDGE_ADDR/"; then
        printf '  %-16s up (%s/24)\n' "bridge $BRIDGE" "$BRIDGE_ADDR"
    else
        printf '  %-16s DOWN\n' "bridge $BRIDGE"
        rc=1
    fi
    for node in $C_NODES; do
        addr=$(node_addr "$node")
        if ip -n "$node" -4 addr show dev eth0 2>/dev/null | grep -q "inet $addr/"; then
            printf '  %-16s %s, %d process(es)\n' "netns $node" "$addr" "$(ip netns pids "$node" | wc -l)"
        else
            printf '  %-16s DOWN (no namespace or no %s on its eth0)\n' "netns $node" "$addr"
            rc=1
        fi
    done
fi
if command -v sinfo >/dev/null && timeout 10 sinfo -N -o '%N %P %T %c %m %G' 2>/dev/null; then
    timeout 10 squeue -o '%.10i %.9P %.20j %.8T %.10M %R' 2>/dev/null
else
    echo "slurmctld not answering"
    rc=1
fi
if [ "${ARGS[0]:-}" = --logs ]; then
    declare -A shown=()
    # The shared daemons' logs too (the single-node cluster's log directory holds them).
    for f in "$C_LOG"/*.log "$C_LOG"/daemons.out "$LOG_DIR"/slurmdbd.log "$LOG_DIR"/mariadb.log "$STATE"/munge/munged.log; do
        [ -s "$f" ] && [ -z "${shown[$f]:-}" ] || continue
        shown[$f]=1
        echo "===== $f (last 50 lines)"
        tail -n 50 "$f"
    done
fi
exit $rc
