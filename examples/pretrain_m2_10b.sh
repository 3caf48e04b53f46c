#!/usr/bin/env bash
# M2-Encoder 10B (hidden 4096, 32 heads, 21 backbone + 3 VL layers) on 32 GPUs (4 nodes x 8 H100 80 GB):
# TP=1, PP=4 across the nodes ([6, 6, 6, 3] backbone layers, the 3 VL layers on stage 4), DP=8 inside each node,
# the ITC group = all 8 data-parallel ranks (contrastive batch = the global batch), no activation recompute.
# The planner's fastest layout for these GPUs, memory and contrastive batch (tests/test_examples.py holds it to it):
#   python tools/plan.py --model 10b --num-gpus 32 --use-distributed-optimizer --explain
# predicts 4.1 s/step at 41.5 GiB per GPU; TP=8 PP=4 (the earlier layout) needs recompute and 9.2 s/step.
# Check the layout without GPUs: `bash examples/pretrain_m2_10b.sh --dry-run`.
RUN_NAME=m2_10b
NNODES=${NNODES:-4}
MODEL_ARGS=(--model 10b --spec auto --bf16)
PARALLEL_ARGS=(--tensor-model-parallel-size 1 --pipeline-model-parallel-size 4 --use-distributed-optimizer
               --overlap-grad-reduce --overlap-param-gather --itc-group-size ${ITC_GROUP_SIZE:-0})
TRAIN_ARGS=(--micro-batch-size 8 --global-batch-size ${GLOBAL_BATCH_SIZE:-4096} --train-iters ${TRAIN_ITERS:-500000}
            --lr 1e-4 --min-lr 1e-6 --lr-warmup-iters 2000 --weight-decay 0.05 --clip-grad 1.0
            --log-interval 10 --save-interval 1000)
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
