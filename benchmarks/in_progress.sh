#!/usr/bin/env bash
# Runs that outlive a session keep one committed resume checkpoint each under
# benchmarks/in-progress/<group>/<run>/step_N (group: the benchmark folder, e.g. long_budget).
#   source benchmarks/in_progress.sh; resume_args DIR   -> the `pege train` flags that continue the run in DIR
#   bash benchmarks/in_progress.sh save                 -> before committing: refresh every live run's copy,
#                                                          drop the copies of finished runs
keep_dir() {  # DIR -> benchmarks/in-progress/<group>/<run>
  local dir=${1%/}
  echo "benchmarks/in-progress/$(basename "$(dirname "$(dirname "$dir")")")/$(basename "$dir")"
}

newest() { ls -d "$1"/step_* 2>/dev/null | sort -t_ -k2 -n | tail -1 || true; }

resume_args() {  # its own newest checkpoint first; else the committed copy; else a fresh start
  local dir=${1%/} kept
  kept=$(newest "$(keep_dir "$dir")")
  if [ -z "$(newest "$dir/checkpoints")" ] && [ -n "$kept" ]; then echo "--resume-from $kept"; else echo "--resume"; fi
}

save() {
  local dir dst ckpt
  for dir in benchmarks/*/runs/*/; do
    dir=${dir%/}; dst=$(keep_dir "$dir")
    if [ -f "$dir/metrics.json" ]; then rm -rf "$dst"; continue; fi
    ckpt=$(newest "$dir/checkpoints"); [ -n "$ckpt" ] || continue
    rm -rf "$dst"; mkdir -p "$dst"; cp -r "$ckpt" "$dst/"
    echo "$dir: $(basename "$ckpt") -> $dst"
  done
  return 0
}

if [ "${BASH_SOURCE[0]}" = "$0" ]; then
  set -euo pipefail
  cd "$(dirname "$0")/.."
  "$@"
fi
