#!/usr/bin/env bash
# M2-Encoder 0.4B (hidden 768, 12 heads, 9 backbone + 3 VL layers) on one 8-GPU node (H100 80 GB): pure data
# parallel (TP=1 PP=1 DP=8, the ITC group = all data-parallel ranks). The planner's fastest layout for these GPUs,
# memory and contrastive batch (tests/test_examples.py holds it to it):
#   python tools/plan.py --model 0.4b --num-gpus 8 --use-distributed-optimizer --micro-batch-size 128 \
#       --global-batch-size 8192 --explain
# predicts 0.71 s/step at 31.8 GiB per GPU; decoding needs about 8 CPU cores per GPU to keep up (cores/GPU).
# Check the layout without GPUs: `bash examples/pretrain_m2_0.4b.sh --dry-run`.
RUN_NAME=m2_0.4b
MODEL_ARGS=(--model 0.4b --spec auto --bf16)
PARALLEL_ARGS=(--tensor-model-parallel-size 1 --pipeline-model-parallel-size 1 --use-distributed-optimizer
               --overlap-grad-reduce --overlap-param-gather --itc-group-size ${ITC_GROUP_SIZE:-0})
TRAIN_ARGS=(--micro-batch-size 128 --global-batch-size ${GLOBAL_BATCH_SIZE:-8192} --train-iters ${TRAIN_ITERS:-200000}
            --lr 5e-4 --min-lr 1e-6 --lr-warmup-iters 2000 --weight-decay 0.05 --clip-grad 1.0
            --log-interval 10 --save-interval 1000)
source "$(dirname "${BASH_SOURCE[0]}")/launch.sh"
