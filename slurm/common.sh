# shellcheck shell=bash disable=SC2034
# Shared by up.sh, down.sh and status.sh (sourced, not run): paths and pid-file helpers.
# Everything the test cluster writes lives under $STATE so CI can print the logs and
# `down.sh --purge` can start over (job ids restart at 1 then).

STATE=${RAG_HPC_SLURM_DIR:-/var/lib/rag_hpc_slurm}
CONF_DIR=/etc/slurm
LOG_DIR=$STATE/log
RUN_DIR=$STATE/run
DB_DIR=$STATE/mariadb
DB_SOCK=$DB_DIR/run/mysqld.sock
# Not 3306: a developer machine may already run its own MariaDB/MySQL there.
DB_PORT=${RAG_HPC_SLURM_DB_PORT:-3316}
MUNGE_PID=$RUN_DIR/munge/munged.pid
MARIADB_PID=$DB_DIR/run/mariadbd.pid
SLURMDBD_PID=$RUN_DIR/slurmdbd.pid
SLURMCTLD_PID=$RUN_DIR/slurmctld.pid
SLURMD_PID=$RUN_DIR/slurmd.pid
SHIM=/usr/local/bin/sacct
SHIM_MARK="rag_hpc test-cluster sacct shim"

# Prints the pid recorded in $1 if that process is alive and its name starts with $2.
# The name check guards against a stale pid file whose pid was reused after a reboot.
pid_of() {
    local file=$1 name=$2 pid comm
    [ -r "$file" ] || return 1
    pid=$(tr -dc 0-9 <"$file")
    [ -n "$pid" ] || return 1
    comm=$(cat "/proc/$pid/comm" 2>/dev/null) || return 1
    [ "${comm#"$name"}" != "$comm" ] || return 1
    echo "$pid"
}

# SIGTERM, then SIGKILL after $3 seconds (default 15).
stop_pidfile() {
    local file=$1 name=$2 wait_s=${3:-15} pid i
    pid=$(pid_of "$file" "$name") || { rm -f "$file"; return 0; }
    kill -TERM "$pid" 2>/dev/null || true
    for ((i = 0; i < wait_s * 10; i++)); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    if kill -0 "$pid" 2>/dev/null; then
        echo "slurm: $name (pid $pid) ignored SIGTERM for ${wait_s}s; sending SIGKILL" >&2
        kill -KILL "$pid" 2>/dev/null || true
        sleep 0.2
    fi
    rm -f "$file"
}

# ---------------------------------------------------------------- the two clusters
# up.sh (--nodes 1, the default): cluster rag_hpc, one node named after this host at 127.0.0.1,
# configs in /etc/slurm. up.sh --nodes 2: cluster rag_hpc2 beside it, sharing munge, MariaDB and
# slurmdbd: its own slurmctld on this host at the bridge address, two slurmd each in its own network
# and UTS namespace (hostname and address of its own on the bridge), its own configs and state.
TWO_DIR=$STATE/two-nodes
TWO_CONF_DIR=$CONF_DIR/two-nodes
BRIDGE=ragbr0
BRIDGE_ADDR=10.77.0.1
TWO_NODES="rag-n1 rag-n2"
TWO_CTLD_PORT=6827
TWO_SLURMD_PORT=6828
HOSTS_MARK="# rag_hpc two-node test cluster (slurm/up.sh --nodes 2)"

# rag-nN's address on the bridge, 10.77.0.1N; its veth's end on the host is ragvN.
node_addr() { echo "10.77.0.1${1#rag-n}"; }
node_veth() { echo "ragv${1#rag-n}"; }

# Sets the cluster the rest of a script works on ($1: 1 or 2 nodes), and exports SLURM_CONF so every
# client and daemon started from here reads that cluster's config whatever the caller's environment.
use_cluster() {
    case "$1" in
        1)
            CLUSTER=rag_hpc
            C_CONF_DIR=$CONF_DIR
            C_STATE=$STATE
            C_LOG=$LOG_DIR
            C_RUN=$RUN_DIR
            CTLD_PID=$SLURMCTLD_PID
            C_NODES=$(hostname -s)
            ;;
        2)
            CLUSTER=rag_hpc2
            C_CONF_DIR=$TWO_CONF_DIR
            C_STATE=$TWO_DIR
            C_LOG=$TWO_DIR/log
            C_RUN=$TWO_DIR/run
            CTLD_PID=$C_RUN/slurmctld.pid
            C_NODES=$TWO_NODES
            ;;
        *) echo "slurm: --nodes must be 1 or 2 (got '$1')" >&2; return 2 ;;
    esac
    C_NNODES=$1
    export SLURM_CONF=$C_CONF_DIR/slurm.conf
}

# The pid file of node $1's slurmd (slurm.conf's SlurmdPidFile, %n = the node name).
# Stops the chosen cluster's slurmd(s) and slurmctld together: each takes a second or two. Named pids:
# a bare `wait` would also wait for a mariadbd the caller started, forever.
stop_cluster_daemons() {
    local node pids=()
    for node in $C_NODES; do
        stop_pidfile "$(slurmd_pidfile "$node")" slurmd 15 &
        pids+=("$!")
    done
    stop_pidfile "$CTLD_PID" slurmctld 30 &
    wait "$!" "${pids[@]}"
}

slurmd_pidfile() {
    if ((C_NNODES == 1)); then echo "$SLURMD_PID"; else echo "$C_RUN/slurmd-$1.pid"; fi
}

# Parses "--nodes N" out of the arguments: sets NODES (default 1) and ARGS (the rest).
parse_nodes() {
    NODES=1
    ARGS=()
    while (($#)); do
        case "$1" in
            --nodes) NODES=${2:-}; shift 2 || { echo "slurm: --nodes needs a value" >&2; return 2; } ;;
            --nodes=*) NODES=${1#--nodes=}; shift ;;
            *) ARGS+=("$1"); shift ;;
        esac
    done
    case "$NODES" in 1 | 2) ;; *) echo "slurm: --nodes must be 1 or 2 (got '$NODES')" >&2; return 2 ;; esac
}

# /etc/hosts without the two-node cluster's lines.
hosts_without_mark() { grep -vF "$HOSTS_MARK" /etc/hosts || true; }
