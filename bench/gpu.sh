#!/usr/bin/env bash
# GPU rows of docs/RESULTS.md (issue 20, item 7), in one prepared run that fits in 8 minutes:
#   1. DeiT-S (random weights, 224 px) throughput at batch 256 for every preset family, fp32 and bf16
#      autocast, latency at batch 1, and the latency model's error on the GPU (bench/latency.py);
#   2. the default search on the GPU (--device cuda), its closing table and run.json.
# Usage: bash bench/gpu.sh [OUT_DIR]   (default: $OUT, else bench/gpu_out). Never needed by CI.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-${OUT:-bench/gpu_out}}"
mkdir -p "$OUT"
export TOKENSCHED_CACHE="$OUT/cache" RAY_AUTH_MODE=disabled
PRESETS="tome:13,tome:8,tome:13,-1,evit:0.7,evit:0.5,idlevit:0.7,idlevit:0.5,ppt,tcvit:0.7,diffrate:2.9"
{ nvidia-smi -L; python -c "import torch; print(torch.__version__, torch.cuda.get_device_name(0))"; } \
  > "$OUT/device.txt" 2>&1
for dtype in float32 bfloat16; do
  timeout 150 python bench/latency.py --model deit_small_patch16_224 --img-size 224 --device cuda \
    --batch 256 --latency-batch 1 --dtype "$dtype" --threads 1 --presets "$PRESETS" \
    --csv "$OUT/deit_s_$dtype.csv" > "$OUT/deit_s_$dtype.txt" 2> "$OUT/deit_s_$dtype.err"
  echo "deit_s $dtype: exit $?" >> "$OUT/status.txt"
done
timeout 200 python run_search.py --budget 65% --device cuda --gpus-per-trial 0.5 --concurrency 2 \
  --out "$OUT/search-cuda" > "$OUT/search-cuda.out" 2> "$OUT/search-cuda.err"
echo "search --device cuda: exit $?" >> "$OUT/status.txt"
cat "$OUT/status.txt" "$OUT"/deit_s_*.txt
tail -n 40 "$OUT/search-cuda.out"
