#!/usr/bin/env bash
# A one-node Slurm (munged + slurmctld + slurmd, no systemd, no cgroups) for trying the sbatch scripts on one machine
# and for the CI-optional test in tests/test_slurm.py. Needs root and Debian/Ubuntu's packages:
#   apt-get install slurmd slurmctld slurm-client munge
#   bash examples/slurm/local_slurm.sh start DIR [CTLD_PORT]   then: export SLURM_CONF=DIR/slurm.conf
#   bash examples/slurm/local_slurm.sh stop DIR
# The node offers its CPUs and no GPUs: submit with --gpus-per-node=0 and GPUS_PER_NODE=<processes per node>.
set -euo pipefail
action=${1:?usage: local_slurm.sh start|stop DIR [CTLD_PORT]}
dir=$(realpath -m "${2:?usage: local_slurm.sh start|stop DIR [CTLD_PORT]}")
port=${3:-16817}

stop_daemon() {  # by the pid file the daemon wrote, never by name
  local pid_file=$1
  if [[ -s "$pid_file" ]]; then kill "$(cat "$pid_file")" 2>/dev/null || true; rm -f "$pid_file"; fi
}

if [[ "$action" == stop ]]; then
  stop_daemon "$dir/slurmd.pid"
  stop_daemon "$dir/slurmctld.pid"
  stop_daemon "$dir/munge/munged.pid"
  exit 0
fi
[[ "$action" == start ]] || { echo "local_slurm.sh: unknown action '$action'" >&2; exit 2; }
[[ $(id -u) == 0 ]] || { echo "local_slurm.sh: run as root (slurmd and munged need it)" >&2; exit 1; }

mkdir -p "$dir"/{state,spool,log,munge}
chown munge:munge "$dir/munge"
# munged and the slurm daemons meet on munge's default socket; reuse a munged that already answers.
if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
  mkdir -p /run/munge && chown munge:munge /run/munge
  [[ -s /etc/munge/munge.key ]] || { echo "local_slurm.sh: /etc/munge/munge.key missing (reinstall munge)" >&2; exit 1; }
  su -s /bin/sh munge -c "/usr/sbin/munged --pid-file=$dir/munge/munged.pid --log-file=$dir/munge/munged.log \
    --seed-file=$dir/munge/munge.seed"
fi

host=$(hostname -s)
mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 / 2)}' /proc/meminfo)
cat > "$dir/slurm.conf" <<CONF
ClusterName=m2local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=$dir/state
SlurmdSpoolDir=$dir/spool
SlurmctldPidFile=$dir/slurmctld.pid
SlurmdPidFile=$dir/slurmd.pid
SlurmctldLogFile=$dir/log/slurmctld.log
SlurmdLogFile=$dir/log/slurmd.log
SlurmctldPort=$port
SlurmdPort=$((port + 1))
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
JobAcctGatherType=jobacct_gather/none
MpiDefault=none
ReturnToService=2
NodeName=$host CPUs=$(nproc) RealMemory=$mem_mb State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
CONF
export SLURM_CONF=$dir/slurm.conf
/usr/sbin/slurmctld -c -i
/usr/sbin/slurmd
for _ in $(seq 1 60); do
  if sinfo --noheader --states=idle 2>/dev/null | grep -q idle; then echo "export SLURM_CONF=$SLURM_CONF"; exit 0; fi
  sleep 0.5
done
echo "local_slurm.sh: the node did not become idle; see $dir/log" >&2
exit 1
