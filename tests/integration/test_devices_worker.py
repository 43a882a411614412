"""A worker asked for a GPU that is not there exits with one clear line; importing the worker leaves CUDA alone.

The --device mapping itself (pure) is tested in tests/unit/test_devices.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from engines import DEMO_ONNX

ROOT = Path(__file__).resolve().parents[2]


def test_importing_the_worker_does_not_initialise_cuda():
    """CUDA_VISIBLE_DEVICES only works if nothing touches CUDA before `run` sets it."""
    probe = (
        "import torch, torch.cuda\n"
        "def boom(*a, **k): raise SystemExit('CUDA touched at import')\n"
        "for name in ('is_available', 'device_count', 'init', '_lazy_init', 'current_device', 'get_device_name'):\n"
        "    setattr(torch.cuda, name, boom)\n"
        "import worker.cli, worker.pipeline, worker.pool, engines.loader, engines.base, broker.connection\n"
        "import engines.compiled_engine, engines.torch_engine, engines.onnx_engine, engines.cuda_slots\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr


def test_worker_on_a_missing_gpu_gives_one_clear_error(redis_url):
    env = {k: v for k, v in os.environ.items() if k != "CUDA_VISIBLE_DEVICES"}
    out = subprocess.run(
        [sys.executable, "-m", "worker.cli", "run", "--engine", str(DEMO_ONNX.with_suffix(".pt")),
         "--device", "cuda:3", "--redis-url", redis_url, "--burst"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env=env,
    )
    assert out.returncode == 2, out.stderr
    assert "Traceback" not in out.stderr
    assert out.stderr.startswith("error: ")
    assert "cuda:3 (physical GPU 3" in out.stderr


def test_worker_device_past_the_visible_list_is_refused(redis_url):
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "1"}
    out = subprocess.run(
        [sys.executable, "-m", "worker.cli", "run", "--engine", str(DEMO_ONNX), "--device", "cuda:1",
         "--redis-url", redis_url],
        cwd=ROOT, capture_output=True, text=True, timeout=120, env=env,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "CUDA_VISIBLE_DEVICES=1 lists 1 GPU(s), so there is no cuda:1" in out.stderr


def test_worker_engine_slots_on_a_cpu_engine_is_refused(redis_url):
    out = subprocess.run(
        [sys.executable, "-m", "worker.cli", "run", "--engine", str(DEMO_ONNX), "--device", "cpu",
         "--engine-slots", "3", "--redis-url", redis_url, "--burst"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.startswith("error: ")
    assert f"{DEMO_ONNX}: the number of batches in flight can be set for CUDA engines only" in out.stderr
