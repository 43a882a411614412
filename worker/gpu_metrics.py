"""GPU utilisation, memory and power of the worker's GPU, read through NVML at each scrape.

NVML comes from the optional `nvidia-ml-py` package (extra `gpu-metrics`; the GPU image installs it).
A worker on CPU, or without the package or an NVIDIA driver, has no `segqueue_gpu_*` series at all
(`gpu_collector` returns None and says why). The series, all gauges:

    segqueue_gpu_utilization_ratio     share of NVML's last sample period (1/6 to 1 s) with a kernel running, 0..1
    segqueue_gpu_memory_used_bytes     device memory in use (every process on the GPU)
    segqueue_gpu_memory_total_bytes    device memory in all
    segqueue_gpu_power_watts           board power draw

The GPU is found by the id the worker was pinned to (worker/devices.py): a UUID (GPU-...) as such, an
index as NVML's index (PCI bus order; CUDA's default order is the same for GPUs of one model).
"""

from __future__ import annotations

import importlib
from collections.abc import Iterator
from types import ModuleType
from typing import Any

from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector


class NvmlCollector(Collector):
    """Reads one GPU through `nvml` (the pynvml module) at each scrape; a read that fails yields nothing."""

    def __init__(self, nvml: ModuleType | Any, handle: object) -> None:
        self.nvml = nvml
        self.handle = handle

    def collect(self) -> Iterator[GaugeMetricFamily]:
        nvml, handle = self.nvml, self.handle
        try:
            utilization = nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0
            memory = nvml.nvmlDeviceGetMemoryInfo(handle)
            power_w = nvml.nvmlDeviceGetPowerUsage(handle) / 1000.0
        except nvml.NVMLError:  # a GPU fallen off the bus: the series vanish, the scrape still works
            return
        yield GaugeMetricFamily("segqueue_gpu_utilization_ratio", "GPU busy share over NVML's last sample period "
                                "(0..1).", value=utilization)
        yield GaugeMetricFamily("segqueue_gpu_memory_used_bytes", "GPU memory in use (all processes).",
                                value=float(memory.used))
        yield GaugeMetricFamily("segqueue_gpu_memory_total_bytes", "GPU memory in all.", value=float(memory.total))
        yield GaugeMetricFamily("segqueue_gpu_power_watts", "GPU board power draw.", value=power_w)


def gpu_collector(physical: str | None, nvml: ModuleType | None = None) -> tuple[NvmlCollector | None, str]:
    """A collector for the GPU with this physical id (None: CPU worker), or None and the reason there is none."""
    if physical is None:
        return None, "cpu worker"
    if nvml is None:
        try:
            nvml = importlib.import_module("pynvml")  # nvidia-ml-py
        except ImportError:
            return None, "nvidia-ml-py is not installed (pip install 'segqueue[gpu-metrics]')"
    assert nvml is not None
    try:
        nvml.nvmlInit()
        if physical.startswith(("GPU-", "MIG-")):
            handle = nvml.nvmlDeviceGetHandleByUUID(physical)
        else:
            handle = nvml.nvmlDeviceGetHandleByIndex(int(physical))
    except (nvml.NVMLError, ValueError) as exc:
        return None, f"NVML cannot read GPU {physical}: {exc}"
    return NvmlCollector(nvml, handle), f"GPU {physical} through NVML"
