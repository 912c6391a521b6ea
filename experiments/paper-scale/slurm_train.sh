#!/usr/bin/env bash
# SLURM launch of one train stage at paper scale (4 nodes x 8 GPUs, FSDP2 through Lightning).
# Lightning reads the SLURM environment; ntasks-per-node must equal train.devices.
#SBATCH --job-name=layerchop-train
#SBATCH --nodes=4
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=12
#SBATCH --time=72:00:00
set -euo pipefail
RUN=${RUN:-layerchop}            # layerchop | dense_cpt
INIT=${INIT:-data/models/chopped}
srun layerchop train --init "$INIT" --data data/prepared --out "data/models/$RUN" \
  --run-dir "data/checkpoints/$RUN" --log "data/runs/$RUN.csv"
# Re-submitting resumes from data/checkpoints/$RUN/last.ckpt. Afterwards `dvc commit train@$RUN`
# records the output, and `dvc repro` continues with evaluate/report.
# torchrun equivalent, per node: torchrun --nnodes 4 --nproc-per-node 8 --rdzv-backend c10d \
#   --rdzv-endpoint $HEAD:29500 -m layerchop.cli train ...
