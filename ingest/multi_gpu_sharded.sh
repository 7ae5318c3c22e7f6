#!/usr/bin/env bash
# A model too large for one GPU: its parameters sharded over every GPU of one machine (FSDP2,
# --shard-model); each process featurizes its own crc32 shard of the ids and appends them under
# the writer lock. Resumable: rerun the same command after a crash.
# usage: ingest/multi_gpu_sharded.sh DB [NGPUS] [DIM]
set -euo pipefail
db=${1:?usage: multi_gpu_sharded.sh DB [NGPUS] [DIM]}
ngpus=${2:-$(nvidia-smi -L | wc -l)}
dim=${3:-65536}
run() { torchrun --standalone --nproc-per-node "$ngpus" --no-python trackstar-db ingest gradients "$db" \
          --shard-model --device cuda --model-dtype bfloat16 "$@"; }
# fix the settings and create the tables once (sharded too: the model may fit no single GPU)
run --split train --dim "$dim" --dtype float16 --limit 1
for split in train queries; do
  run --split "$split" --batch-size 32
done
trackstar-db fit "$db" --mix task
