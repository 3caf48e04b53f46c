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

stop_daemon() {  # by the pid file the daemon wrote, never by name; waits until it has exited
  local pid_file=$1 pid
  [[ -s "$pid_file" ]] || return 0
  pid=$(cat "$pid_file")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || { rm -f "$pid_file"; return 0; }; sleep 0.1; done
  echo "local_slurm.sh: pid $pid (from $pid_file) did not exit" >&2
  return 1
}

if [[ "$action" == stop ]]; then
  # Cancel this cluster's jobs first: slurmstepd outlives slurmd by design, so a job cut short would leave its steps.
  if [[ -s "$dir/slurmctld.pid" ]]; then
    SLURM_CONF=$dir/slurm.conf squeue --noheader --format=%A 2>/dev/null | xargs -r env SLURM_CONF="$dir/slurm.conf" scancel || true
  fi
  status=0
  stop_daemon "$dir/slurmd.pid" || status=1
  stop_daemon "$dir/slurmctld.pid" || status=1
  stop_daemon "$dir/munge/munged.pid" || status=1
  exit $status
fi
[[ "$action" == start ]] || { echo "local_slurm.sh: unknown action '$action'" >&2; exit 2; }
[[ $(id -u) == 0 ]] || { echo "local_slurm.sh: run as root (slurmd and munged need it)" >&2; exit 1; }

mkdir -p "$dir"/{state,spool,log,munge}
chmod 700 "$dir/munge"
# A private munged for this cluster: its own key, socket, log and pid file in DIR, named in slurm.conf (AuthInfo), so
# it never touches a system munged, /run/munge or /etc/munge. It runs as root because DIR may sit below a directory
# only root can enter (pytest's tmp_path is under a 0700 /tmp/pytest-of-root): munged as the `munge` user failed
# there with "Failed to check logfile ...: Permission denied". --force: munged otherwise refuses a socket that other
# users cannot reach; every client of this cluster runs as root.
socket=$dir/munge/munge.socket
(( ${#socket} < 100 )) || { echo "local_slurm.sh: DIR is too long for a unix socket path: $socket" >&2; exit 1; }
[[ -s "$dir/munge/munge.key" ]] || { (umask 077 && head -c 1024 /dev/urandom > "$dir/munge/munge.key"); }
/usr/sbin/munged --force --key-file="$dir/munge/munge.key" --socket="$socket" --pid-file="$dir/munge/munged.pid" \
  --log-file="$dir/munge/munged.log" --seed-file="$dir/munge/munge.seed"
munge -S "$socket" -n | unmunge -S "$socket" >/dev/null || { echo "local_slurm.sh: munged does not answer" >&2; exit 1; }

host=$(hostname -s)
mem_mb=$(awk '/MemTotal/ {print int($2 / 1024 / 2)}' /proc/meminfo)
cat > "$dir/slurm.conf" <<CONF
ClusterName=m2local
SlurmctldHost=$host
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=socket=$socket
CredType=cred/munge
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
