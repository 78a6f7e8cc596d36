#!/usr/bin/env bash
# The quantized exports of docs/onnx.md ("Per-batch activations") from one final MNIST
# checkpoint, then their comparison with the float export and quantize_dynamic, run RUNS times.
#
#   PYTHON=.venv/bin/python scripts/onnx_quantized_speed.sh FINAL_CHECKPOINT DATA_DIR OUT_DIR [RUNS]
#
# Run from the repository root. FINAL_CHECKPOINT is copied into OUT_DIR, never changed.
# Made: 8-, 7- and 4-bit dynamic with per-row and with per-batch activations, and 4-bit QAT
# (one epoch) with per-batch activations, each exported with `dnnr export`.
set -euo pipefail
final=$1 data=$2 out=$3 runs=${4:-3}
python=${PYTHON:-python}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
models=$out/models
source=$models/final/model_v1.0_final
mkdir -p "$models/final"
[ -e "$source" ] || cp -r "$final" "$source"
dnnr() { "$python" -m dnnr_jax "$@"; }
dnnr export "$source" --data-dir "$data" --overwrite
checkpoints=()
while read -r version flags; do
  # shellcheck disable=SC2086  # $flags holds several flags
  dnnr quantize "$source" $flags --models-dir "$models" --version "$version" \
    --data-dir "$data" --overwrite > /dev/null
  checkpoints+=("$models/quantized/quantized_model_v$version")
  dnnr export "${checkpoints[-1]}" --data-dir "$data" --overwrite
done <<'RUNS'
8.0 --mode dynamic --bits 8
7.0 --mode dynamic --bits 7
4.0 --mode dynamic --bits 4
8.1 --mode dynamic --bits 8 --activations per_batch
7.1 --mode dynamic --bits 7 --activations per_batch
4.1 --mode dynamic --bits 4 --activations per_batch
4.2 --mode qat --bits 4 --activations per_batch --finetune-epochs 1
RUNS
for run in $(seq "$runs"); do
  echo "run $run of $runs, $(date -u '+%F %H:%M UTC'), load $(cut -d' ' -f1-3 /proc/loadavg)"
  "$python" scripts/onnx_serving.py "$source" "${checkpoints[@]}" --data-dir "$data" --seconds 3
done
