#!/usr/bin/env bash
# One whole GPU measurement, as the device tool runs it (the GPU machine keeps nothing between calls):
# build the compiled FP16 width-64 engine on this machine (random weights: speed does not depend on
# them), then run benchmarks/scale_out.py with it; its JSON goes to $OUT (or benchmarks/results/).
#   bash benchmarks/gpu_scale_out.sh --images 8000 --gpus 1,2
set -euo pipefail
cd "$(dirname "$0")/.."
[ -f .device/env.sh ] && source .device/env.sh
work=${SCALE_OUT_WORK:-/tmp/gpu_scale_out}  # SCALE_OUT_WORK: reuse a w64.ptc another run built there
mkdir -p "$work"
# Bytecode, as a user's `pip install` leaves it. The device's env.sh installs its wheels with
# --no-compile and its image sets PYTHONDONTWRITEBYTECODE=1 (torch and numpy there have no bytecode
# either), so without this step every command recompiles every module it imports. Measured there
# on 12-03: `import torch` 3.5-5.8 s without, 1.9-2.0 s with; `import producer.cli` 0.83 s / 0.41-0.53 s.
# PYTHONPYCACHEPREFIX keeps the bytecode of read-only install folders in one writable place.
export PYTHONPYCACHEPREFIX=/tmp/pycache
unset PYTHONDONTWRITEBYTECODE
python -m compileall -q -j 0 ${PYTHONPATH//:/ } \
  $(python -c "import os, numpy, torch; print(os.path.dirname(torch.__file__), os.path.dirname(numpy.__file__))") \
  >/dev/null 2>&1 || true
python - <<'PY'
import importlib.util, os
for name in ("torch", "numpy", "redis", "rq", "producer.cli"):
    spec = importlib.util.find_spec(name)
    cached = bool(spec and spec.cached and os.path.exists(spec.cached))  # honours PYTHONPYCACHEPREFIX
    print(f"bytecode for {name}: {'yes' if cached else 'no'}")
import subprocess, sys, time
for stmt in ("import torch", "import worker.cli"):
    started = time.perf_counter()
    subprocess.run([sys.executable, "-c", stmt], check=True)
    print(f"{stmt} in a fresh interpreter: {time.perf_counter() - started:.2f} s")
PY
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader || true
echo "cpus: $(nproc)"
if [ ! -f "$work/w64.ptc" ]; then
  python - "$work/unet_w64.pt" <<'PY'
import sys
from pathlib import Path
import torch
from engines.base import EngineSpec
from engines.checkpoint import save_checkpoint
from engines.unet import UNet, UNetConfig
torch.manual_seed(0)
save_checkpoint(Path(sys.argv[1]), UNet(UNetConfig(width=64)).eval(), EngineSpec())
PY
  start=$(date +%s)
  python -m toolchain.cli build "$work/unet_w64.pt" --precision fp16 --compile -o "$work/w64.ptc"
  echo "compiled engine built in $(( $(date +%s) - start )) s"
fi
# the per-slot CUDA graphs must give exactly the masks of the kernels launched one by one
python - "$work/w64.ptc" <<'PY'
import sys
import numpy as np
from engines.compiled_engine import CompiledTorchEngine
images = np.random.default_rng(0).integers(0, 256, (8, 512, 512), dtype=np.uint8)
with CompiledTorchEngine(sys.argv[1], cuda_graphs=False) as launched:
    expected = [launched.submit(images[:n]).result() for n in (8, 3)]
with CompiledTorchEngine(sys.argv[1]) as graphed:
    if not graphed.uses_cuda_graphs:
        sys.exit(f"CUDA graph capture failed: {graphed.cuda_graphs_error}")
    got = [graphed.submit(images[:n]).result() for n in (8, 3)]
same = all(np.array_equal(a, b) for a, b in zip(expected, got))
print(f"cuda graphs vs launched kernels: masks identical = {same}")
sys.exit(0 if same else 1)
PY
json=${OUT:+$OUT/scale_out.json}
python benchmarks/scale_out.py --engine "$work/w64.ptc" ${json:+--out-json "$json"} ${OUT:+--save-logs "$OUT/logs"} "$@"
