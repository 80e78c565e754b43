#!/usr/bin/env bash
# Brings up, or repairs, a single-node SLURM 22.05 test cluster on Debian/Ubuntu as root, without
# systemd: munge, MariaDB + slurmdbd (real accounting), slurmctld and slurmd, partitions `gpu`
# (default, preemptable) and `urgent`, and two fake GPUs. Re-running it on a healthy cluster only
# checks it and prints the summary line; dead daemons are restarted, a down/drained node resumed.
#
#   --nodes 2   instead (or as well: both run side by side) a two-node cluster on this one machine,
#               rag_hpc2: nodes rag-n1 (10.77.0.11) and rag-n2 (10.77.0.12), each slurmd in a network
#               and UTS namespace of its own on bridge ragbr0 (10.77.0.1, created here), its own
#               slurmctld on this host at 10.77.0.1:6827, sharing munge and slurmdbd with the
#               single-node cluster. Configs in /etc/slurm/two-nodes, state in $STATE/two-nodes;
#               clients reach it with SLURM_CONF=/etc/slurm/two-nodes/slurm.conf.
#
# Environment:
#   RAG_HPC_SLURM_DIR         state, logs, pid files, database  (default /var/lib/rag_hpc_slurm)
#   RAG_HPC_SLURM_ACCOUNTING  auto (default: slurmdbd, falling back to the sacct shim) | slurmdbd | shim
#   RAG_HPC_SLURM_TIMEOUT     seconds to wait for the node to become usable (default 90)
#   RAG_HPC_SLURM_DB_PORT     MariaDB TCP port on 127.0.0.1 (default 3316)
# Configs go to /etc/slurm, where the Debian packages' daemons and clients look for them.
set -euo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
# shellcheck source=common.sh
. "$HERE/common.sh"
parse_nodes "$@" || exit 2
((${#ARGS[@]} == 0)) || { echo "usage: $0 [--nodes 1|2]" >&2; exit 2; }
use_cluster "$NODES"

T0=$(date +%s.%N)
ACCOUNTING=${RAG_HPC_SLURM_ACCOUNTING:-auto}
TIMEOUT=${RAG_HPC_SLURM_TIMEOUT:-90}
HOST=$(hostname -s)
CPUS=$(nproc)
NGPU=2
MEM_MB=$(( $(awk '/^MemTotal:/ {print $2}' /proc/meminfo) / 1024 - 1024 ))
(( MEM_MB >= 512 )) || MEM_MB=512
# The two nodes share this machine: each declares half of that memory (and all of its CPUs).
NODE_MEM_MB=$MEM_MB
if ((NODES == 2)); then
    NODE_MEM_MB=$((MEM_MB / 2))
    ((NODE_MEM_MB >= 512)) || NODE_MEM_MB=512
fi

note() { echo "slurm/up.sh: $*" >&2; }
show_logs() {
    local f
    for f in "$C_LOG"/slurmctld.log "$C_LOG"/slurmd*.log "$LOG_DIR"/slurmdbd.log \
        "$LOG_DIR"/mariadb.log "$STATE"/munge/munged.log "$LOG_DIR"/apt.log; do
        [ -s "$f" ] || continue
        echo "----- last lines of $f"
        tail -n 30 "$f"
    done
}
die() {
    show_logs >&2
    # Last, so the reason survives whatever tail a CI log or a test keeps.
    echo "slurm/up.sh: ERROR: $*" >&2
    exit 1
}

case "$ACCOUNTING" in auto | slurmdbd | shim) ;; *) die "RAG_HPC_SLURM_ACCOUNTING must be auto, slurmdbd or shim (got '$ACCOUNTING')" ;; esac
[ "$(id -u)" = 0 ] || die "must run as root (the daemons, /etc/slurm and /dev/fakegpu* need it): sudo bash $0"
command -v apt-get >/dev/null || command -v slurmctld >/dev/null || die "needs Debian/Ubuntu (apt-get) or preinstalled slurm packages"

mkdir -p "$STATE" "$LOG_DIR" "$RUN_DIR" "$C_LOG" "$C_RUN"
# Two up.sh at once (parallel CI jobs, a test calling it while a developer does) would race on
# the same pid files and configs.
exec 9>"$STATE/.up.lock"
flock -w 900 9 || die "another slurm/up.sh held $STATE/.up.lock for 15 minutes"

# ---------------------------------------------------------------- packages
missing_pkgs() {
    local p
    for p in "$@"; do
        dpkg-query -W -f='${db:Status-Status}\n' "$p" 2>/dev/null | grep -qx installed || echo "$p"
    done
}

# Returns non-zero instead of exiting so the optional accounting packages can fall back.
apt_install() {
    local missing created_policy=0 rc=0
    missing=$(missing_pkgs "$@")
    [ -z "$missing" ] && return 0
    command -v apt-get >/dev/null || { note "cannot install $missing: no apt-get"; return 1; }
    # Package scripts would start munge/mariadb through invoke-rc.d with the distribution's own
    # paths; this script starts every daemon itself, so service starts are denied during install.
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
        chmod 755 /usr/sbin/policy-rc.d
        created_policy=1
    fi
    note "installing ${missing//$'\n'/ }"
    echo "=== $(date '+%F %T') install ${missing//$'\n'/ }" >>"$LOG_DIR/apt.log"
    # shellcheck disable=SC2086
    if ! DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends \
        $missing >>"$LOG_DIR/apt.log" 2>&1; then
        # Stale or absent package lists (fresh machine, mirror moved on): refresh once and retry.
        note "install failed; running apt-get update and retrying"
        # shellcheck disable=SC2086
        DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 update >>"$LOG_DIR/apt.log" 2>&1 &&
            DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600 install -y --no-install-recommends \
                $missing >>"$LOG_DIR/apt.log" 2>&1 || rc=$?
    fi
    echo "=== $(date '+%F %T') done (rc $rc)" >>"$LOG_DIR/apt.log"
    if ((created_policy)); then rm -f /usr/sbin/policy-rc.d; fi
    return "$rc"
}

if [ "$ACCOUNTING" != shim ]; then
    # One apt/dpkg run for everything saves a few seconds of triggers on a fresh machine; if the
    # accounting packages are the problem, the core ones still get installed below.
    apt_install slurmctld slurmd slurm-client munge slurmdbd mariadb-server || true
fi
apt_install slurmctld slurmd slurm-client munge || die "could not install slurmctld slurmd slurm-client munge (see $LOG_DIR/apt.log)"
if ((NODES == 2)); then
    apt_install iproute2 || die "could not install iproute2 (the two-node cluster's namespaces and bridge need ip)"
fi

# ---------------------------------------------------------------- fake GPUs
# gres.conf needs real character devices: plain files or Count= without File= make the node INVAL.
for ((i = 0; i < NGPU; i++)); do
    dev=/dev/fakegpu$i
    if [ ! -c "$dev" ]; then
        rm -f "$dev"
        mknod -m 0666 "$dev" c 1 3
    fi
done

# ---------------------------------------------------------------- munge
munge_ok() { munge -n 2>/dev/null | unmunge >/dev/null 2>&1; }
start_munge() {
    # A munged started by someone else (distribution service) is fine to share.
    munge_ok && return 0
    stop_pidfile "$MUNGE_PID" munged 5
    if [ ! -s /etc/munge/munge.key ]; then
        install -d -o munge -g munge -m 0700 /etc/munge
        mungekey --create --keyfile=/etc/munge/munge.key
    fi
    chown munge:munge /etc/munge/munge.key
    chmod 0400 /etc/munge/munge.key
    install -d -o munge -g munge -m 0755 /run/munge "$STATE/munge" "$RUN_DIR/munge"
    runuser -u munge -- /usr/sbin/munged --pid-file="$MUNGE_PID" --log-file="$STATE/munge/munged.log" \
        </dev/null >>"$LOG_DIR/daemons.out" 2>&1 9>&- || die "munged failed to start"
    local i
    for ((i = 0; i < 50; i++)); do
        munge_ok && return 0
        sleep 0.1
    done
    die "munged started but 'munge -n | unmunge' fails"
}
start_munge

# ---------------------------------------------------------------- configs
CONF_CHANGED=0
# Writes stdin to $1 (mode $2, owner $3) only when the content differs, so a healthy cluster is
# not restarted; sets CONF_CHANGED when it wrote.
write_if_changed() {
    local path=$1 mode=$2 owner=$3 tmp
    tmp=$(mktemp "$path.XXXXXX")
    cat >"$tmp"
    chmod "$mode" "$tmp"
    chown "$owner" "$tmp"
    if [ -f "$path" ] && cmp -s "$tmp" "$path" &&
        [ "$(stat -c %a:%U "$path")" = "$(stat -c %a:%U "$tmp")" ]; then
        rm -f "$tmp"
        return 0
    fi
    mv -f "$tmp" "$path"
    CONF_CHANGED=1
}

# What differs between the clusters' slurm.conf and gres.conf: title, controller, where the slurmd
# keep their state and logs, the nodes and partitions.
cluster_conf() {
    local node nodes=${C_NODES// /,}
    if ((NODES == 1)); then
        TITLE="Single-node test cluster"
        CTLD_HOST="$HOST(127.0.0.1)"
        SLURMD_SPOOL=$STATE/slurmd
        SLURMD_PIDS=$SLURMD_PID
        SLURMD_LOGS=$LOG_DIR/slurmd.log
        NODE_LINES="NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB Gres=gpu:$NGPU State=UNKNOWN"
        GRES_LINES="NodeName=$HOST Name=gpu File=/dev/fakegpu[0-$((NGPU - 1))]"
    else
        TITLE="Two-node test cluster"
        # Only the bridge's addresses: the controller at this host's end, each node at its own.
        CTLD_HOST="$HOST($BRIDGE_ADDR)"
        # %n: the node name, so the two slurmd of this machine keep apart.
        SLURMD_SPOOL=$C_STATE/slurmd/%n
        SLURMD_PIDS=$C_RUN/slurmd-%n.pid
        SLURMD_LOGS=$C_LOG/slurmd-%n.log
        NODE_LINES="# Ports of its own beside the single-node cluster's (6817, 6818) on this host.
SlurmctldPort=$TWO_CTLD_PORT
SlurmdPort=$TWO_SLURMD_PORT
# Each node declares all $CPUS CPUs of this machine, so the two oversubscribe it (2 x $CPUS CPUs on
# $CPUS cores, which the single-node cluster's node claims as well), and RealMemory = half of
# (MemTotal - 1 GiB) = $NODE_MEM_MB MB, so both together claim what the single node does.
# Both nodes' fake GPUs are the same two device files."
        GRES_LINES=""
        for node in $C_NODES; do
            NODE_LINES+="
NodeName=$node NodeAddr=$(node_addr "$node") CPUs=$CPUS RealMemory=$NODE_MEM_MB Gres=gpu:$NGPU State=UNKNOWN"
            GRES_LINES+="NodeName=$node Name=gpu File=/dev/fakegpu[0-$((NGPU - 1))]"$'\n'
        done
        GRES_LINES=${GRES_LINES%$'\n'}
    fi
    NODE_LINES+="
PartitionName=gpu Nodes=$nodes Default=YES PriorityTier=1 PreemptMode=REQUEUE GraceTime=30 MaxTime=INFINITE State=UP
PartitionName=urgent Nodes=$nodes PriorityTier=10 PreemptMode=OFF MaxTime=INFINITE State=UP"
}

write_slurm_conf() {
    local mode=$1 acct
    cluster_conf
    if [ "$mode" = slurmdbd ]; then
        acct="AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=6819
# GPUs are not counted by default; sacct's AllocTRES then shows whether a job got one.
AccountingStorageTRES=gres/gpu"
    else
        acct="AccountingStorageType=accounting_storage/none"
    fi
    mkdir -p "$C_CONF_DIR"
    write_if_changed "$C_CONF_DIR/slurm.conf" 644 root <<EOF
# $TITLE written by rag_hpc slurm/up.sh (accounting: $mode).
# Rewritten on every run: change the script, not this file.
ClusterName=$CLUSTER
SlurmctldHost=$CTLD_HOST
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job sits in BeginTime until the old job credential expires: 120 s by default.
AuthInfo=cred_expire=10
MpiDefault=none
MailProg=/bin/true
# No cgroups on these machines (no systemd, often a sandboxed kernel).
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ReturnToService=2
StateSaveLocation=$C_STATE/slurmctld
SlurmdSpoolDir=$SLURMD_SPOOL
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PIDS
SlurmctldLogFile=$C_LOG/slurmctld.log
SlurmdLogFile=$SLURMD_LOGS
SlurmctldDebug=info
SlurmdDebug=info
# submitit ignores SIGTERM, so every cancel/requeue lasts KillWait, and nothing starts while a job
# is COMPLETING: 30 s by default.
KillWait=5
# Without these a requeued job waits ~36 s before the scheduler looks at it again.
SchedulerParameters=bf_interval=2,sched_interval=2
# Preemption that reaches submitit's checkpoint(): SIGUSR2 (submitit's --signal) instead of the
# SIGTERM submitit ignores, then GraceTime seconds to checkpoint and requeue itself.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
GresTypes=gpu
JobCompType=jobcomp/filetxt
JobCompLoc=$C_STATE/jobcomp.txt
$acct
$NODE_LINES
EOF
    write_if_changed "$C_CONF_DIR/gres.conf" 644 root <<EOF
$GRES_LINES
EOF
}

# ---------------------------------------------------------------- accounting
DB_PASS_FILE=$STATE/mariadb/slurm.pass
db_ping() { mariadb-admin --no-defaults --socket="$DB_SOCK" -uroot ping >/dev/null 2>&1; }

start_mariadb() {
    if pid_of "$MARIADB_PID" mariadbd >/dev/null && db_ping; then return 0; fi
    stop_pidfile "$MARIADB_PID" mariadbd 30
    install -d -m 0755 "$DB_DIR"
    install -d -o mysql -g mysql -m 0750 "$DB_DIR/data" "$DB_DIR/run"
    if [ ! -d "$DB_DIR/data/mysql" ]; then
        mariadb-install-db --no-defaults --user=mysql --datadir="$DB_DIR/data" \
            --auth-root-authentication-method=socket --skip-test-db >"$LOG_DIR/mariadb-install.log" 2>&1 ||
            { note "mariadb-install-db failed (see $LOG_DIR/mariadb-install.log)"; return 1; }
    fi
    touch "$LOG_DIR/mariadb.log"
    chown mysql:mysql "$LOG_DIR/mariadb.log"
    # slurmdbd still logs "Database settings not recommended values: innodb_buffer_pool_size" (it
    # wants GBs); harmless for a few thousand test jobs, so the memory stays small.
    # --no-defaults: /etc/mysql/my.cnf points at /var/lib/mysql and /run/mysqld, which belong to the
    # distribution's own server. mariadbd does not daemonize: setsid + & detach it, and fd 9 (the
    # lock) is closed or the next up.sh would wait on it forever.
    setsid /usr/sbin/mariadbd --no-defaults --user=mysql --datadir="$DB_DIR/data" --socket="$DB_SOCK" \
        --pid-file="$MARIADB_PID" --port="$DB_PORT" --bind-address=127.0.0.1 --skip-name-resolve \
        --log-error="$LOG_DIR/mariadb.log" --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900 \
        </dev/null >>"$LOG_DIR/daemons.out" 2>&1 9>&- &
    local i
    for ((i = 0; i < 300; i++)); do
        db_ping && break
        sleep 0.1
    done
    db_ping || { note "mariadbd did not answer within 30 s"; return 1; }
    if [ ! -s "$DB_PASS_FILE" ]; then
        (umask 077 && head -c 32 /dev/urandom | base64 | tr -dc A-Za-z0-9 | head -c 24 >"$DB_PASS_FILE")
    fi
    local pw
    pw=$(cat "$DB_PASS_FILE")
    # Both hosts: slurmdbd connects over TCP to 127.0.0.1, a person debugging may use the socket.
    mariadb --no-defaults --socket="$DB_SOCK" -uroot >>"$LOG_DIR/mariadb-install.log" 2>&1 <<SQL || { note "creating the slurm database user failed"; return 1; }
CREATE DATABASE IF NOT EXISTS slurm_acct_db;
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$pw';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$pw';
ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$pw';
ALTER USER 'slurm'@'localhost' IDENTIFIED BY '$pw';
GRANT ALL PRIVILEGES ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL PRIVILEGES ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
SQL
}

dbd_ok() { sacctmgr -n -P list cluster format=cluster >/dev/null 2>&1; }

# Sets ACCT_FAIL and returns non-zero on failure, so auto mode can fall back to the shim.
setup_slurmdbd() {
    ACCT_FAIL=""
    apt_install slurmdbd mariadb-server || { ACCT_FAIL="apt-get install slurmdbd mariadb-server failed"; return 1; }
    start_mariadb || { ACCT_FAIL="MariaDB did not start"; return 1; }
    write_slurm_conf slurmdbd
    local before=$CONF_CHANGED
    CONF_CHANGED=0
    # slurmdbd refuses a config readable by others: it holds the database password.
    write_if_changed "$CONF_DIR/slurmdbd.conf" 600 root <<EOF
# Written by rag_hpc slurm/up.sh.
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
DbdPort=6819
SlurmUser=root
PidFile=$SLURMDBD_PID
LogFile=$LOG_DIR/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$(cat "$DB_PASS_FILE")
StorageLoc=slurm_acct_db
EOF
    local dbd_conf_changed=$CONF_CHANGED
    CONF_CHANGED=$((before | dbd_conf_changed))
    if pid_of "$SLURMDBD_PID" slurmdbd >/dev/null && ((dbd_conf_changed == 0)) && dbd_ok; then
        :
    else
        stop_pidfile "$SLURMDBD_PID" slurmdbd 30
        # Without SLURM_CONF: slurmdbd looks for slurmdbd.conf beside it, and it serves both clusters.
        env -u SLURM_CONF slurmdbd </dev/null >>"$LOG_DIR/daemons.out" 2>&1 9>&- || { ACCT_FAIL="slurmdbd exited at start"; return 1; }
        local i
        # The first start creates the tables: a few seconds.
        for ((i = 0; i < 600; i++)); do
            dbd_ok && break
            pid_of "$SLURMDBD_PID" slurmdbd >/dev/null || [ "$i" -lt 20 ] || break
            sleep 0.1
        done
        dbd_ok || { ACCT_FAIL="slurmdbd did not answer sacctmgr within 60 s"; return 1; }
    fi
    if ! sacctmgr -n -P list cluster format=cluster 2>/dev/null | grep -qx "$CLUSTER"; then
        sacctmgr -i add cluster "$CLUSTER" >>"$LOG_DIR/sacctmgr.log" 2>&1 ||
            { ACCT_FAIL="sacctmgr add cluster $CLUSTER failed"; return 1; }
    fi
}

MODE=$ACCOUNTING
if ((NODES == 2)); then
    # Its tests read array tasks and node lists from sacct, which only slurmdbd reports.
    [ "$ACCOUNTING" != shim ] || die "the two-node cluster needs slurmdbd accounting (RAG_HPC_SLURM_ACCOUNTING=shim)"
    if grep -qs "$SHIM_MARK" "$SHIM"; then
        die "the single-node cluster runs on the sacct shim $SHIM, which would answer for both clusters; bring it up with slurmdbd first (RAG_HPC_SLURM_ACCOUNTING=slurmdbd bash $0)"
    fi
    setup_slurmdbd || die "the two-node cluster needs slurmdbd accounting, but: $ACCT_FAIL"
    MODE=slurmdbd
elif [ "$ACCOUNTING" != shim ]; then
    if setup_slurmdbd; then
        MODE=slurmdbd
    elif [ "$ACCOUNTING" = slurmdbd ]; then
        die "slurmdbd accounting requested but: $ACCT_FAIL"
    else
        note "slurmdbd accounting unavailable ($ACCT_FAIL); falling back to the sacct shim (no array-task detail)"
        MODE=shim
    fi
fi
if [ "$MODE" = shim ]; then
    # Nothing may keep talking to a half-working slurmdbd once the config says there is none.
    stop_pidfile "$SLURMDBD_PID" slurmdbd 30
    stop_pidfile "$MARIADB_PID" mariadbd 60
    write_slurm_conf shim
    # Without slurmdbd the real sacct fails ("accounting storage is disabled") and submitit never sees
    # a job end that wrote no result (cancelled, killed): --completion reads the jobcomp file instead.
    if ! grep -qs "$SHIM_MARK" "$SHIM"; then
        if [ -e "$SHIM" ]; then
            die "$SHIM exists and is not ours; remove it or use RAG_HPC_SLURM_ACCOUNTING=slurmdbd"
        fi
        printf '#!/bin/sh\n# %s (slurm/up.sh): jobcomp file instead of slurmdbd.\nexec /usr/bin/sacct --completion "$@"\n' \
            "$SHIM_MARK" >"$SHIM"
        chmod 755 "$SHIM"
    fi
elif ((NODES == 1)); then
    # A shim left from an earlier fallback would hide the real accounting.
    if grep -qs "$SHIM_MARK" "$SHIM"; then rm -f "$SHIM"; fi
fi
echo "$MODE" >"$C_STATE/accounting"

# ---------------------------------------------------------------- the two-node cluster's network
# A bridge on this host and per node a network namespace joined to it by a veth pair: a node's only
# interfaces are its own loopback and eth0 at its address, so it reaches the controller and the other
# node over the bridge alone. The names go to /etc/hosts: jobs address nodes by name (MASTER_ADDR,
# and gloo binds to the address of its own hostname).
ensure_hosts() {
    local node want
    want=$(for node in $C_NODES; do echo "$(node_addr "$node") $node $HOSTS_MARK"; done)
    [ "$(grep -F "$HOSTS_MARK" /etc/hosts)" = "$want" ] && return 0
    # In place, not by rename: /etc/hosts may be a bind mount (containers).
    printf '%s\n%s\n' "$(hosts_without_mark)" "$want" >/etc/hosts
}

ipx() { ip "$@" || die "ip $* failed"; }
ensure_network() {
    local node veth addr
    ip link show "$BRIDGE" >/dev/null 2>&1 || ipx link add "$BRIDGE" type bridge
    ip -4 addr show dev "$BRIDGE" | grep -q "inet $BRIDGE_ADDR/24 " || ipx addr add "$BRIDGE_ADDR/24" dev "$BRIDGE"
    ipx link set "$BRIDGE" up
    for node in $C_NODES; do
        veth=$(node_veth "$node")
        addr=$(node_addr "$node")
        if ! ip netns exec "$node" true 2>/dev/null; then
            # A name without its namespace (/run/netns after a reboot) blocks `ip netns add`; a veth whose
            # other end is in a namespace no longer named would join the bridge to nothing.
            ip netns del "$node" 2>/dev/null || true
            ip link del "$veth" 2>/dev/null || true
            # A slurmd still alive there would answer no one: it starts again in the new namespace.
            stop_pidfile "$(slurmd_pidfile "$node")" slurmd 15
            ipx netns add "$node"
        fi
        if ! ip link show "$veth" >/dev/null 2>&1; then
            ip -n "$node" link del eth0 2>/dev/null || true
            ipx link add "$veth" type veth peer name eth0 netns "$node"
        fi
        ipx link set "$veth" master "$BRIDGE" up
        ip -n "$node" -4 addr show dev eth0 | grep -q "inet $addr/24 " || ipx -n "$node" addr add "$addr/24" dev eth0
        ipx -n "$node" link set lo up
        ipx -n "$node" link set eth0 up
    done
    ensure_hosts
}
if ((NODES == 2)); then ensure_network; fi

# ---------------------------------------------------------------- slurmctld, slurmd
if ((CONF_CHANGED)); then
    # `scontrol reconfigure` does not apply node, GRES or port changes: restart them all.
    stop_cluster_daemons
fi
mkdir -p "$C_STATE/slurmctld" "$C_STATE/slurmd"
ctld_ok() { scontrol ping 2>/dev/null | grep -q 'is UP'; }
if pid_of "$CTLD_PID" slurmctld >/dev/null; then
    # Alive but not answering for 10 s: hung, restart it.
    for ((i = 0; i < 100; i++)); do ctld_ok && break; sleep 0.1; done
    ctld_ok || stop_pidfile "$CTLD_PID" slurmctld 30
fi
if ! pid_of "$CTLD_PID" slurmctld >/dev/null; then
    slurmctld </dev/null >>"$C_LOG/daemons.out" 2>&1 9>&- || die "slurmctld exited at start"
fi
start_slurmd() {
    local node=$1
    pid_of "$(slurmd_pidfile "$node")" slurmd >/dev/null && return 0
    if ((NODES == 1)); then
        slurmd </dev/null >>"$C_LOG/daemons.out" 2>&1 9>&- || die "slurmd exited at start"
    else
        mkdir -p "$C_STATE/slurmd/$node"
        # In the node's network namespace, under its own hostname (UTS namespace). nsenter, not
        # `ip netns exec`, which mounts a /sys of its own, without the cgroup mounts slurmd checks.
        nsenter --net="/run/netns/$node" unshare --uts sh -c 'hostname "$1" && exec slurmd -f "$2" -N "$1"' sh "$node" "$SLURM_CONF" \
            </dev/null >>"$C_LOG/daemons.out" 2>&1 9>&- || die "slurmd of $node exited at start"
    fi
}
for node in $C_NODES; do start_slurmd "$node"; done

# ---------------------------------------------------------------- wait for usable nodes
declare -A last_resume=() restarted=() states=()
deadline=$(($(date +%s) + TIMEOUT))
while :; do
    waiting=()
    for node in $C_NODES; do
        state=$(sinfo -h -N -n "$node" -o %T 2>/dev/null | head -n 1 || true)
        states[$node]=$state
        case "$state" in
            idle | mixed | allocated | completing | "allocated+" | "mixed+" | "idle+") continue ;;
            *inval*)
                die "node $node is INVAL: $(scontrol show node "$node" 2>/dev/null | grep -o 'Reason=.*')" ;;
            *'*' | '')
                # Not responding (yet): slurmd may still be registering, or it died on start.
                if ! pid_of "$(slurmd_pidfile "$node")" slurmd >/dev/null && [ -z "${restarted[$node]:-}" ]; then
                    restarted[$node]=1
                    start_slurmd "$node"
                fi ;;
            *drain* | *down* | *fail*)
                # Left drained/down by an earlier crash or a killed job: put it back to work.
                if (($(date +%s) - ${last_resume[$node]:-0} >= 3)); then
                    scontrol update nodename="$node" state=resume >/dev/null 2>&1 || true
                    last_resume[$node]=$(date +%s)
                fi ;;
        esac
        waiting+=("$node")
    done
    ((${#waiting[@]} == 0)) && break
    if (($(date +%s) >= deadline)); then
        node=${waiting[0]}
        die "node $node not usable after ${TIMEOUT}s (sinfo state: '${states[$node]:-no answer}'; $(scontrol show node "$node" 2>/dev/null | grep -o 'Reason=.*' || echo 'slurmctld not answering'))"
    fi
    sleep 0.3
done
# A partition set DOWN/INACTIVE by hand would leave every submission pending.
for p in gpu urgent; do
    avail=$(sinfo -h -p "$p" -o %a 2>/dev/null | head -n 1)
    [ "$avail" = up ] || scontrol update partitionname="$p" state=up >/dev/null 2>&1 || true
done

elapsed=$(awk -v a="$T0" -v b="$(date +%s.%N)" 'BEGIN {printf "%.1f", b - a}')
if ((NODES == 1)); then
    echo "slurm up: node $HOST ${states[$HOST]} (cpus=$CPUS mem=${MEM_MB}MB gres=gpu:$NGPU) partitions gpu*,urgent accounting=$MODE state=$STATE in ${elapsed}s"
else
    nodes=$(for node in $C_NODES; do printf '%s %s(%s) %s' "${sep:-}" "$node" "$(node_addr "$node")" "${states[$node]}"; sep=,; done)
    echo "slurm up: cluster $CLUSTER nodes${nodes} (each cpus=$CPUS mem=${NODE_MEM_MB}MB gres=gpu:$NGPU, netns on $BRIDGE) slurmctld $BRIDGE_ADDR:$TWO_CTLD_PORT partitions gpu*,urgent accounting=$MODE SLURM_CONF=$SLURM_CONF state=$C_STATE in ${elapsed}s"
fi
