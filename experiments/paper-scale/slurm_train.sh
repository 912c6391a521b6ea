#!/usr/bin/env bash
# SLURM batch script for one paper-scale train stage (4 nodes x 8 GPUs): one task per node runs the stage,
# which starts torchrun's node agent itself (train.launcher: torchrun in params.yaml); the agents meet at the
# first node. Set train.rdzv_endpoint in params.yaml to "<first node>:29400" before submitting.
# NOTE: superseded by the SLURM launcher of the launcher issue (sbatch from the stage, requeue on preemption);
# this script has not been run on a real cluster.
#SBATCH --job-name=layerchop-train
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=96
#SBATCH --time=72:00:00
set -euo pipefail
RUN=${RUN:-layerchop}            # layerchop | dense_cpt | sparsegpt-2of4_cpt
INIT=${INIT:-data/models/chopped}
METHOD=${METHOD:---warm-start}   # --warm-start for the LayerChop arm; --objective lm for the others
srun layerchop train $METHOD --init "$INIT" --data data/prepared --out "data/models/$RUN" \
  --run-dir "data/checkpoints/$RUN" --log "data/runs/$RUN.csv" --metrics "data/runs/$RUN.json"
# Re-submitting resumes from the newest complete checkpoint in data/checkpoints/$RUN/<fingerprint>/.
# Afterwards `dvc commit train@$RUN` records the output, and `dvc repro` continues with evaluate/report.
