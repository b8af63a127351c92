#!/usr/bin/env bash
# The checks for a CUDA machine (H100-class, 16 cores), in one go, within 8 minutes:
#   install   its own venv with a CUDA torch and dualtune[torch,dev] (ci/constraints.txt)
#   tiny      a tiny T5 (dualtune tiny), the data synthetic: no model hub needed
#   recipes   the three T5 recipes on the tiny T5 and the MiniLM demo, --device cuda, fp32 and bf16
#             (bf16 through train.precision=bf16, skipped with a line where dualtune does not know it),
#             and t5_lora with train.gradient_checkpointing=true
#   ddp       t5_lora with --nproc <GPUs> (skipped with one GPU)
#   parity    CUDA against CPU from the same initial adapter, dropout off: the loss at init and over 20 steps
#   bench     benchmarks/bench.py on the GPU: dualtune against HF Trainer + peft
# then one summary table with each stage's time and the budget check.
#
#   bash ci/device-check.sh                                  # on the GPU machine
#   DEVICE=cpu VENV=/work/main/.venv bash ci/device-check.sh  # the same stages on CPU, tiny step counts
#
# DEVICE=cpu is the dry run that proves the script's logic on a machine without a GPU: it reuses VENV
# (no install) and trains a few steps per stage. Environment: VENV (reuse this venv, skip the install),
# OUT (work directory, default runs/device-check), BUDGET_S (480), TORCH_SPEC (torch==2.13.0) and
# TORCH_INDEX (an extra pip index for the CUDA wheel, e.g. https://download.pytorch.org/whl/cu126;
# default: PyPI, whose Linux torch wheels are CUDA builds).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$(pwd)
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-runs/device-check}
BUDGET_S=${BUDGET_S:-480}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
export GLOG_v=3 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PIP_DISABLE_PIP_VERSION_CHECK=1
if [ "$DEVICE" = cpu ]; then
    STEPS=3 DEMO_STEPS=3 PARITY_STEPS=3 BENCH_STEPS=1
    export OMP_NUM_THREADS=1  # a shared 2-core machine: one thread per process
else
    STEPS=30 DEMO_STEPS=0 PARITY_STEPS=20 BENCH_STEPS=10  # DEMO_STEPS=0: the demo's whole 3 epochs
fi
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
LOGS="$OUT/logs"
mkdir -p "$LOGS"
SUMMARY="$OUT/summary.tsv"
printf 'stage\tresult\tseconds\tnote\n' >"$SUMMARY"
STARTED=$SECONDS
FAILED=0

say() { echo "device-check: $*" >&2; }
# record STAGE RESULT SECONDS NOTE: one row of the summary
record() { printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "$4" >>"$SUMMARY"; }
# stage NAME NOTE COMMAND...: run COMMAND with its output in logs/NAME.log; a failure is recorded, not fatal
stage() {
    local name=$1 note=$2 t0=$SECONDS
    shift 2
    say "$name ..."
    if "$@" >"$LOGS/$name.log" 2>&1; then
        record "$name" ok $((SECONDS - t0)) "$note"
    else
        record "$name" "FAIL($?)" $((SECONDS - t0)) "$note; see $LOGS/$name.log"
        tail -n 5 "$LOGS/$name.log" >&2
        FAILED=1
    fi
}

# -- install: a venv of its own with a CUDA torch (or VENV, reused as it is)
t0=$SECONDS
if [ -n "${VENV:-}" ]; then
    record install reused 0 "$VENV"
else
    VENV="$OUT/venv"
    [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
    "$VENV/bin/python" -m pip install -q --upgrade pip
    # torch first, from TORCH_INDEX if given: the constraints' torch==2.13.0 then accepts the CUDA build.
    "$VENV/bin/python" -m pip install -q ${TORCH_INDEX:+--extra-index-url "$TORCH_INDEX"} "$TORCH_SPEC"
    "$VENV/bin/python" -m pip install -q -c ci/constraints.txt -e ".[torch,dev]"
    record install ok $((SECONDS - t0)) "$("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda)')"
fi
PY="$VENV/bin/python"
dualtune() { "$PY" -m dualtune.cli "$@"; }
if [ "$DEVICE" != cpu ] && ! "$PY" -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
    say "torch in $VENV sees no CUDA device; stopping"
    exit 1
fi
GPUS=$("$PY" -c 'import torch; print(torch.cuda.device_count())')
say "device $DEVICE, $GPUS GPU(s), work in $OUT"

# -- tiny: the tiny T5 the recipes run on (written on CPU, so every run starts from the same weights)
stage tiny "tiny T5" dualtune tiny t5 "$OUT/tiny-t5" --backend torch

# run NAME RECIPE ARGS...: one dualtune run on DEVICE into OUT/runs/NAME
run() {
    local name=$1 recipe=$2
    shift 2
    dualtune run "recipes/$recipe.yaml" --backend torch --device "$DEVICE" --no-progress --overwrite \
        --output-dir "$OUT/runs/$name" "$@"
}
T5=("model.name_or_path=$OUT/tiny-t5" data.source=synthetic data.max_rows=200 "train.max_steps=$STEPS"
    train.eval_every=1000000)
DEMO=() DEMO_NOTE="MiniLM-L6 demo, 3 epochs"
if [ "$DEMO_STEPS" -gt 0 ]; then
    DEMO=("train.max_steps=$DEMO_STEPS") DEMO_NOTE="MiniLM-L6 demo, $DEMO_STEPS steps"
