#!/usr/bin/env bash
# Every KD loss vs the CE baseline at equal budget on the embedded default, 3 seeds each (SEEDS=1 for a quick
# look), every run scored with eval=default; then the table + plots in experiments/results/loss_comparison/.
# Two Hydra multiruns (hydra-joblib-launcher: JOBS runs side by side, one torch thread each).
# Usage: [SEEDS=1,2,3] [JOBS=2] bash experiments/loss_comparison.sh [extra hydra overrides]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=experiments/results/loss_comparison
rm -rf "$OUT/runs" "$OUT/data"
COMMON=("seed=${SEEDS:-1,2,3}" hydra/launcher=joblib "hydra.launcher.n_jobs=${JOBS:-2}" "paths.log_dir=$OUT/runs"
  logger=csv callbacks.progress_bar=null "$@")
status=0
OMP_NUM_THREADS=1 python -m tinymusician.train -m +experiment=baseline "hydra.sweep.dir=$OUT/runs/baseline" \
  "${COMMON[@]}" || status=$?
OMP_NUM_THREADS=1 python -m tinymusician.train -m +experiment=kd_only loss=fkl,rkl,skl,srkl,akl,jsd,stage_mixed \
  "hydra.sweep.dir=$OUT/runs/kd" "${COMMON[@]}" || status=$?
python -m tinymusician.report "$OUT/runs" --out "$OUT" --title "KD losses vs the CE baseline on the tiny world" \
  --command "bash experiments/loss_comparison.sh" --copy-data "$OUT/data"
exit "$status"
