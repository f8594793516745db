#!/usr/bin/env bash
# A real single-node SLURM cluster on this Debian machine, for the launcher tests:
# munge, MariaDB + slurmdbd (accounting: without it submitit waits forever on a cancelled
# job), slurmctld and slurmd. Idempotent.
#
#   scripts/slurm_local.sh start    # install if needed, start everything, wait until idle
#   scripts/slurm_local.sh stop     # stop the daemons `start` started (and nothing else)
#   scripts/slurm_local.sh status   # exit 0 when the node answers
#   scripts/slurm_local.sh env      # print the export line for SLURM_CONF
#
# State lives in $IH_SLURM_DIR (default /tmp/ih_sweep_slurm). Runs as root (CI does).
set -euo pipefail

DIR=${IH_SLURM_DIR:-/tmp/ih_sweep_slurm}
CONF=$DIR/etc/slurm.conf
DB_PORT=${IH_SLURM_DB_PORT:-3399}
DBD_PORT=${IH_SLURM_DBD_PORT:-6819}
CTLD_PORT=${IH_SLURM_CTLD_PORT:-6817}
SLURMD_PORT=${IH_SLURM_SLURMD_PORT:-6818}
export SLURM_CONF=$CONF

STARTED=$DIR/run/started   # "<name> <pid file>" of each daemon this script started

log() { echo "[slurm_local] $*" >&2; }

started() {  # started NAME PIDFILE: remember that this script started the daemon
  mkdir -p "$DIR/run"
  echo "$1 $2" >>"$STARTED"
}

wait_for() {  # wait_for SECONDS DESCRIPTION COMMAND...
  local limit=$1 what=$2
  shift 2
  for _ in $(seq 1 "$((limit * 2))"); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 0.5
  done
  log "timed out waiting for $what"
  return 1
}

