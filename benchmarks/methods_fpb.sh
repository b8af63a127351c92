#!/usr/bin/env bash
# Every PEFT method on the real financial_phrasebank (sentences_allagree, 90/10, seed 42) with the
# pretrained MiniLM-L6 (recipes/minilm_fpb.yaml plus each method's overrides below), one run after
# another, then one table beside the published numbers. The table in docs/methods.md came from it.
#
#   bash benchmarks/methods_fpb.sh /path/to/Sentences_AllAgree.txt OUT_DIR [torch|mindspore] [METHOD ...]
#
# Each run writes OUT_DIR/<method>-<backend>; a finished one is kept (delete it to run it again).
# About 2-8 minutes a method on 2 CPU cores with torch; MindSpore takes longer (docs/mindspore-speed.md).
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:?usage: methods_fpb.sh SENTENCES_ALLAGREE.txt OUT_DIR [BACKEND] [METHOD ...]}
out=${2:?usage: methods_fpb.sh SENTENCES_ALLAGREE.txt OUT_DIR [BACKEND] [METHOD ...]}
backend=${3:-torch}
shift $(( $# < 3 ? $# : 3 ))
methods=("$@")
[ ${#methods[@]} -gt 0 ] || methods=(lora none bitfit ia3 prefix p_tuning prompt)
dualtune=${DUALTUNE:-.venv/bin/dualtune}

# Each method's hyperparameters: the recipe's (LoRA) or the method's usual range for a small encoder
# (higher learning rates for the methods that train few values, more epochs for the virtual tokens).
overrides() {
    case $1 in
        lora) echo "" ;;
        none) echo "peft.method=none optim.lr=5e-5" ;;
        bitfit) echo "peft.method=bitfit optim.lr=5e-3" ;;
        ia3) echo "peft.method=ia3 optim.lr=1e-2" ;;
        prefix) echo "peft.method=prefix peft.prefix.num_virtual_tokens=20 optim.lr=1e-2 train.epochs=5" ;;
        p_tuning) echo "peft.method=p_tuning peft.p_tuning.num_virtual_tokens=20 optim.lr=1e-2 train.epochs=5" ;;
        prompt) echo "peft.method=prompt peft.prompt.num_virtual_tokens=20 optim.lr=3e-2 train.epochs=5" ;;
        *) echo "unknown method $1" >&2; exit 2 ;;
    esac
}

runs=()
for method in "${methods[@]}"; do
    run="$out/$method-$backend"
    runs+=("$run")
    if [ -f "$run/final_metrics.json" ]; then
        echo "methods_fpb: $run is finished; kept"
        continue
    fi
    # shellcheck disable=SC2046 # the overrides are words
    "$dualtune" run recipes/minilm_fpb.yaml "data.source=$data" $(overrides "$method") \
        --backend "$backend" --output-dir "$run" --no-progress
done
"$dualtune" report "${runs[@]}" --format markdown --anchors financial_phrasebank/sentences_allagree
