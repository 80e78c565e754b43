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