install() {
  local missing=()
  for bin in munged slurmctld slurmd sbatch slurmdbd mariadbd; do
    command -v "$bin" >/dev/null 2>&1 || [ -x "/usr/sbin/$bin" ] || missing+=("$bin")
  done
  [ ${#missing[@]} -eq 0 ] && return 0
  log "installing SLURM (missing: ${missing[*]})"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends munge slurmctld slurmd slurm-client \
    slurmdbd mariadb-server >/dev/null
}

write_configs() {
  mkdir -p "$DIR"/{etc,state,spool,log,run,mysql}
  local cpus mem
  cpus=$(nproc)
  mem=$(/usr/sbin/slurmd -C 2>/dev/null | sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p')
  mem=$(( ${mem:-4096} * 9 / 10 ))
  cat >"$CONF" <<EOF
ClusterName=ihsweep
SlurmctldHost=localhost
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
SlurmUser=root
AuthType=auth/munge
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
EnforcePartLimits=ALL
ReturnToService=2
MpiDefault=none
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool
SlurmctldPidFile=$DIR/run/slurmctld.pid
SlurmdPidFile=$DIR/run/slurmd.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd.log
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=5
KillWait=5
MinJobAge=60
NodeName=localhost CPUs=$cpus RealMemory=$mem State=UNKNOWN
PartitionName=debug Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
  cat >"$DIR/etc/slurmdbd.conf" <<EOF
AuthType=auth/munge
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$DIR/run/slurmdbd.pid
LogFile=$DIR/log/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
EOF
  chmod 600 "$DIR/etc/slurmdbd.conf"
}

start_munge() {
  if pgrep -x munged >/dev/null; then return 0; fi
  mkdir -p /run/munge /var/log/munge /var/lib/munge /etc/munge
  chown munge:munge /run/munge /var/log/munge /var/lib/munge /etc/munge
  if [ ! -s /etc/munge/munge.key ]; then
    mungekey --create --keyfile=/etc/munge/munge.key
  fi
  chown munge:munge /etc/munge/munge.key
  chmod 400 /etc/munge/munge.key
  runuser -u munge -- /usr/sbin/munged --force --pid-file=/run/munge/munged.pid
  wait_for 10 munge munge -n
  started munged /run/munge/munged.pid
}

start_mariadb() {
  local sock=$DIR/mysql.sock
  if [ -S "$sock" ] && mariadb -S "$sock" -u root -e 'select 1' >/dev/null 2>&1; then
    return 0
  fi
  if [ ! -d "$DIR/mysql/mysql" ]; then
    mariadb-install-db --user=root --datadir="$DIR/mysql" >/dev/null
  fi
  (setsid mariadbd --user=root --datadir="$DIR/mysql" --socket="$sock" --port="$DB_PORT" \
     --bind-address=127.0.0.1 --pid-file="$DIR/run/mariadb.pid" \
     --log-error="$DIR/log/mariadb.log" >/dev/null 2>&1 &)
  wait_for 30 mariadb mariadb -S "$sock" -u root -e 'select 1'
  started mariadbd "$DIR/run/mariadb.pid"
  mariadb -S "$sock" -u root <<'EOF'
CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY 'slurm';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';
GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost';
FLUSH PRIVILEGES;
EOF
}

start_slurm() {
  if ! pgrep -x slurmdbd >/dev/null; then
    /usr/sbin/slurmdbd
    started slurmdbd "$DIR/run/slurmdbd.pid"
    wait_for 30 slurmdbd sacctmgr -n list cluster
  fi
  sacctmgr -i -Q add cluster ihsweep >/dev/null 2>&1 || true
  if ! pgrep -x slurmctld >/dev/null; then
    /usr/sbin/slurmctld
    started slurmctld "$DIR/run/slurmctld.pid"
    wait_for 30 slurmctld scontrol ping
  fi
  if ! pgrep -x slurmd >/dev/null; then
    /usr/sbin/slurmd -N localhost
    started slurmd "$DIR/run/slurmd.pid"
  fi
  wait_for 60 "an idle node" bash -c "sinfo -h -o '%t' | grep -qE '^(idle|mix|alloc)'"
  scontrol update nodename=localhost state=resume >/dev/null 2>&1 || true
}

cmd_start() {
  install
  write_configs
  start_munge
  start_mariadb
  start_slurm
  wait_for 60 "srun true" timeout 30 srun -t 1 true
  log "cluster up (SLURM_CONF=$CONF)"
}

alive() {  # alive PID: running (a zombie has ended: only its parent has yet to reap it)
  local state
  state=$(awk '{print $3}' "/proc/$1/stat" 2>/dev/null) || return 1
  [ -n "$state" ] && [ "$state" != Z ]
}

stop_started() {  # stop_started NAME PIDFILE: TERM the recorded process, then wait for it
  local name=$1 file=$2 pid
  [ -s "$file" ] || { log "$name: no pid file $file (already stopped?)"; return 0; }
  pid=$(cat "$file")
  # the pid must still be the daemon we started, not a process that reused the number
  if [ "$(cat "/proc/$pid/comm" 2>/dev/null)" != "$name" ]; then
    log "$name: pid $pid from $file is not running $name; nothing to stop"
    return 0
  fi
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 40); do
    if ! alive "$pid"; then log "stopped $name (pid $pid)"; return 0; fi
    sleep 0.25
  done
  log "$name (pid $pid) ignored TERM for 10 s: KILL"
  kill -9 "$pid" 2>/dev/null || true
}

cmd_stop() {
  [ -f "$STARTED" ] || { log "nothing was started by this script"; return 0; }
  local name file
  # the reverse of the order they were started in: slurmd before slurmctld before munged
  while read -r name file; do
    stop_started "$name" "$file"
  done < <(tac "$STARTED")
  rm -f "$STARTED"
}

cmd_status() {
  [ -f "$CONF" ] && timeout 10 sinfo -h -o '%t' 2>/dev/null | grep -qE '^(idle|mix|alloc)'
}

case "${1:-}" in
  start) cmd_start ;;
  stop) cmd_stop ;;
  status) cmd_status ;;
  env) echo "export SLURM_CONF=$CONF" ;;
  *) echo "usage: $0 start|stop|status|env" >&2; exit 2 ;;
esac
