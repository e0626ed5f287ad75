#!/usr/bin/env bash
# Copies each unfinished long-budget run's newest resume checkpoint to benchmarks/in-progress/<run>/
# (replacing the previous one) and drops it for finished runs. Run before committing at a session's end.
set -euo pipefail
cd "$(dirname "$0")/../.."
for dir in benchmarks/long_budget/runs/*/; do
  name=$(basename "$dir"); dst=benchmarks/in-progress/$name
  if [ -f "$dir/metrics.json" ]; then rm -rf "$dst"; continue; fi
  newest=$(ls -d "$dir"checkpoints/step_* 2>/dev/null | sort -t_ -k2 -n | tail -1) || true
  [ -n "$newest" ] || continue
  rm -rf "$dst"; mkdir -p "$dst"; cp -r "$newest" "$dst/"
  echo "$name: $(basename "$newest") -> $dst"
done
