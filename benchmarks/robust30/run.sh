#!/usr/bin/env bash
# Robustness of PEGE vs STE to the step-size init and to a short budget (issue: PEGE second round, item 4):
# W2A2 and W4A4 ResNet-20 from the shipped 200-epoch FP model, PEGE (the default config) vs STE,
# step-size init lsq (2 mean|x| / sqrt(qmax), the CLI's old default) vs mse, 1 and 3 QAT epochs, seeds 0 and 1.
# Same recipe and validation split as the screening (benchmarks/screen30/run.sh): 5,000 images carved from
# the training file with seed 0; the test set is never used. The screening's ste-e3 and pege-e3 runs are
# the W2A2 / mse / 3 epochs / seed 0 cells and are not run again here.
# Sequential and resumable (a finished run is skipped; an interrupted one continues, also from
# benchmarks/in-progress/robust30/<run>/ in a fresh clone). Cheapest cells first. Start a second copy to
# train two cells at once (one thread each): a cell that another copy is training is skipped.
# Then: python benchmarks/robust30/report.py
set -euo pipefail
cd "$(dirname "$0")/../.."
source benchmarks/in_progress.sh
out=benchmarks/robust30/runs
common=(--model pege_hf/assets/models/resnet20-fp --dataset ../shared/data/cifar10/train.parquet
        --lr 0.01 --compile-kernels --channels-last --quantizer-lr-scale 1
        --checkpointing-steps 100 --checkpoints-total-limit 1 --no-tensorboard)
run() {  # bits epochs estimator init seed
  local bits=$1 epochs=$2 est=$3 init=$4 seed=$5
  local name=w${bits}a${bits}-$est-$init-e$epochs-s$seed
  local dir=$out/$name
  if [ -f "$dir/metrics.json" ]; then echo "$name: finished"; return; fi
  if [ "$bits/$epochs/$init/$seed" = "2/3/mse/0" ]; then echo "$name: the screening's $est-e3 run"; return; fi
  mkdir -p "$dir"
  if ! flock -n "$dir/.train.lock" true; then echo "$name: in training elsewhere"; return; fi
  echo "$(date -u +%H:%M) $name"
  OMP_NUM_THREADS=${THREADS:-1} nice -n 10 pege train "${common[@]}" --w-bits "$bits" --a-bits "$bits" \
      --epochs "$epochs" --estimator "$est" $([ "$est" = pege ] && echo --a-mask bernoulli) --scale-init "$init" \
      --seed "$seed" \
      --output-dir "$dir" $(resume_args "$dir") >>"$dir/train.log" 2>&1 \
    || echo "$name: failed (see $dir/train.log)"
}
for epochs in 1 3; do
  for bits in 2 4; do
    for seed in 0 1; do
      for init in lsq mse; do
        for est in ste pege; do run "$bits" "$epochs" "$est" "$init" "$seed"; done
      done
    done
  done
done
