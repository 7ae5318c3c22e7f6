#!/usr/bin/env bash
# Issue 26's GPU checks in one run (a device session: one H200, no network): the CUDA tests, the
# featurizer next to a training step on the GPT-2 124M / pythia-160m / 410m / 1b shapes in
# bfloat16, --dim 65536 on the 1B shape with its peak memory, the FSDP2 path on one GPU, and
# bergson on the same shapes when its wheels (in ./whl) install. Everything lands in $OUT.
#     OUT=/tmp/out bash benchmarks/gpu/run_h200.sh [--tiny]
# Run from a folder holding trackstar_db/, tests/, benchmarks/ (and whl/ for bergson).
set -u -o pipefail
OUT=${OUT:?set OUT to the results folder}
TINY=${1:-}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
{ date -u; nvidia-smi 2>&1 | head -20; python3 -c 'import torch, transformers; print(torch.__version__, transformers.__version__)'; } > "$OUT/env.txt" 2>&1
echo "== cuda tests"; date -u
timeout 150 python3 -m pytest -q --noconftest -p no:cacheprovider -m cuda -rs \
    tests/test_featurizer.py tests/test_topk.py tests/test_sharded.py > "$OUT/pytest.log" 2>&1
echo "pytest rc=$?"; tail -5 "$OUT/pytest.log"
echo "== featurize benchmarks"; date -u
timeout 240 python3 benchmarks/gpu/run_gpu.py --out "$OUT" $TINY 2>&1 | grep -v -i warn | tee "$OUT/bench.log"
echo "== bergson"; date -u
if ls whl/*.whl > /dev/null 2>&1 && python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
        --target /tmp/bsite whl/*.whl > "$OUT/bergson.log" 2>&1; then
    if [ -n "$TINY" ]; then presets="tiny"; else presets="gpt2-124m pythia-160m pythia-410m pythia-1b"; fi
    for m in $presets; do
        if [ "$m" = tiny ]; then args="--batch 2 --seq 32 --batches 2 --repeats 2 --dim 1024"
        else args="--model $m --model-dtype bfloat16 --batch 8 --seq 1024 --batches 4 --repeats 3 --dim 4096"; fi
        dev=$(python3 -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')
        PYTHONPATH=$PWD:/tmp/bsite timeout 90 python3 benchmarks/bench_bergson.py $args --device "$dev" \
            --train-step --threads 8 2>&1 | grep -v -i warn >> "$OUT/bergson.log"
        echo "bergson $m rc=$?" >> "$OUT/bergson.log"
    done
else
    echo "bergson wheels missing or not installable" >> "$OUT/bergson.log"
fi
tail -40 "$OUT/bergson.log"; date -u
