#!/usr/bin/env bash
# Issue 16, the GPU default precision (TF32) on one lent H200, random-init weights of real shapes:
#   1. scoring throughput, score_examples vs a plain transformers loop (device_smoke.py score),
#      Qwen2.5-0.5B and 1.5B shapes, auto (TF32) and fp32;
#   2. patching vs TransformerLens at the Qwen2.5-0.5B and Llama-3.2-1B shapes, fp32, both in TF32, bf16;
#   3. the same at the Llama-3.1-8B shape.
# Writes $OUT/{score_throughput,patching_small_tl,patching_8b_tl}.json and a log of each; then, here:
#   python benchmarks/gpu/update_issue16_rows.py DIR_WITH_THOSE_JSON_FILES
#   bash benchmarks/gpu/issue16_tf32.sh WHEELS_DIR      # wheels: see shared/gpu/README.md
set -u -o pipefail
W=${1:-.whl}
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$W"/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 CUDA_VISIBLE_DEVICES=0
python3 -c "import torch, transformers; print(torch.__version__, transformers.__version__, torch.cuda.get_device_name())"
t0=$(date +%s)
step() { echo "== $1 done at $(( $(date +%s) - t0 )) s"; }
python3 benchmarks/gpu/device_smoke.py score --n-prompts 1024 --reps 5 --out "$OUT/score_throughput.json" 2>&1 \
  | grep -v -i warn | tee "$OUT/score.log"
step score
python3 benchmarks/gpu/bench_patching_gpu.py --no-scaling --reps 3 --out "$OUT/patching_small_tl.json" 2>&1 \
  | grep -v -i -e warn -e 'it/s' | tee "$OUT/patching_small.log"
step "patching 0.5B/1B"
python3 benchmarks/gpu/bench_patching_gpu.py --no-scaling --reps 2 --shapes llama-3.1-8b-shape \
  --out "$OUT/patching_8b_tl.json" 2>&1 | grep -v -i -e warn -e 'it/s' | tee "$OUT/patching_8b.log"
step "patching 8B"
