#!/usr/bin/env bash
# A local SLURM cluster for the launcher tests: munge + slurmctld + slurmd from Debian's slurm-wlm (22.05).
# Needs root. Usage: local_cluster.sh start | stop | status
#
# Two nodes where the host allows it: each node is a network namespace (lcn1, lcn2) with its own address on
# a bridge (10.201.0.11 and .12; the controller listens on 10.201.0.1) and its own host name (lc1, lc2, in a
# UTS namespace, written into /etc/hosts), so a 2-node job's tasks reach each other over a network, as on a
# cluster, and SLURM_NODELIST, srun and torch.distributed's rendezvous see two hosts. Where namespaces
# cannot be made (no iproute2, no bridge or veth support), one node on 127.0.0.1 (this host's name), and
# `status` says so. LAYERCHOP_SLURM_NODES=1 asks for the one-node form.
# `start` writes /etc/slurm/slurm.conf (each node gets this host's CPU count), starts the daemons and waits
# until every node is idle; `stop` stops what it started (PID files), removes the namespaces, the bridge
# and its /etc/hosts lines. Exit status non-zero, with the reason, when it cannot start.
set -euo pipefail
cmd=${1:-start}
H=$(hostname -s)
CPUS=$(nproc)
STATE=/var/spool/slurmctld
PIDS=/run/layerchop-slurm

MARK="# written by layerchop tests/slurm/local_cluster.sh"
NET=${LAYERCHOP_SLURM_NET:-10.201.0}  # the nodes' /24 (change it where it would shadow a real network)

stop() {  # what this script started: jobs, daemons (their PID files), namespaces; munged is left running
  if [ -f "$PIDS/slurmctld.pid" ] && kill -0 "$(cat "$PIDS/slurmctld.pid")" 2>/dev/null; then
    scancel --full --partition=debug 2>/dev/null || true  # no job left training (or holding a namespace)
  fi
  for pidfile in "$PIDS"/slurmd*.pid "$PIDS"/slurmctld.pid; do
    [ -f "$pidfile" ] || continue
    pid=$(cat "$pidfile")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
    rm -f "$pidfile"
  done
  net_down
}

net_down() {
  for i in 1 2; do
    if [ -e "/run/netns/lcn$i" ]; then
      for pid in $(ip netns pids "lcn$i" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
      ip netns del "lcn$i" 2>/dev/null || true
    fi
    ip link del "lcv$i" 2>/dev/null || true
  done
  ip link del lcbr0 2>/dev/null || true
  if grep -qF "$MARK" /etc/hosts 2>/dev/null; then
    # rewritten in place (it may be a bind mount, which a rename would fail on), from a copy kept meanwhile
    cp /etc/hosts /etc/hosts.layerchop-backup
    { grep -vF "$MARK" /etc/hosts.layerchop-backup || true; } > /etc/hosts
    rm -f /etc/hosts.layerchop-backup
  fi
}

net_make() {  # (`set -e` does not apply in an `if` condition: every step checked)
  ip link add lcbr0 type bridge || return 1
  ip addr add "$NET.1/24" dev lcbr0 || return 1
  ip link set lcbr0 up || return 1
  for i in 1 2; do
    ip netns add "lcn$i" || return 1
    ip link add "lcv$i" type veth peer name eth0 netns "lcn$i" || return 1
    ip link set "lcv$i" master lcbr0 || return 1
    ip link set "lcv$i" up || return 1
    ip -n "lcn$i" addr add "$NET.1$i/24" dev eth0 || return 1
    ip -n "lcn$i" link set eth0 up || return 1
    ip -n "lcn$i" link set lo up || return 1
  done
}

net_up() {  # two namespaces on a bridge; returns non-zero, having cleaned up, where the host cannot
  for bin in ip unshare nsenter; do command -v "$bin" >/dev/null || return 1; done
  if ! net_make 2>/dev/null; then
    net_down
    return 1
  fi
  printf '%s\n' "$NET.11 lc1 $MARK" "$NET.12 lc2 $MARK" >> /etc/hosts || { net_down; return 1; }
}

nodes_talk() {  # node 2 reaches node 1's slurmd port (a bridge whose traffic a firewall drops fails here)
  nsenter --net=/run/netns/lcn2 timeout 5 bash -c "exec 3<>/dev/tcp/$NET.11/6818" 2>/dev/null
}

if [ -f /etc/hosts.layerchop-backup ] && ! [ -s /etc/hosts ]; then  # a stop killed mid-rewrite
  cat /etc/hosts.layerchop-backup > /etc/hosts
fi

case "$cmd" in
  stop) stop; exit 0 ;;
  status) sinfo -h -o "%N %T %c"; exit 0 ;;
  start) ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac

