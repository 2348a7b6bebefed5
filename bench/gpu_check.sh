#!/usr/bin/env bash
# The GPU check: everything bench/ measures, in one command that ends within 8 minutes on an H200 and leaves
# valid results even when it is stopped early.
#
#   bench/gpu_check.sh --out=/tmp/gpu-check --wheels=wheels/    # on a CUDA GPU; --wheels is optional
#   bench/gpu_check.sh --out=/tmp/gpu-check --wheels=wheels/ --tiny  # the CPU rehearsal (tests/test_bench.py)
#   bench/gpu_check.sh --out=DIR -- --configs=v1,trl,trl_liger   # anything after -- goes to bench/bench.py
#
# In priority order, each result written the moment it exists (DIR/<date>-<device>.json is valid after every
# stage; DIR/gpu-check.log holds everything printed):
#   1. environment: install the wheels of --wheels (pip, offline, into --site, first on PYTHONPATH), print the
#      versions, measure the bf16 matmul rate;
#   2. the GPU-marked tests (pytest -m gpu), each with a timeout;
#   3. the training recipes at MAX_LENGTH 2048, 16 examples a step, on a random-weight Qwen3-1.7B:
#      v1, trl, trl_liger, then v2 (both embedding modes), v3, full (train.py), original, bf16_lora;
#   4. inference: single-stream against batched generated tokens/s;
#   5. the shipped scripts: train_lora3.py for 20 steps, inference_lora.py -b, merge_lora.py, one streamed answer;
#   6. GRPO: train_grpo.py for 2 steps from that v3 adapter, 8 completions of 512 tokens per question (transformers
#      generation): seconds per step, the generation's and the update's shares, peak memory against its estimate.
# Its last line gives the wall time. A stage that no longer fits the time budget is recorded as skipped.
#
# The sizes, from the H200's expected bf16 rate of about 790 TFLOP/s with a safety factor (derived, not measured):
# a step is 16 examples of about 790 tokens, 12,600 tokens; at 8 x 1.72e9 FLOPs a token (forward, recomputed
# forward, backward) that is 1.7e14 FLOPs, 0.22 s at the full rate and 2.2 s at the planning rate of 10% of it
# (the safety factor: 2.5 times under the 25% MFU target). One warm-up and 2 measured steps then take about 7 s
# a recipe; with about 20 s to start a process and load the model (assumed), the 9 recipes take about 4 min, and
# the whole check about 8.4 min at the planning rate, 7.2 at the MFU target, before GRPO's 1.5 min (bench/README.md
# has the table): GRPO runs when the GPU is faster than planned, or alone in a second short command.
# BUDGET_S caps it whatever happens: what no longer fits is recorded as skipped, lowest priority first.
set -uo pipefail
{  # the whole script is read before it runs: editing this file during a run cannot change that run

OUT="" WHEELS="" SITE="${TMPDIR:-/tmp}/gpu-check-site" TINY=0
BUDGET_S=450          # the whole check's wall time, the install included (the loan's command limit is 600 s)
while [[ $# -gt 0 ]]; do
  case "$1" in
    --out=*) OUT="${1#*=}" ;;
    --wheels=*) WHEELS="${1#*=}" ;;
    --site=*) SITE="${1#*=}" ;;
    --budget_s=*) BUDGET_S="${1#*=}" ;;
    --tiny) TINY=1 ;;
    --) shift; break ;;
    *) echo "error: unknown option $1 (use --out=DIR [--wheels=DIR] [--site=DIR] [--budget_s=N] [--tiny] [-- bench.py settings])" >&2
       exit 2 ;;
  esac
  shift
done
[[ -n "$OUT" ]] || { echo "error: --out=DIR is required (where the results and the log go)" >&2; exit 2; }
[[ -z "$WHEELS" || -d "$WHEELS" ]] || { echo "error: --wheels=$WHEELS: not a folder" >&2; exit 2; }
PYTHON="${PYTHON:-python3}"
mkdir -p "$OUT" && OUT="$(cd "$OUT" && pwd)" || exit 2
[[ -z "$WHEELS" ]] || WHEELS="$(cd "$WHEELS" && pwd)"
mkdir -p "$SITE" && SITE="$(cd "$SITE" && pwd)" || exit 2
cd "$(dirname "$0")/.." || exit 2
exec > >(tee -a "$OUT/gpu-check.log") 2>&1
START=$SECONDS
echo "gpu check: $(date -Is) in $(pwd), out $OUT, wheels ${WHEELS:-none}, budget ${BUDGET_S} s"

# ========== 1. The carried wheels (the rest of the environment stage is bench.py's) ==========
INSTALL="no wheels given" SITE_USED=""
if [[ -n "$WHEELS" ]]; then
  shopt -s nullglob
  wheels=("$WHEELS"/*.whl)
  if [[ ${#wheels[@]} -eq 0 ]]; then
    INSTALL="no .whl files in $WHEELS"
  else
    t=$SECONDS
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
      "${wheels[@]}"
    rc=$?
    INSTALL="$([[ $rc -eq 0 ]] && echo ok || echo "FAILED (pip exit $rc)"): ${#wheels[@]} wheels in $((SECONDS - t)) s"
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    SITE_USED="$SITE"
  fi
  echo "wheels: $INSTALL"
fi

# ========== 2-6. bench.py: environment, GPU tests, training, inference, shipped scripts, GRPO ==========
if [[ $TINY -eq 1 ]]; then
  SIZES=(--mode=tiny --shipped_scripts=True --grpo=True)
else
  # sized as derived above; one stuck subprocess costs at most TIMEOUT_S
  SIZES=(--mode=full --warmup_steps=1 --steps=2 --val_rows=32 --script_questions=16 --timeout_s=120
         --gpu_tests_timeout_s=90)
fi
"$PYTHON" bench/bench.py "${SIZES[@]}" --gpu_tests=True --results_dir="$OUT" \
  --time_budget_s=$((BUDGET_S - (SECONDS - START))) --wheels_dir="$WHEELS" --site_dir="$SITE_USED" \
  --wheels_install="$INSTALL" "$@"
rc=$?
echo "gpu check: finished in $((SECONDS - START)) s (budget ${BUDGET_S} s), exit code $rc, results in $OUT"
exit $rc
}
