#!/usr/bin/env bash
# Featurize a database's training examples and queries on one device.
# usage: ingest/single_gpu.sh DB [DEVICE] [DIM]
set -euo pipefail
db=${1:?usage: single_gpu.sh DB [DEVICE] [DIM]}
device=${2:-cuda}
dim=${3:-65536}
trackstar-db ingest gradients "$db" --split train --device "$device" --dim "$dim" --dtype float16 --batch-size 32
trackstar-db ingest gradients "$db" --split queries --device "$device" --batch-size 32
trackstar-db fit "$db" --mix task
