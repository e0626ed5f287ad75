#!/usr/bin/env bash
# Screening of the PEGE error-term options (the author's plain u (x - Q) form, the term on the step size)
# against STE and the current PEGE: W2A2 ResNet-20 from the shipped 200-epoch FP model, 3 QAT epochs, seed 0,
# on a validation split (10% of CIFAR-10's training file, seed 0; the test set is never used).
# Sequential and resumable: a finished run (metrics.json) is skipped, an interrupted one continues (from
# benchmarks/in-progress/screen30/<run>/ in a fresh clone: benchmarks/in_progress.sh).
# Second stage, `EPOCHS=15 bash benchmarks/screen30/run.sh`: only the finalists of the 3-epoch screening
# (STE, the current PEGE and the two best new variants, by validation top-1 in screen.md) at 15 epochs.
# Then: python benchmarks/screen30/report.py
set -euo pipefail
cd "$(dirname "$0")/../.."
source benchmarks/in_progress.sh
EPOCHS=${EPOCHS:-3}
out=benchmarks/screen30/runs
common=(--model pege_hf/assets/models/resnet20-fp --dataset ../shared/data/cifar10/train.parquet --w-bits 2 --a-bits 2
        --epochs "$EPOCHS" --lr 0.01 --seed 0 --compile-kernels --channels-last --scale-init mse
        --quantizer-lr-scale 1 --checkpointing-steps 100 --checkpoints-total-limit 1 --no-tensorboard)
FINALISTS=" ste pege pege-stepsize pege-lambda0 "
run() {  # name, extra args...
  local name=$1; shift
  if [ "$EPOCHS" != 3 ] && [[ "$FINALISTS" != *" $name "* ]]; then return; fi
  local dir=$out/$name-e$EPOCHS
  if [ -f "$dir/metrics.json" ]; then echo "$name: finished"; return; fi
  mkdir -p "$dir"
  echo "$(date -u +%H:%M) $name: $*"
  local mask=(); [[ " $* " == *" --estimator pege "* ]] && mask=(--a-mask bernoulli)  # the mask PEGE's runs drew
  OMP_NUM_THREADS=1 nice -n 10 pege train "${common[@]}" "$@" "${mask[@]}" --output-dir "$dir" $(resume_args "$dir") >>"$dir/train.log" 2>&1 \
    || echo "$name: failed (see $dir/train.log)"
}
run ste --estimator ste
run pege-author-exp --estimator pege --discretization-form plain --discretization-reduction sum \
    --lambda-schedule exp --lambda-start 1e-8 --lambda 5e-8
run pege-stepsize --estimator pege --lambda 0.1 --discretization-target step_size
run pege-both --estimator pege --lambda 0.1 --discretization-target both
run pege --estimator pege --lambda 0.1
run pege-lambda0 --estimator pege --lambda 0
run pege-plain-1e-4 --estimator pege --discretization-form plain --discretization-reduction sum --lambda 1e-4