[ "$(id -u)" = 0 ] || { echo "local_cluster.sh: needs root (munged and slurmd run as root here)" >&2; exit 1; }
for bin in munged slurmctld slurmd sbatch; do
  command -v "$bin" >/dev/null || { echo "local_cluster.sh: $bin not installed (apt-get install slurm-wlm munge)" >&2; exit 1; }
done
if [ -f /etc/slurm/slurm.conf ] && ! grep -qxF "$MARK" /etc/slurm/slurm.conf; then
  echo "local_cluster.sh: /etc/slurm/slurm.conf exists and is not this script's: not touching a real SLURM" >&2
  exit 1
fi
if [ -f /etc/slurm/slurm.conf ] && [ -z "$(sinfo -h -o %T 2>/dev/null | grep -vx idle)" ] \
   && [ -n "$(sinfo -h -o %T 2>/dev/null)" ]; then
  echo "local_cluster.sh: already running ($(sinfo -h -o '%D node(s) %T' | head -n1))"; exit 0
fi
stop
mkdir -p "$PIDS" /etc/munge /var/log/munge /run/munge /var/lib/munge "$STATE" /var/spool/slurmd /var/log/slurm /etc/slurm
if [ ! -s /etc/munge/munge.key ]; then
  dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
fi
chown -R munge:munge /etc/munge /var/log/munge /run/munge /var/lib/munge 2>/dev/null || true
chmod 0400 /etc/munge/munge.key
munge -n 2>/dev/null | unmunge >/dev/null 2>&1 || munged --force
munge -n | unmunge >/dev/null || { echo "local_cluster.sh: munge does not authenticate" >&2; exit 1; }

launch() {  # $1 = 2: two namespaced nodes; 1: this host. Returns non-zero if the nodes do not come up.
  if [ "$1" = 2 ]; then
    CTLD="$NET.1"; NODES=lc1,lc2
    NODELINES="NodeName=lc1 NodeAddr=$NET.11 CPUs=$CPUS State=UNKNOWN
NodeName=lc2 NodeAddr=$NET.12 CPUs=$CPUS State=UNKNOWN"
  else
    CTLD=127.0.0.1; NODES=$H; NODELINES="NodeName=$H NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN"
  fi
  cat > /etc/slurm/slurm.conf <<CONF
$MARK
ClusterName=local
SlurmctldHost=$H($CTLD)
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$STATE
SlurmdSpoolDir=/var/spool/slurmd/%n
SlurmctldPidFile=$PIDS/slurmctld.pid
SlurmdPidFile=$PIDS/slurmd-%n.pid
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
KillWait=10
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd-%n.log
$NODELINES
PartitionName=debug Nodes=$NODES Default=YES MaxTime=INFINITE State=UP
CONF
  slurmctld -c   # clear state: no jobs of an earlier run come back
  if [ "$1" = 2 ]; then
    for i in 1 2; do  # each node: its own network and host name; the job steps it starts inherit both
      mkdir -p "/var/spool/slurmd/lc$i"
      # nsenter, not `ip netns exec`: that remounts /sys, without the cgroup mount slurmd needs
      nsenter --net="/run/netns/lcn$i" unshare --uts sh -c "hostname lc$i && exec slurmd -N lc$i"
    done
  else
    mkdir -p "/var/spool/slurmd/$H"
    slurmd
  fi
  for _ in $(seq 1 60); do
    idle=$(sinfo -h -N -o "%T" 2>/dev/null | grep -cx idle || true)
    if [ "$idle" = "$1" ]; then
      if [ "$1" = 2 ] && ! nodes_talk; then
        echo "local_cluster.sh: node lc2 cannot reach lc1 at $NET.11:6818" >&2
        return 1
      fi
      echo "local_cluster.sh: $1 node(s) idle ($NODES; $CPUS CPUs each)"
      return 0
    fi
    sleep 1
  done
  echo "local_cluster.sh: $NODES not idle after 60 s ($(sinfo -h -N -o '%N %T' 2>/dev/null | tr '\n' ' '));" \
       "see /var/log/slurm/" >&2
  return 1
}

if [ "${LAYERCHOP_SLURM_NODES:-2}" = 2 ] && net_up; then
  launch 2 && exit 0
  echo "local_cluster.sh: falling back to one node" >&2
  stop
fi
launch 1
