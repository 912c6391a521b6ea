#!/usr/bin/env bash
# A one-node SLURM cluster on this host (127.0.0.1), for the launcher tests: munge + slurmctld + slurmd from
# Debian's slurm-wlm (22.05). Needs root. Usage: local_cluster.sh start | stop | status
# `start` writes /etc/slurm/slurm.conf (the node gets this host's CPU count), starts the daemons and waits
# until the node is idle; `stop` stops them by PID. Exit status non-zero, with the reason, when it cannot.
set -euo pipefail
cmd=${1:-start}
H=$(hostname -s)
CPUS=$(nproc)
STATE=/var/spool/slurmctld
PIDS=/run/layerchop-slurm

MARK="# written by layerchop tests/slurm/local_cluster.sh"

stop() {  # only the daemons this script started (their PID files); munged is left running
  for name in slurmd slurmctld; do
    if [ -f "$PIDS/$name.pid" ]; then
      pid=$(cat "$PIDS/$name.pid")
      kill "$pid" 2>/dev/null || true
      for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      rm -f "$PIDS/$name.pid"
    fi
  done
}

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
if [ -f /etc/slurm/slurm.conf ] && [ "$(sinfo -h -o %T 2>/dev/null | head -n1)" = idle ]; then
  echo "local_cluster.sh: already running (node $H idle)"; exit 0
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

cat > /etc/slurm/slurm.conf <<CONF
$MARK
ClusterName=local
SlurmctldHost=$H(127.0.0.1)
SlurmUser=root
AuthType=auth/munge
StateSaveLocation=$STATE
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$PIDS/slurmctld.pid
SlurmdPidFile=$PIDS/slurmd.pid
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
ReturnToService=2
KillWait=10
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
NodeName=$H NodeAddr=127.0.0.1 CPUs=$CPUS State=UNKNOWN
PartitionName=debug Nodes=$H Default=YES MaxTime=INFINITE State=UP
CONF
slurmctld -c   # clear state: no jobs of an earlier run come back
slurmd
for _ in $(seq 1 60); do
  state=$(sinfo -h -o "%T" 2>/dev/null | head -n1 || true)
  [ "$state" = idle ] && { echo "local_cluster.sh: node $H idle ($CPUS CPUs)"; exit 0; }
  sleep 1
done
echo "local_cluster.sh: node $H not idle after 60 s (state '${state:-none}'); see /var/log/slurm/" >&2
exit 1
