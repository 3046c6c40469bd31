#!/usr/bin/env bash
# The paper's ablation on the embedded default: baseline, kd_only, quant_only, kd_quant x 3 seeds, every arm
# scored with eval=default (FAD with the tiny CLAP and the student's codec, CLAP score, 64 held-out clips).
# One Hydra multirun (hydra-joblib-launcher: JOBS runs side by side, one torch thread each), then the report:
# experiments/ablation.md, its plots and table.json in experiments/results/ablation/, and the runs' report files
# (summaries, reports, metrics CSVs; no weights or audio) in experiments/results/ablation/data/.
# Usage: [SEEDS=0,1,2] [JOBS=2] bash experiments/ablation.sh [extra hydra overrides]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=experiments/results/ablation
rm -rf "$OUT/runs" "$OUT/data"
status=0
# +sweep=ablation (conf/sweep/ablation.yaml) = -m +experiment=baseline,kd_only,quant_only,kd_quant seed=0,1,2
OMP_NUM_THREADS=1 python -m tinymusician.train +sweep=ablation \
  "seed=${SEEDS:-0,1,2}" hydra/launcher=joblib "hydra.launcher.n_jobs=${JOBS:-2}" \
  "hydra.sweep.dir=$OUT/runs" "paths.log_dir=$OUT/runs" logger=csv callbacks.progress_bar=null "$@" || status=$?
# the report also lists the jobs that failed (the sweep exits 1 then, after every other job ran)
python -m tinymusician.report "$OUT/runs" --out "$OUT" --markdown experiments/ablation.md \
  --title "The paper's ablation on the tiny world" --command "bash experiments/ablation.sh" --copy-data "$OUT/data"
exit "$status"
