#!/bin/bash
# BatchNorm re-estimation with other samples of training images (--seed 1, 2; the benchmark's column uses seed 0):
# how much of a re-estimated model's accuracy is the sample. Writes benchmarks/bn_seeds/<run>-seed<S>.json
cd "$(dirname "$0")/../.."
for run in resnet20-w2a2-pege-s1 resnet20-w2a2-ste-s0 resnet20-w2a2-pege-instant-s0; do
  for seed in 1 2; do
    pege eval benchmarks/runs/$run --dataset ../shared/data/cifar10 --reestimate-bn 200 --seed $seed --json 2>/dev/null \
      | tail -1 > benchmarks/bn_seeds/$run-seed$seed.json
  done
done
