#!/usr/bin/env bash
# The GPU check of issue 24 as one prepared script: the accelerator tests, then the scale benchmark on the
# device, step by step under one deadline, so that what finished is kept and summarised whatever stops it.
#
#   bash benchmarks/gpu_check.sh OUT_DIR [SECONDS]        # on a GPU machine, from the repository root
#   DEVICE=cpu SIZES=134m BIG= bash benchmarks/gpu_check.sh /tmp/check 600   # the same steps, small, on a CPU
#
# Steps (each one result file per run under OUT_DIR, so a second call resumes):
#   1. tests/test_accelerator.py on the device (engines that follow model.to(), Fisher and top-k on the device);
#   2. selection: global top-k of 0.5% over 2.5e7 ... 1.1e9 scores on the device, entries compared with the CPU's;
#   3. model arms at SIZES (default 1.1b): mask phase (Fisher in bf16 autocast, planned batch, selection, attach),
#      FISH (sparse engine), FISH on a random mask spread over every tensor, LoRA r=16, LoRA-FISH (its peak);
#      batch 8 x 512;
#   4. LoRA-FISH against LoRA at the same rank, and with the engine's index form forced, steps interleaved in one
#      process (forward, backward, optimizer: where its time goes);
#   5. the same model arms at BIG (default 7b) while time is left;
#   6. the summary table (OUT_DIR.json).
set -u
OUT=${1:?usage: gpu_check.sh OUT_DIR [SECONDS]}
BUDGET=${2:-290}
DEVICE=${DEVICE:-cuda}
SIZES=${SIZES:-1.1b}
BIG=${BIG-7b}
BATCH=${BATCH:-8}
SEQ=${SEQ:-512}
PRECISION=${PRECISION---bf16}
PY=${PYTHON:-python}
export PYTHONPATH=${PYTHONPATH:-src}
mkdir -p "$OUT"
# the commit, for a copy of the tree without .git (pass SPARSEPEFT_COMMIT=$(git rev-parse HEAD) there)
echo "${SPARSEPEFT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}" > "$OUT/commit.txt"
left() { echo $((BUDGET - SECONDS)); }
step() {  # step NAME COMMAND...: run under what is left of the budget, log to OUT/NAME.log
  local name=$1; shift
  local remaining; remaining=$(left)
  if [ "$remaining" -le 10 ]; then echo "skipped $name: out of time" | tee -a "$OUT/steps.txt"; return; fi
  local start=$SECONDS
  timeout "$remaining" "$@" > "$OUT/$name.log" 2>&1
  echo "$name: exit $? after $((SECONDS - start)) s" | tee -a "$OUT/steps.txt"
}
MODEL=(--part model --device "$DEVICE" $PRECISION --batch-size "$BATCH" --seq-len "$SEQ" --fisher-samples 64)

SPARSEPEFT_TEST_DEVICE=$DEVICE step tests "$PY" -m pytest -q -p no:cacheprovider tests/test_accelerator.py
step selection "$PY" benchmarks/scale.py --part selection --device "$DEVICE" --out "$OUT"
step models "$PY" benchmarks/scale.py "${MODEL[@]}" --sizes "$SIZES" --arms mask,fish,fish-random,lora,lora-fish --out "$OUT"
step lora_fish "$PY" benchmarks/scale.py --part lora-fish-step --device "$DEVICE" $PRECISION --sizes "${SIZES%%,*}" \
    --batch-size "$BATCH" --seq-len "$SEQ" --steps 10 --out "$OUT"
[ -n "$BIG" ] && step big "$PY" benchmarks/scale.py "${MODEL[@]}" --sizes "$BIG" --arms mask,fish,lora --out "$OUT"
BUDGET=$((SECONDS + 60))  # the summaries always run
step summary "$PY" benchmarks/scale.py --part summary --out "$OUT"
tail -n 3 "$OUT/tests.log" >> "$OUT/steps.txt"
cat "$OUT/steps.txt"
