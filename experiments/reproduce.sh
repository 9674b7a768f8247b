#!/usr/bin/env bash
# The paper's ablations (Tables 7-10) in miniature, >= 3 seeds per point, then docs/reproduction.md from their MLflow
# runs: bash experiments/reproduce.sh   (mmembed-report quotes this file in the report, so keep it the truth).
# DRAFT: the sizes below (COMMON) are to be tuned to the time budget; every table can also be run on its own.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python}
SEEDS=${SEEDS:-0,1,2}
COMMON=()   # overrides shared by every run, e.g. synth.size=small trainer.max_steps=...

# Table 7: the whole pipeline (warm-up -> + global HNM -> + judge FT -> + reranker E+R), one pipeline run per seed.
for seed in ${SEEDS//,/ }; do
  $PY experiments/run.py +exp=pipeline seed="$seed" "${COMMON[@]}"
done
# Table 8: n = 0, 4, ..., 20 hard negatives, judge-curated (ablation_hn{n}) and rule-based (ablation_hn{n}_rule).
$PY experiments/run.py -m '+exp=glob(ablation_hn*)' seed="$SEEDS" "${COMMON[@]}"
# Table 9: visual token compression factor 1 (vanilla) vs 2 (time, peak memory, quality).
$PY experiments/run.py -m '+exp=ablation_vtc1,ablation_vtc2' seed="$SEEDS" "${COMMON[@]}"
# Table 10: LoRA rank 8 / 16 / 32.
$PY experiments/run.py -m '+exp=glob(ablation_lora_r*)' seed="$SEEDS" "${COMMON[@]}"

# The report: the newest finished runs of each table (pin one with --parent TABLE=RUN_ID).
$PY -m mmembed.report.cli --commands experiments/reproduce.sh --out docs/reproduction.md --img-dir docs/img
