"""Which GPU a worker process sees, and how many GPUs a pool of workers should cover.

A worker asked for `--device cuda:N` makes its process see that one GPU (CUDA_VISIBLE_DEVICES set
to the GPU's physical id, before anything initialises CUDA) and runs its engine on `cuda:0`. Why: a
compiled engine's torch.compile cache is keyed by device index; saved on cuda:0, it missed on
cuda:1 and the worker compiled again (103 s to ready instead of 22 s on an H200). Seen through
CUDA_VISIBLE_DEVICES, every GPU is cuda:0, so the cache hits on all of them.

If the user already set CUDA_VISIBLE_DEVICES (say "2,3"), `cuda:N` is the N-th entry of that list
("cuda:1" -> "3"), as torch would have numbered it. Entries may be indices, GPU-/MIG- UUIDs or bus
ids: they are passed through unchanged.

Everything here is pure (no torch, no CUDA) except `visible_gpu_count`, which asks nvidia-smi or
the driver's /proc entries, never CUDA itself, so a pool supervisor holds no CUDA context.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

ENV = "CUDA_VISIBLE_DEVICES"


class DeviceError(ValueError):
    """A --device value that cannot be honoured here; the message says why."""


@dataclass(frozen=True)
class DevicePlan:
    """How one worker process uses its device.

    requested: the --device value as given ("cpu", "cuda", "cuda:1"). engine_device: what the
    engine is loaded on ("cpu" or "cuda:0"). physical: the GPU's id as the machine names it (an
    index or a UUID; None on CPU). visible: the CUDA_VISIBLE_DEVICES value to set (None: leave the
    environment alone).
    """

    requested: str
    engine_device: str
    physical: str | None = None
    visible: str | None = None

    def describe(self) -> str:
        if self.physical is None:
            return self.engine_device
        return f"{self.requested} (physical GPU {self.physical}, run as {self.engine_device} with {ENV}={self.visible})"


def parse_visible(value: str | None) -> list[str] | None:
    """CUDA_VISIBLE_DEVICES -> its entries; None when unset (every GPU visible), [] when empty."""
    if value is None:
        return None
    return [part.strip() for part in value.split(",") if part.strip()]


def cuda_index(device: str) -> int | None:
    """"cuda" -> 0, "cuda:3" -> 3, "cpu" -> None; DeviceError for anything else."""
    text = device.strip().lower()
    if text == "cpu":
        return None
    if text == "cuda":
        return 0
    if text.startswith("cuda:"):
        index = text[5:]
        if index.isdigit():
            return int(index)
    raise DeviceError(f"--device must be cpu, cuda or cuda:<index>, got {device!r}")


def plan_device(device: str, visible_env: str | None) -> DevicePlan:
    """The plan for `--device device` given the current CUDA_VISIBLE_DEVICES (`visible_env`, None if unset).

    cpu -> engine on cpu, environment untouched. cuda / cuda:N -> the process sees only the N-th
    visible GPU and the engine runs on cuda:0. DeviceError if N is past the end of a set
    CUDA_VISIBLE_DEVICES list.
    """
    index = cuda_index(device)
    if index is None:
        return DevicePlan(requested=device, engine_device="cpu")
    entries = parse_visible(visible_env)
    if entries is None:
        physical = str(index)
    elif index < len(entries):
        physical = entries[index]
    else:
        shown = visible_env if visible_env else "(empty: no GPU visible)"
        raise DeviceError(f"--device {device}: {ENV}={shown} lists {len(entries)} GPU(s), so there is no cuda:{index}")
    return DevicePlan(requested=device, engine_device="cuda:0", physical=physical, visible=physical)


def pin_process(device: str, environ: dict[str, str] | None = None) -> DevicePlan:
    """Plan `device` and apply it to `environ` (default os.environ); call before CUDA is initialised.

    CUDA reads CUDA_VISIBLE_DEVICES once, when the driver initialises (torch does that lazily, on
    its first CUDA call, not at import), so setting it here, first thing in the worker, is enough.
    """
    env = os.environ if environ is None else environ
    plan = plan_device(device, env.get(ENV))
    if plan.visible is not None:
        env[ENV] = plan.visible
    return plan


def visible_gpu_count(environ: dict[str, str] | None = None, timeout_s: float = 15.0) -> int:
    """GPUs a pool of workers should cover: CUDA_VISIBLE_DEVICES' entries if set, else nvidia-smi's
    list, else the NVIDIA driver's /proc entries; 0 when none is found. Never initialises CUDA."""
    env = os.environ if environ is None else environ
    entries = parse_visible(env.get(ENV))
    if entries is not None:
        return len(entries)
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=timeout_s, check=False)
            if out.returncode == 0:
                return sum(1 for line in out.stdout.splitlines() if line.startswith("GPU "))
        except (OSError, subprocess.TimeoutExpired):
            pass
    proc = Path("/proc/driver/nvidia/gpus")
    if proc.is_dir():
        return sum(1 for _ in proc.iterdir())
    return 0


def expand_devices(spec: str, gpu_count: int | None = None) -> list[str]:
    """A pool's --device value -> one device per worker process.

    "all" -> cuda:0 .. cuda:(n-1) for the n visible GPUs (DeviceError if there are none);
    "cuda:0,cuda:2" or "cpu,cpu" -> that list (each entry checked). A single device -> [device].
    """
    text = spec.strip()
    if text.lower() == "all":
        count = visible_gpu_count() if gpu_count is None else gpu_count
        if count < 1:
            raise DeviceError("--device all: no GPU found here (nvidia-smi and the NVIDIA driver see none); "
                              "use --device cpu, or list devices, e.g. --device cpu,cpu")
        return [f"cuda:{i}" for i in range(count)]
    devices = [part.strip() for part in text.split(",") if part.strip()]
    if not devices:
        raise DeviceError("--device is empty")
    for device in devices:
        cuda_index(device)
    gpus = [cuda_index(d) for d in devices if cuda_index(d) is not None]
    if len(set(gpus)) != len(gpus):
        raise DeviceError(f"--device {spec}: a GPU is listed twice (one worker per GPU)")
    return devices


def is_pool(spec: str) -> bool:
    """True when --device asks for several worker processes ("all" or a comma-separated list)."""
    text = spec.strip().lower()
    return text == "all" or "," in text


def child_labels(devices: list[str]) -> list[str]:
    """One label per pool member: "gpu<N>" for cuda:N, "cpu<i>" for the i-th cpu entry."""
    labels = []
    cpus = 0
    for device in devices:
        index = cuda_index(device)
        if index is None:
            labels.append(f"cpu{cpus}")
            cpus += 1
        else:
            labels.append(f"gpu{index}")
    return labels


def suffixed(path: Path, label: str) -> Path:
    """worker.log + gpu0 -> worker.gpu0.log; a name without suffix gets .gpu0 appended."""
    if path.suffix:
        return path.with_name(f"{path.stem}.{label}{path.suffix}")
    return path.with_name(f"{path.name}.{label}")
