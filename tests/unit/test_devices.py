"""--device mapping (pure): worker.devices.

The worker run against a missing GPU: tests/integration/test_devices_worker.py."""

from __future__ import annotations

from pathlib import Path

import pytest

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


@pytest.mark.parametrize(
    ("device", "workers", "cpus", "expected"),
    [
        ("cuda:0", 1, 16, 12),  # a GPU gets more decode processes than a CPU worker
        ("cpu", 1, 16, 8),
        ("cuda:0", 1, 2, 2),  # never more than the CPUs
        ("cuda:1", 4, 16, 4),  # a pool of four shares the host's CPUs
        ("cuda:1", 32, 16, 1),  # at least one each
    ],
)
def test_default_decode_processes_fit_the_device_and_the_host(monkeypatch: pytest.MonkeyPatch, device: str,
                                                              workers: int, cpus: int, expected: int) -> None:
    from worker.settings import default_decode_processes

    monkeypatch.setattr("os.cpu_count", lambda: cpus)
    assert default_decode_processes(device, workers) == expected


def test_a_pool_passes_each_child_its_share_of_decode_processes_unless_given(monkeypatch: pytest.MonkeyPatch) -> None:
    from worker.cli import _with_decode_processes

    monkeypatch.setattr("os.cpu_count", lambda: 16)
    assert _with_decode_processes({"decode_processes": None}, "cuda:0", 2)["decode_processes"] == 8
    assert _with_decode_processes({"decode_processes": 3}, "cuda:0", 2)["decode_processes"] == 3