fi

# -- recipes: fp32, then bf16 where dualtune knows train.precision
PRECISIONS=(fp32)
if dualtune validate recipes/minilm_demo.yaml train.precision=bf16 --backend torch --device "$DEVICE" \
    --output-dir "$OUT/runs/validate-bf16" >"$LOGS/validate-bf16.log" 2>&1; then
    PRECISIONS+=(bf16)
else
    record "bf16 runs" skipped 0 "validate: $(tail -n 1 "$LOGS/validate-bf16.log")"
fi
for precision in "${PRECISIONS[@]}"; do
    extra=()
    [ "$precision" = fp32 ] || extra=("train.precision=$precision")
    for recipe in t5_prefix t5_lora t5_bitfit; do
        stage "$recipe-$precision" "tiny T5, $STEPS steps" run "$recipe-$precision" "$recipe" "${T5[@]}" "${extra[@]}"
    done
    stage "minilm_demo-$precision" "$DEMO_NOTE" run "minilm_demo-$precision" minilm_demo "${DEMO[@]}" "${extra[@]}"
done
stage t5_lora-checkpointing "train.gradient_checkpointing=true" \
    run t5_lora-checkpointing t5_lora "${T5[@]}" train.gradient_checkpointing=true

# -- ddp: every GPU (on CPU: 2 processes, gloo)
NPROC=$GPUS
[ "$DEVICE" = cpu ] && NPROC=2
if [ "$NPROC" -gt 1 ]; then
    stage ddp "--nproc $NPROC" run ddp t5_lora "${T5[@]}" --nproc "$NPROC"
else
    record ddp skipped 0 "one GPU"
fi

# -- parity: DEVICE against CPU from DEVICE's initial adapter, dropout off
PARITY=("${T5[@]}" "train.max_steps=$PARITY_STEPS" train.dropout=false)
stage "parity-$DEVICE" "$PARITY_STEPS steps" run parity-device t5_lora "${PARITY[@]}" train.save_initial=true
t0=$SECONDS
if dualtune run recipes/t5_lora.yaml --backend torch --device cpu --no-progress --overwrite \
    --output-dir "$OUT/runs/parity-cpu" "${PARITY[@]}" "peft.init_from=$OUT/runs/parity-device/adapter_init" \
    >"$LOGS/parity-cpu.log" 2>&1 &&
    verdict=$("$PY" - "$OUT/runs/parity-device" "$OUT/runs/parity-cpu" <<'PY'
import json, sys
from dualtune.compare import TOLERANCES, rel_diff

def losses(run):
    lines = open(f"{run}/metrics.jsonl").read().splitlines()
    return [r["loss"] for r in map(json.loads, lines) if "loss" in r]

device, cpu = (losses(run) for run in sys.argv[1:3])
assert device and len(device) == len(cpu), (len(device), len(cpu))
init, worst = rel_diff(device[0], cpu[0]), max(rel_diff(a, b) for a, b in zip(device, cpu))
ok = init <= TOLERANCES["init_loss_rel"] and worst <= TOLERANCES["step_loss_rel"]
print(f"{'PASS' if ok else 'FAIL'} loss at init {init:.1e} (tol {TOLERANCES['init_loss_rel']:g}), "
      f"max over {len(cpu)} steps {worst:.1e} (tol {TOLERANCES['step_loss_rel']:g})")
sys.exit(not ok)
PY
    ); then
    record "parity $DEVICE-cpu" ok $((SECONDS - t0)) "$verdict"
else
    record "parity $DEVICE-cpu" FAIL $((SECONDS - t0)) "${verdict:-see $LOGS/parity-cpu.log}"
    FAILED=1
fi

# -- bench: dualtune against HF Trainer + peft on DEVICE (the tiny T5 on CPU, t5-small's config on the GPU)
BENCH_MODEL=t5-small-config
[ "$DEVICE" = cpu ] && BENCH_MODEL="$OUT/tiny-t5"
stage bench "t5_lora, $BENCH_STEPS steps" "$PY" benchmarks/bench.py recipes/t5_lora.yaml --backend torch \
    --device "$DEVICE" --model "$BENCH_MODEL" --steps "$BENCH_STEPS" --eval-batches 1 --out "$OUT/bench.json"
grep -A 5 "ratio d/r" "$LOGS/bench.log" >"$OUT/bench-table.txt" || true

# -- summary
TOTAL=$((SECONDS - STARTED))
echo
echo "dualtune device check: device $DEVICE ($GPUS GPU(s)), $(date -u +%FT%TZ), $TOTAL s of a $BUDGET_S s budget"
if command -v column >/dev/null; then column -t -s $'\t' "$SUMMARY"; else cat "$SUMMARY"; fi
if [ -s "$OUT/bench-table.txt" ]; then
    echo "bench (dualtune against HF Trainer + peft on $DEVICE):"
    sed 's/^/    /' "$OUT/bench-table.txt"
fi
if [ "$TOTAL" -gt "$BUDGET_S" ]; then
    echo "over budget: $TOTAL s > $BUDGET_S s"
    FAILED=1
fi
echo "verdict: $([ "$FAILED" = 0 ] && echo PASS || echo FAIL)"
exit "$FAILED"
