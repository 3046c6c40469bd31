#!/usr/bin/env bash
# Issue 3's experiment: every KD loss vs the CE baseline at equal budget on the embedded default,
# 3 seeds each (SEEDS=1 for a quick look); then the markdown table + plot in experiments/results/loss_comparison/.
# Usage: [SEEDS=1,2,3] bash experiments/loss_comparison.sh [extra hydra overrides]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=experiments/results/loss_comparison
rm -rf "$OUT/runs"
COMMON=("paths.log_dir=$OUT/runs" "seed=${SEEDS:-1,2,3}" "logger=csv" "callbacks.progress_bar=null" "$@")
python -m tinymusician.train -m +experiment=baseline "hydra.sweep.dir=$OUT/runs/baseline" "${COMMON[@]}"
python -m tinymusician.train -m +experiment=kd_only loss=fkl,rkl,skl,srkl,akl,jsd,stage_mixed \
  "hydra.sweep.dir=$OUT/runs/kd" "${COMMON[@]}"
python experiments/report.py "$OUT/runs" --out "$OUT"
