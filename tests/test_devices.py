"""--device mapping (pure), and a worker asked for a GPU that is not there exits with one clear line."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from engines import DEMO_ONNX
from worker.devices import (
    DeviceError,
    child_labels,
    cuda_index,
    expand_devices,
    is_pool,
    pin_process,
    plan_device,
    suffixed,
    visible_gpu_count,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    ("device", "visible", "physical", "env"),
    [
        ("cuda:0", None, "0", "0"),
        ("cuda:1", None, "1", "1"),
        ("cuda", None, "0", "0"),
        ("cuda:1", "2,3", "3", "3"),
        ("cuda:0", " 5 , 7 ", "5", "5"),
        ("cuda:1", "GPU-aaa,GPU-bbb", "GPU-bbb", "GPU-bbb"),
        ("cuda:0", "MIG-1234", "MIG-1234", "MIG-1234"),
    ],
)
def test_cuda_devices_map_to_one_visible_gpu_run_as_cuda0(device, visible, physical, env):
    plan = plan_device(device, visible)
    assert plan.engine_device == "cuda:0"
    assert plan.physical == physical
    assert plan.visible == env
    assert f"physical GPU {physical}" in plan.describe()


def test_cpu_leaves_the_environment_alone():
    plan = plan_device("cpu", "1")
    assert (plan.engine_device, plan.physical, plan.visible) == ("cpu", None, None)
    environ = {"CUDA_VISIBLE_DEVICES": "1"}
    pin_process("cpu", environ)
    assert environ == {"CUDA_VISIBLE_DEVICES": "1"}


def test_pin_process_sets_the_physical_id():
    environ: dict[str, str] = {}
    assert pin_process("cuda:2", environ).physical == "2"
    assert environ == {"CUDA_VISIBLE_DEVICES": "2"}
    environ = {"CUDA_VISIBLE_DEVICES": "4,6"}
    pin_process("cuda:1", environ)
    assert environ == {"CUDA_VISIBLE_DEVICES": "6"}


@pytest.mark.parametrize(("device", "visible", "message"), [
    ("cuda:2", "0,1", "lists 2 GPU(s), so there is no cuda:2"),
    ("cuda:0", "", "no GPU visible"),
    ("cuda:x", None, "must be cpu, cuda or cuda:<index>"),
    ("gpu", None, "must be cpu, cuda or cuda:<index>"),
])
def test_impossible_devices_are_refused_with_a_reason(device, visible, message):
    with pytest.raises(DeviceError) as info:
        plan_device(device, visible)
    assert message in str(info.value)


def test_pool_device_lists():
    assert is_pool("all") and is_pool("cpu,cpu") and not is_pool("cuda:1") and not is_pool("cpu")
    assert expand_devices("all", gpu_count=3) == ["cuda:0", "cuda:1", "cuda:2"]
    assert expand_devices("cuda:0, cuda:2") == ["cuda:0", "cuda:2"]
    assert expand_devices("cpu,cpu") == ["cpu", "cpu"]
    assert child_labels(["cuda:0", "cuda:2"]) == ["gpu0", "gpu2"]
    assert child_labels(["cpu", "cpu"]) == ["cpu0", "cpu1"]
    with pytest.raises(DeviceError, match="no GPU found"):
        expand_devices("all", gpu_count=0)
    with pytest.raises(DeviceError, match="listed twice"):
        expand_devices("cuda:1,cuda:1")
    assert cuda_index("CUDA:4") == 4


def test_gpu_count_follows_cuda_visible_devices():
    assert visible_gpu_count({"CUDA_VISIBLE_DEVICES": "3,1"}) == 2
    assert visible_gpu_count({"CUDA_VISIBLE_DEVICES": ""}) == 0


def test_log_file_suffixes():
    assert suffixed(Path("logs/worker.log"), "gpu0") == Path("logs/worker.gpu0.log")
    assert suffixed(Path("worker"), "cpu1") == Path("worker.cpu1")


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
