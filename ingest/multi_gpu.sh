#!/usr/bin/env bash
# Featurize on every GPU of one machine: one process per GPU, each its own shard (torchrun sets
# RANK/WORLD_SIZE/LOCAL_RANK; --shard auto and --device cuda pick them up).
# usage: ingest/multi_gpu.sh DB [NGPUS] [DIM]
set -euo pipefail
db=${1:?usage: multi_gpu.sh DB [NGPUS] [DIM]}
ngpus=${2:-$(nvidia-smi -L | wc -l)}
dim=${3:-65536}
# fix the settings and create the tables once, before the shards start
trackstar-db ingest gradients "$db" --split train --device cuda --dim "$dim" --dtype float16 --limit 1
for split in train queries; do
  torchrun --standalone --nproc-per-node "$ngpus" --no-python \
    trackstar-db ingest gradients "$db" --split "$split" --device cuda --shard auto --batch-size 32
done
trackstar-db fit "$db" --mix task
