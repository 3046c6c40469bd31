#!/usr/bin/env bash
# Does distillation pay on the tiny world? baseline (CE only) vs kd_only with the paper's stage-mixed KD and with
# plain forward KL (loss=fkl), 3 seeds each, all scored with eval=default (FAD with the tiny CLAP and the student's codec, CLAP score, 64 held-out clips);
# then the table in experiments/results/world_kd/. JOBS=2 runs two seeds side by side (one thread each).
# Usage: [SEEDS="1 2 3"] [JOBS=2] bash experiments/world_kd.sh [extra hydra overrides]
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=experiments/results/world_kd
rm -rf "$OUT/runs"
run() {  # name seed overrides...
  OMP_NUM_THREADS=1 python -m tinymusician.train "${@:3}" eval=default "seed=$2" logger=csv \
    callbacks.progress_bar=null "paths.log_dir=$OUT/runs" "hydra.run.dir=$OUT/runs/$1/seed$2" "${EXTRA[@]}" \
    > "$OUT/$1_seed$2.log" 2>&1
}
EXTRA=("$@")
declare -A ARMS=([baseline]="+experiment=baseline" [kd_only]="+experiment=kd_only" [kd_only_fkl]="+experiment=kd_only loss=fkl")
mkdir -p "$OUT"
jobs_running=0
for seed in ${SEEDS:-1 2 3}; do
  for arm in baseline kd_only kd_only_fkl; do
    # shellcheck disable=SC2086
    run "$arm" "$seed" ${ARMS[$arm]} &
    jobs_running=$((jobs_running + 1))
    if [ "$jobs_running" -ge "${JOBS:-2}" ]; then wait -n; jobs_running=$((jobs_running - 1)); fi
  done
done
wait
python -m tinymusician.report "$OUT/runs" --out "$OUT" --title "baseline vs kd_only on the tiny world" \
  --command "bash experiments/world_kd.sh" --copy-data "$OUT/data"
