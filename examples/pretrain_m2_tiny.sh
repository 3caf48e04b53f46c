#!/usr/bin/env bash
# The embedded tiny default on CPU: 4 gloo processes, TP=2 x PP=2, on scikit-learn's handwritten digits with
# bilingual captions. Prepares data + tokenizer, trains with periodic zero-shot evaluation, then reports and plots.
#   bash examples/pretrain_m2_tiny.sh            (what `make demo` runs)
# Extra arguments go to the trainer, e.g. `--train-iters 50`.
# One contrastive loss per micro-batch (--itc-batch-accumulation off): at this scale it wins at equal wall time
# (BENCHMARKS.md, "Negatives beyond the step": 10 classes, so most extra in-batch negatives share the row's class), and
# it skips exact mode's extra forward: 3.4 instead of 5.1 minutes on 2 cores for the same accuracy.
set -euo pipefail
OUT=${OUT:-runs/demo}
PYTHON=${PYTHON:-python}

$PYTHON -m megatron_m2.demo prepare --output-dir "$OUT"

$PYTHON -m torch.distributed.run --standalone --nproc-per-node 4 -m megatron_m2.train \
  --model tiny --tensor-model-parallel-size 2 --pipeline-model-parallel-size 2 \
  --micro-batch-size 32 --global-batch-size 128 --train-iters ${TRAIN_ITERS:-300} --itc-batch-accumulation off \
  --lr 1e-3 --min-lr 1e-5 --lr-warmup-iters 20 --weight-decay 0.05 --clip-grad 1.0 \
  --data-path "$OUT/data/train" --tokenizer-model "$OUT/tokenizer.model" --no-hflip \
  --eval-interval ${EVAL_INTERVAL:-50} --eval-at-start --eval-batch-size 128 \
  --zeroshot-data "$OUT/data/eval" --zeroshot-classnames en="$OUT/data/classnames_en.txt" zh="$OUT/data/classnames_zh.txt" \
  --zeroshot-templates en="$OUT/data/templates_en.txt" zh="$OUT/data/templates_zh.txt" \
  --retrieval-data "$OUT/data/retrieval.jsonl" --fine-grained-data "$OUT/data/fine_grained.jsonl" \
  --save "$OUT/checkpoints" --save-interval 100 --log-interval 10 \
  --tensorboard-dir "$OUT/tensorboard" --metrics-file "$OUT/metrics.jsonl" "$@"

$PYTHON -m megatron_m2.demo report --output-dir "$OUT"
