#!/usr/bin/env bash
# Files to masks with the cuDNN INT8 engine, as the device tool runs it: build (or reuse) the width-64
# INT8 engine with benchmarks/int8_gpu.py in $INT8_WORK (default /tmp/int8_gpu), then benchmarks/scale_out.py with it (real
# commands, Redis AOF on). Needs .device/ prepared with the nvidia-cudnn-frontend wheel in .device/whl/.
#   bash benchmarks/gpu_int8_scale_out.sh --images 16000 --gpus 1 --redis-io-threads 4
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f .device/env.sh ] && source .device/env.sh
export PYTHONPYCACHEPREFIX=/tmp/pycache
unset PYTHONDONTWRITEBYTECODE
python -m compileall -q -j 0 ${PYTHONPATH//:/ } \
  $(python -c "import os, numpy, torch; print(os.path.dirname(torch.__file__), os.path.dirname(numpy.__file__))") \
  >/dev/null 2>&1 || true
work=${INT8_WORK:-/tmp/int8_gpu}  # INT8_WORK: reuse engines another run built
if [ ! -f "$work/w64_int8.onnx" ]; then  # the width-64 checkpoint and its INT8 Q/DQ ONNX (and a batch-8 engine)
  python benchmarks/int8_gpu.py --work "$work" --skip-fp16 --skip-quality --rounds 1 --iters 50 \
    --out-json "$work/int8_build.json"
fi
if [ ! -f "$work/w64_int8.cudnn" ]; then  # plans for every batch size a worker runs (1, 2, 4, 8)
  python -m toolchain.cli build "$work/w64_int8.onnx" --target cuda -o "$work/w64_int8.cudnn"
fi
json=${OUT:+$OUT/scale_out_int8.json}
python benchmarks/scale_out.py --engine "$work/w64_int8.cudnn" ${json:+--out-json "$json"} ${OUT:+--save-logs "$OUT/logs"} "$@"
