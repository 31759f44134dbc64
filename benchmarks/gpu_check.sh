#!/usr/bin/env bash
# GPU check (issue 14, part 5): the CUDA tests, then the LLM benchmark on CUDA at TinyLlama-1.1B's shape (full FT,
# LoRA, SHiRA, Child-Tuning-D at 0.01, 0.05 and LoRA's count) and Llama-3-8B's (the same without full FT), random
# init, bf16. Each stage has a time budget, so the whole script ends within 8 minutes on one H200; a method the
# budget cuts off is recorded as skipped. Needs nothing from a hub. Results: benchmarks/results/gpu_check.{json,md}.
#
#   bash benchmarks/gpu_check.sh
#   GPU_CHECK_DEVICE=cpu GPU_CHECK_SHAPES=llama-tiny GPU_CHECK_SEQ_LEN=16 bash benchmarks/gpu_check.sh  # CPU try-out
set -euo pipefail
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

DEVICE="${GPU_CHECK_DEVICE:-cuda}"
SHAPES="${GPU_CHECK_SHAPES:-tinyllama-1.1b,llama3-8b}"
SEQ_LEN="${GPU_CHECK_SEQ_LEN:-512}"
OUT="${GPU_CHECK_OUT:-benchmarks/results}"
TESTS_BUDGET_S="${GPU_CHECK_TESTS_BUDGET_S:-90}"
SMALL_BUDGET_S="${GPU_CHECK_SMALL_BUDGET_S:-150}"  # every shape but the 8B one
LARGE_BUDGET_S="${GPU_CHECK_LARGE_BUDGET_S:-210}"  # the 8B shape

# the CUDA tests: every test with "cuda" in its name (they skip themselves without a GPU); 5 = none collected
status=0
timeout "$TESTS_BUDGET_S" python3 -m pytest -q tests -k cuda || status=$?
if [ "$status" -ne 0 ] && [ "$status" -ne 5 ]; then
    echo "gpu_check: the CUDA tests failed (exit $status)" >&2
    exit "$status"
fi

rm -f "$OUT/gpu_check.json" "$OUT/gpu_check.md"
IFS=',' read -ra shapes <<< "$SHAPES"
for shape in "${shapes[@]}"; do
    if [ "$shape" = "llama3-8b" ]; then  # no full FT at 8B (fp32 master + AdamW: 128 GB before activations)
        methods="lora,childtuning_d,shira" budget="$LARGE_BUDGET_S"
    else
        methods="full_ft,lora,childtuning_d,shira" budget="$SMALL_BUDGET_S"
    fi
    python3 benchmarks/llm_bench.py --device "$DEVICE" --shapes "$shape" --dtypes bf16 --methods "$methods" \
        --reserve-ps lora,0.01,0.05 --batch-size 2 --seq-len "$SEQ_LEN" --warmup 1 --steps 3 \
        --budget-s "$budget" --out "$OUT" --name gpu_check --append
done
echo "gpu_check: results in $OUT/gpu_check.json and $OUT/gpu_check.md"
