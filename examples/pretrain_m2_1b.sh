#!/usr/bin/env bash
# M2-Encoder 1B (hidden 1024, 16 heads, 21 backbone + 3 VL layers) on one 8-GPU node (H100 80 GB): pure data
# parallel (TP=1 PP=1 DP=8, the ITC group = all data-parallel ranks). The planner's fastest layout for these GPUs,
# memory and contrastive batch (tests/test_examples.py holds it to it):
#   python tools/plan.py --model 1b --num-gpus 8 --use-distributed-optimizer --micro-batch-size 64 \
#       --global-batch-size 8192 --explain
# predicts 2.3 s/step at 43.5 GiB per GPU (TP=2, the earlier layout: 3.1 s/step). On more nodes (NNODES=N) DP grows.
# Check the layout without GPUs: `bash examples/pretrain_m2_1b.sh --dry-run`.
RUN_NAME=m2_1b
MODEL_ARGS=(--model 1b --spec auto --bf16)
PARALLEL_ARGS=(--tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 --use-distributed-optimizer
               --overlap-grad-reduce --overlap-param-gather --itc-group-size ${ITC_GROUP_SIZE:-0})
TRAIN_ARGS=(--micro-batch-size 64 --global-batch-size ${GLOBAL_BATCH_SIZE:-8192} --train-iters ${TRAIN_ITERS:-200000}
            --lr 3e-4 --min-lr 1e-6 --lr-warmup-iters 2000 --weight-decay 0.05 --clip-grad 1.0
            --log-interval 10 --save-interval 1000)
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
