#!/usr/bin/env bash
# Issue 16 on the embedded default: a cheaper student per step. One Hydra multirun (+sweep=cheaper_student:
# kd_only, kd_guided, kd_guided_quant, kd_layerdrop, kd_layerdrop_random x 3 seeds), every arm scored with
# eval=default at its own default guidance (kd_only: CFG 3; the guidance-distilled arms: one pass), then the
# report: experiments/cheaper_student.md, plots and table.json in experiments/results/cheaper_student/, and the
# runs' report files (no weights or audio) in experiments/results/cheaper_student/data/.
# Speed is measured separately, side by side: python benchmarks/bench_student_speed.py
# Usage: [SEEDS=0,1,2] [JOBS=2] bash experiments/cheaper_student.sh [extra hydra overrides]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=experiments/results/cheaper_student
rm -rf "$OUT/runs" "$OUT/data"
status=0
# loss=fkl for every arm (the best loss at this budget, experiments/results/loss_comparison), so that only the
# lever differs: kd_only keeps CE + caption dropout (CFG needs the null condition), kd_guided drops both
OMP_NUM_THREADS=1 python -m tinymusician.train +sweep=cheaper_student loss=fkl \
  "seed=${SEEDS:-0,1,2}" hydra/launcher=joblib "hydra.launcher.n_jobs=${JOBS:-2}" \
  "hydra.sweep.dir=$OUT/runs" "paths.log_dir=$OUT/runs" logger=csv callbacks.progress_bar=null "$@" || status=$?
python -m tinymusician.report "$OUT/runs" --out "$OUT" --markdown experiments/cheaper_student.md \
  --title "A cheaper student per step on the tiny world" --command "bash experiments/cheaper_student.sh" \
  --copy-data "$OUT/data"
exit "$status"
