#!/usr/bin/env bash
# SLURM_* -> the rendezvous environment that examples/launch.sh turns into torchrun flags:
#   NNODES, NODE_RANK, GPUS_PER_NODE, MASTER_ADDR, MASTER_PORT.
#
#   source examples/slurm/slurm_env.sh && m2_slurm_job_env     in the batch script, on the host (needs scontrol)
#   bash examples/slurm/slurm_env.sh CMD [ARG...]              in each srun task (one per node, maybe in a container
#                                                              without scontrol): adds NODE_RANK, then execs CMD
#   bash examples/slurm/slurm_env.sh --print                   prints the variables (debugging, tests)
# Values already in the environment win, so a user can override any of them.

# The job-wide part: the same on every node, so the batch script computes it once and srun exports it to the tasks.
m2_slurm_job_env() {
  : "${SLURM_JOB_ID:?not inside a Slurm job (SLURM_JOB_ID unset)}"
  export NNODES=${NNODES:-${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:?SLURM_JOB_NUM_NODES unset}}}
  if [[ -z "${MASTER_ADDR:-}" ]]; then
    # The first host of the allocation runs torchrun's rendezvous store (node rank 0).
    # (no `| head -n 1`: under pipefail, scontrol's SIGPIPE would fail the job on multi-node allocations)
    local hosts
    hosts=$(scontrol show hostnames "${SLURM_JOB_NODELIST:?SLURM_JOB_NODELIST unset}")
    MASTER_ADDR=${hosts%%$'\n'*}
    [[ -n "$MASTER_ADDR" ]] || { echo "slurm_env.sh: scontrol gave no host for '$SLURM_JOB_NODELIST'" >&2; return 1; }
    export MASTER_ADDR
  fi
  # A port per job, so two jobs sharing a node do not collide; a requeued job keeps its id and port.
  export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
  # --gpus-per-node=8 sets SLURM_GPUS_ON_NODE=8 and SLURM_GPUS_PER_NODE=8 (or "h100:8" with a GPU type).
  local gpus=${SLURM_GPUS_ON_NODE:-${SLURM_GPUS_PER_NODE:-8}}
  export GPUS_PER_NODE=${GPUS_PER_NODE:-${gpus##*:}}
}

# The per-node part: srun --ntasks-per-node=1 gives each node's task its node index.
m2_slurm_task_env() {
  export NODE_RANK=${NODE_RANK:-${SLURM_NODEID:-${SLURM_PROCID:?neither SLURM_NODEID nor SLURM_PROCID is set}}}
}

if [[ "${BASH_SOURCE[0]}" == "$0" ]]; then
  set -euo pipefail
  m2_slurm_job_env  # MASTER_ADDR etc. exported by the batch script are kept; scontrol only runs without them
  m2_slurm_task_env
  if [[ "${1:-}" == "--print" ]]; then
    for name in NNODES NODE_RANK GPUS_PER_NODE MASTER_ADDR MASTER_PORT; do echo "$name=${!name}"; done
    exit 0
  fi
  [[ $# -gt 0 ]] || { echo "usage: slurm_env.sh CMD [ARG...] | --print" >&2; exit 2; }
  exec "$@"
fi
