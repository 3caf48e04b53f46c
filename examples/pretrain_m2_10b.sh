#!/usr/bin/env bash
# M2-Encoder 10B (hidden 4096, 32 heads, 21 backbone + 3 VL layers) on 32+ GPUs (4 nodes x 8 GPUs):
# TP=8 inside a node, PP=4 across nodes ([6, 6, 6, 3] backbone layers, the 3 VL layers on stage 4), DP = world / 32.
# Check the layout without GPUs: `bash examples/pretrain_m2_10b.sh --dry-run` (see also tools/plan.py).
RUN_NAME=m2_10b
NNODES=${NNODES:-4}
MODEL_ARGS=(--model 10b --spec auto --bf16 --recompute-activations)
PARALLEL_ARGS=(--tensor-model-parallel-size 8 --pipeline-model-parallel-size 4 --use-distributed-optimizer
               --overlap-grad-reduce --overlap-param-gather --sequence-parallel --itc-group-size ${ITC_GROUP_SIZE:-0})
TRAIN_ARGS=(--micro-batch-size 8 --global-batch-size ${GLOBAL_BATCH_SIZE:-4096} --train-iters ${TRAIN_ITERS:-500000}
            --lr 1e-4 --min-lr 1e-6 --lr-warmup-iters 2000 --weight-decay 0.05 --clip-grad 1.0
            --log-interval 10 --save-interval 1000)
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
