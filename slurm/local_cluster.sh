#!/usr/bin/env bash
# A real 2-node SLURM cluster on this one machine, to try the templates and to test them:
# its own munged, a slurmctld and one slurmd per node (node1, node2), each on its own port.
#
#   slurm/local_cluster.sh start    install slurm-wlm + munge with apt if missing (needs root), start
#   slurm/local_cluster.sh status   exit 0 when both nodes are up
#   slurm/local_cluster.sh stop     stop exactly the daemons `start` started (by their pid files)
#
# Everything lives under $VLM_SLURM_DIR (default build/slurm): config, munge key and socket, state,
# logs, pid files. Point the clients at it with `export SLURM_CONF=build/slurm/slurm.conf`; the
# environment profile for jobs on it is build/slurm/profile.sh (vlm-submit --profile ...).
# The daemons run as root (SlurmUser=root): start/stop need root.
set -euo pipefail
cd "$(dirname "$0")/.."
DIR="$(realpath -m "${VLM_SLURM_DIR:-build/slurm}")"
CPUS_PER_NODE="${VLM_SLURM_CPUS_PER_NODE:-4}"  # declared, not detected (SlurmdParameters=config_overrides)
CTLD_PORT="${VLM_SLURM_PORT:-16817}"
NODES=(node1 node2)
export SLURM_CONF="$DIR/slurm.conf"

log() { echo "local_cluster: $*" >&2; }

install_packages() {
  command -v slurmctld >/dev/null && command -v munged >/dev/null && return 0
  if [ "$(id -u)" != 0 ]; then
    log "slurm-wlm and munge are not installed and installing them needs root"; return 1
  fi
  log "installing slurm-wlm and munge with apt"
  DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >"$DIR/apt.log" 2>&1 || {
    DEBIAN_FRONTEND=noninteractive apt-get update -q >>"$DIR/apt.log" 2>&1 &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q slurm-wlm munge >>"$DIR/apt.log" 2>&1; } || {
    log "apt-get install slurm-wlm munge failed (see $DIR/apt.log)"; return 1; }
}

write_config() {
  mkdir -p "$DIR"/{munge,state,spool,log}
  chmod 700 "$DIR/munge"
  [ -s "$DIR/munge/munge.key" ] || { head -c 1024 /dev/urandom >"$DIR/munge/munge.key"; chmod 400 "$DIR/munge/munge.key"; }
  cat >"$SLURM_CONF" <<CONF
# Written by slurm/local_cluster.sh: two nodes on one machine.
ClusterName=vlmlocal
SlurmctldHost=$(hostname)(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# cred_expire also delays a requeued job's restart (default 120 s).
AuthInfo=socket=$DIR/munge/munge.socket,cred_expire=15
StateSaveLocation=$DIR/state
SlurmdSpoolDir=$DIR/spool/%n
SlurmctldPidFile=$DIR/slurmctld.pid
SlurmdPidFile=$DIR/slurmd-%n.pid
SlurmctldLogFile=$DIR/log/slurmctld.log
SlurmdLogFile=$DIR/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
SchedulerType=sched/backfill
MpiDefault=none
JobCompType=jobcomp/none
AccountingStorageType=accounting_storage/none
ReturnToService=2
KillWait=15
MinJobAge=600
NodeName=node1 NodeHostname=$(hostname) NodeAddr=127.0.0.1 Port=17001 CPUs=$CPUS_PER_NODE State=UNKNOWN
NodeName=node2 NodeHostname=$(hostname) NodeAddr=127.0.0.1 Port=17002 CPUs=$CPUS_PER_NODE State=UNKNOWN
PartitionName=local Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP
CONF
  # The environment profile for jobs here: both "nodes" are this machine, whose name the node names
  # do not resolve to, so the first node's address is given.
  cat >"$DIR/profile.sh" <<'PROFILE'
# Environment profile of the local test cluster (slurm/local_cluster.sh); see slurm/profile.sh.
export MASTER_ADDR=127.0.0.1
export OMP_NUM_THREADS=1
# Two Ray nodes and the test's other processes share this machine's cores: Ray's agents start slowly.
export RAY_agent_register_timeout_ms=120000 RAY_raylet_start_wait_time_s=120
PROFILE
}

alive() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

wait_for() {  # wait_for SECONDS COMMAND...: until the command succeeds
  local deadline=$((SECONDS + $1)); shift
  until "$@" >/dev/null 2>&1; do
    [ "$SECONDS" -lt "$deadline" ] || return 1
    sleep 0.5
  done
}

nodes_idle() { [ "$(sinfo -h -N -o '%t' 2>/dev/null | grep -cE '^(idle|mix|alloc)')" = "${#NODES[@]}" ]; }

start() {
  mkdir -p "$DIR"
  install_packages
  write_config
  if ! alive "$DIR/munged.pid"; then
    munged --force --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" \
      --pid-file="$DIR/munged.pid" --log-file="$DIR/log/munged.log" --seed-file="$DIR/munge/seed"
    wait_for 10 test -S "$DIR/munge/munge.socket" || { log "munged did not start (see $DIR/log/munged.log)"; return 1; }
  fi
  # -c: a fresh queue each start (no jobs left from an earlier run)
  alive "$DIR/slurmctld.pid" || slurmctld -c -f "$SLURM_CONF"
  for node in "${NODES[@]}"; do
    alive "$DIR/slurmd-$node.pid" || slurmd -f "$SLURM_CONF" -N "$node"
  done
  # Nodes left DOWN by an earlier run come back (ReturnToService covers only unexpected reboots).
  wait_for 30 scontrol ping || { log "slurmctld did not answer (see $DIR/log)"; return 1; }
  wait_for 30 nodes_idle || scontrol update nodename=node[1-2] state=resume >/dev/null 2>&1 || true
  wait_for 30 nodes_idle || { log "the nodes did not come up: $(sinfo -N 2>&1)"; return 1; }
  log "up: export SLURM_CONF=$SLURM_CONF"
}

stop() {
  local pidfile pid
  for pidfile in "$DIR"/slurmd-*.pid "$DIR/slurmctld.pid" "$DIR/munged.pid"; do
    alive "$pidfile" || continue
    pid="$(cat "$pidfile")"
    kill "$pid"
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    rm -f "$pidfile"
  done
  log "stopped"
}

status() {
  alive "$DIR/slurmctld.pid" && nodes_idle && { sinfo -N; return 0; }
  echo "local cluster: not running"; return 1
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
