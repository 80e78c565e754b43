#!/usr/bin/env bash
# Stops the test cluster that slurm/up.sh started, by the pids in its pid files; safe to repeat.
# Job state, accounting database and logs stay, so `up.sh` resumes where it left off.
#   --purge     also cancel all jobs and delete the state directory (job ids restart at 1).
#   --nodes 2   only the two-node cluster (up.sh --nodes 2): its slurmctld, both slurmd and whatever
#               else runs in the nodes' namespaces (jobs running there end NODE_FAIL, as in a power
#               cut), the namespaces, veth pairs, bridge and /etc/hosts lines; munge, slurmdbd and the
#               single-node cluster keep running. With --purge its state directory and its jobs in the
#               accounting database go too.
# Without --nodes 2 the two-node cluster is stopped as well: it cannot run without munge and slurmdbd.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=common.sh
. "$HERE/common.sh"

parse_nodes "$@" || exit 2
purge=0
case "${ARGS[*]:-}" in
    --purge) purge=1 ;;
    "") ;;
    *) echo "usage: $0 [--nodes 1|2] [--purge]" >&2; exit 2 ;;
esac
[ "$(id -u)" = 0 ] || { echo "slurm/down.sh: must run as root" >&2; exit 1; }

# Cancels every job of the cluster use_cluster chose and waits (15 s at most) for the queue to empty.
cancel_all() {
    local ids i
    pid_of "$CTLD_PID" slurmctld >/dev/null || return 0
    ids=$(squeue -h -o %i 2>/dev/null || true)
    [ -n "$ids" ] || return 0
    # shellcheck disable=SC2086
    scancel $ids 2>/dev/null || true
    for ((i = 0; i < 150; i++)); do
        [ -z "$(squeue -h -o %i 2>/dev/null)" ] && break
        sleep 0.1
    done
}

# The two-node cluster, whatever of it exists.
two_nodes_down() {
    local node veth procs pids i
    use_cluster 2
    if ((purge)); then cancel_all; fi
    # Its nodes go down as in a power cut: everything in their namespaces, slurmd and the job steps
    # that outlive it (slurmstepd ignores SIGTERM), is SIGKILLed; slurmctld, told the nodes are DOWN,
    # ends their jobs NODE_FAIL (requeued if they may be) instead of keeping them RUNNING on nodes
    # that come back empty.
    for node in $C_NODES; do
        if ip netns exec "$node" true 2>/dev/null; then
            procs=$(ip netns pids "$node" 2>/dev/null || true)
            # shellcheck disable=SC2086
            [ -z "$procs" ] || kill -KILL $procs 2>/dev/null || true
            for ((i = 0; i < 50; i++)); do
                [ -z "$(ip netns pids "$node" 2>/dev/null)" ] && break
                sleep 0.1
            done
        fi
    done
    if pid_of "$CTLD_PID" slurmctld >/dev/null; then
        scontrol update nodename="${C_NODES// /,}" state=down reason="slurm/down.sh --nodes 2" >/dev/null 2>&1 || true
    fi
    stop_cluster_daemons
    for node in $C_NODES; do
        ip netns del "$node" 2>/dev/null || true
        # Gone with the namespace, unless its other end was somewhere else.
        veth=$(node_veth "$node")
        ip link del "$veth" 2>/dev/null || true
    done
    ip link del "$BRIDGE" 2>/dev/null || true
    if grep -qF "$HOSTS_MARK" /etc/hosts; then
        # In place, not by rename: /etc/hosts may be a bind mount (containers).
        printf '%s\n' "$(hosts_without_mark)" >/etc/hosts
    fi
    if ((purge)); then
        rm -rf "$TWO_DIR"
        # Job ids restart at 1, and the old jobs' records would answer for the new ones (sacct -D): the
        # cluster leaves the accounting database with its tables (sacctmgr alone keeps the jobs); up.sh
        # adds it afresh.
        if sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER"; then
            sacctmgr -i delete cluster "$CLUSTER" >/dev/null 2>&1 || echo "slurm/down.sh: sacctmgr delete cluster $CLUSTER failed" >&2
        fi
        local tables
        tables=$(mariadb --no-defaults --socket="$DB_SOCK" -uroot -N slurm_acct_db -e \
            "SELECT GROUP_CONCAT(table_name) FROM information_schema.tables WHERE table_schema = 'slurm_acct_db' AND table_name LIKE '${CLUSTER//_/\\_}\\_%'" 2>/dev/null || true)
        if [ -n "$tables" ] && [ "$tables" != NULL ]; then
            mariadb --no-defaults --socket="$DB_SOCK" -uroot slurm_acct_db -e "DROP TABLE $tables" ||
                echo "slurm/down.sh: dropping $CLUSTER's accounting tables failed" >&2
        fi
        echo "slurm down: two-node cluster $CLUSTER stopped, $TWO_DIR removed"
    else
        echo "slurm down: two-node cluster $CLUSTER stopped (state kept in $TWO_DIR)"
    fi
}

# Anything of the two-node cluster still up: its controller, a node's namespace, the bridge.
two_nodes_up() {
    local node
    pid_of "$TWO_DIR/run/slurmctld.pid" slurmctld >/dev/null && return 0
    ip link show "$BRIDGE" >/dev/null 2>&1 && return 0
    for node in $TWO_NODES; do [ -e "/run/netns/$node" ] && return 0; done
    return 1
}
if ((NODES == 2)) || two_nodes_up; then
    two_nodes_down
fi
((NODES == 1)) || exit 0

use_cluster 1
if ((purge)); then cancel_all; fi

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
