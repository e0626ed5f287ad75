#!/usr/bin/env bash
# Long-budget W2A2 QAT of the 200-epoch FP ResNet-20 (the shipped pege_hf/assets/models/resnet20-fp) (issue: PEGE at a long budget).
# Two runs, 100 QAT epochs each, seed 0, one CPU thread each, side by side:
#   resnet20-w2a2-ste-s0           STE
#   resnet20-w2a2-pege-stepsize-s0 PEGE, log curriculum, the error term (scaled, lambda 0.1) on the step size only:
#                                  the best PEGE setting of the 3-epoch screening (benchmarks/screen30/screen.md)
# Same recipe as the 200-epoch matrix otherwise (SGD lr 0.01 cosine, MSE step-size init, quantizer lr x1).
# Each epoch's test accuracy is also reported with BatchNorm re-estimated on 50 training batches (--eval-reestimate-bn;
# statistics put back after): PEGE's fully quantized model reads near chance mid-ramp without it.
# Resumable: run it again and each run continues from its newest checkpoint; a fresh clone continues from
# benchmarks/in-progress/long_budget/<run>/ (benchmarks/in_progress.sh).
set -euo pipefail
cd "$(dirname "$0")/../.."
source benchmarks/in_progress.sh
EPOCHS=${EPOCHS:-100}
out=benchmarks/long_budget/runs
common=(--model pege_hf/assets/models/resnet20-fp --dataset ../shared/data/cifar10 --w-bits 2 --a-bits 2
        --epochs "$EPOCHS" --lr 0.01 --seed 0 --compile-kernels --channels-last --scale-init mse
        --quantizer-lr-scale 1 --eval-reestimate-bn 50 --checkpointing-steps 200 --checkpoints-total-limit 1 --no-tensorboard)
launch() {  # name, extra args...
  local name=$1; shift
  local dir=$out/$name
  if [ -f "$dir/metrics.json" ]; then echo "$name: finished"; return; fi
  mkdir -p "$dir"
  OMP_NUM_THREADS=1 nice -n 10 pege train "${common[@]}" "$@" --output-dir "$dir" $(resume_args "$dir") >>"$dir/train.log" 2>&1 &
}
launch resnet20-w2a2-ste-s0 --estimator ste
launch resnet20-w2a2-pege-stepsize-s0 --estimator pege --a-mask bernoulli --lambda 0.1 --discretization-target step_size
wait
