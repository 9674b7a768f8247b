# The runs behind the current docs/reproduction.md (2026-11-30, 2-core CPU, tiny preset, small synthetic world):
# the lines of experiments/reproduce.sh (Table 8 as two sweeps: seed 0, then seeds 1,2), all logged to one MLflow store.
# Then: MMEMBED_ROOT=/tmp/hn16b mmembed-report --commands docs/reproduction_runs.sh
export MMEMBED_ROOT=/tmp/hn16b
STORE=sqlite:////tmp/hn16b/logs/mlflow.db
# Table 8 (seed 0; the stage-2 model and the judge were built by a fresh `+exp=ablation_hn16` run in this root)
OMP_NUM_THREADS=1 python experiments/run.py -m '+exp=glob(ablation_hn*)'
# Table 8 seeds 1 and 2 (after the Table 7 pipelines below, in their root: each seed's stage-2 model, judge and
# judgments are reused from its pipeline; the runs go to the same MLflow store)
MMEMBED_ROOT=/tmp/pipe OMP_NUM_THREADS=1 python experiments/run.py -m '+exp=glob(ablation_hn*)' seed=1,2 logger.tracking_uri=$STORE
# Table 9 and Table 10 (run alongside Table 8, one thread each)
OMP_NUM_THREADS=1 python experiments/run.py -m '+exp=ablation_vtc1,ablation_vtc2' seed=0,1,2
OMP_NUM_THREADS=1 python experiments/run.py -m '+exp=glob(ablation_lora_r*)' seed=0,1,2
# Table 7: one pipeline per seed (seed 0 from an empty root, alone; seeds 1 and 2 then side by side, one thread each,
# in the same root: the synthetic world is shared, every stage is built per seed)
MMEMBED_ROOT=/tmp/pipe python experiments/run.py +exp=pipeline logger.tracking_uri=$STORE
MMEMBED_ROOT=/tmp/pipe OMP_NUM_THREADS=1 python experiments/run.py +exp=pipeline seed=1 logger.tracking_uri=$STORE
MMEMBED_ROOT=/tmp/pipe OMP_NUM_THREADS=1 python experiments/run.py +exp=pipeline seed=2 logger.tracking_uri=$STORE
