"""worker/gpu_metrics.py with a stand-in for the NVML module (a pure unit: no GPU here; the real NVML path
runs on GPU hosts, see docs/operations.md "Metrics")."""

from __future__ import annotations

from types import SimpleNamespace

from prometheus_client import CollectorRegistry

from worker.gpu_metrics import gpu_collector


class FakeNvml:
    """The few pynvml calls the collector makes, answering for one GPU at index 1 (UUID GPU-abc)."""

    class NVMLError(Exception):
        pass

    def __init__(self, broken: bool = False) -> None:
        self.broken = broken
        self.initialised = False

    def nvmlInit(self) -> None:  # noqa: N802 (pynvml's names)
        if self.broken:
            raise self.NVMLError("Driver Not Loaded")
        self.initialised = True

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:  # noqa: N802
        if index != 1:
            raise self.NVMLError("Invalid Argument")
        return "gpu1"

    def nvmlDeviceGetHandleByUUID(self, uuid: str) -> str:  # noqa: N802
        return "gpu1" if uuid == "GPU-abc" else "?"

    def nvmlDeviceGetUtilizationRates(self, handle: str) -> SimpleNamespace:  # noqa: N802
        assert handle == "gpu1"
        return SimpleNamespace(gpu=87, memory=40)

    def nvmlDeviceGetMemoryInfo(self, handle: str) -> SimpleNamespace:  # noqa: N802
        return SimpleNamespace(used=3 * 2**30, total=80 * 2**30, free=77 * 2**30)

    def nvmlDeviceGetPowerUsage(self, handle: str) -> int:  # noqa: N802
        return 350_500  # milliwatts


def test_gpu_gauges_come_from_nvml_for_the_pinned_gpu() -> None:
    for physical in ("1", "GPU-abc"):
        collector, why = gpu_collector(physical, nvml=FakeNvml())
        assert collector is not None, why
        registry = CollectorRegistry()
        registry.register(collector)
        assert registry.get_sample_value("segqueue_gpu_utilization_ratio") == 0.87
        assert registry.get_sample_value("segqueue_gpu_memory_used_bytes") == 3 * 2**30
        assert registry.get_sample_value("segqueue_gpu_memory_total_bytes") == 80 * 2**30
        assert registry.get_sample_value("segqueue_gpu_power_watts") == 350.5


def test_no_gpu_series_on_cpu_or_without_a_driver() -> None:
    assert gpu_collector(None, nvml=FakeNvml()) == (None, "cpu worker")
    collector, why = gpu_collector("0", nvml=FakeNvml(broken=True))
    assert collector is None and "Driver Not Loaded" in why
    collector, why = gpu_collector("7", nvml=FakeNvml())
    assert collector is None and "GPU 7" in why


def test_a_failing_read_drops_the_series_not_the_scrape() -> None:
    nvml = FakeNvml()
    collector, _ = gpu_collector("1", nvml=nvml)
    assert collector is not None

    def fallen_off(handle: str) -> None:
        raise nvml.NVMLError("GPU is lost")

    nvml.nvmlDeviceGetUtilizationRates = fallen_off  # type: ignore[method-assign]
    registry = CollectorRegistry()
    registry.register(collector)
    assert registry.get_sample_value("segqueue_gpu_utilization_ratio") is None
