#!/usr/bin/env bash
# Shared launcher of the pretrain_m2_*.sh examples; each example sets MODEL_ARGS, PARALLEL_ARGS, TRAIN_ARGS first.
#
# Environment (one node by default; examples/slurm/*.sbatch fill these in from SLURM_*):
#   NNODES, NODE_RANK, GPUS_PER_NODE, MASTER_ADDR, MASTER_PORT   torchrun rendezvous
#   DATA_PATH         webdataset tar shards (brace patterns allowed)
#   TOKENIZER_MODEL   SentencePiece model of the GLM-compatible tokenizer
#   CHECKPOINT_DIR    --save and --load (the same directory: a requeued job resumes from its latest checkpoint)
#   TENSORBOARD_DIR   TensorBoard logs
# Any extra arguments are passed to the trainer, e.g. `bash examples/pretrain_m2_10b.sh --dry-run`.
set -euo pipefail

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
GPUS_PER_NODE=${GPUS_PER_NODE:-8}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
CHECKPOINT_DIR=${CHECKPOINT_DIR:-checkpoints/${RUN_NAME}}
TENSORBOARD_DIR=${TENSORBOARD_DIR:-${CHECKPOINT_DIR}/tensorboard}
WORLD_SIZE=$((NNODES * GPUS_PER_NODE))

DATA_ARGS=(--data-path ${DATA_PATH:?set DATA_PATH to your webdataset shards} --tokenizer-model "${TOKENIZER_MODEL:?set TOKENIZER_MODEL}")
IO_ARGS=(--save "$CHECKPOINT_DIR" --load "$CHECKPOINT_DIR" --tensorboard-dir "$TENSORBOARD_DIR")

for arg in "$@"; do
  if [[ "$arg" == "--dry-run" ]]; then
    # No GPUs needed: validate the layout and print per-rank parameters and the memory estimate.
    exec python -m megatron_m2.train "${MODEL_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${TRAIN_ARGS[@]}" \
      "${DATA_ARGS[@]}" "${IO_ARGS[@]}" --world-size "$WORLD_SIZE" "$@"
  fi
done

export CUDA_DEVICE_MAX_CONNECTIONS=1  # megatron-core overlaps TP communication with compute only with this
exec torchrun --nnodes "$NNODES" --node-rank "$NODE_RANK" --nproc-per-node "$GPUS_PER_NODE" \
  --master-addr "$MASTER_ADDR" --master-port "$MASTER_PORT" \
  -m megatron_m2.train "${MODEL_ARGS[@]}" "${PARALLEL_ARGS[@]}" "${TRAIN_ARGS[@]}" \
  "${DATA_ARGS[@]}" "${IO_ARGS[@]}" "$@"
