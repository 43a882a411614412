"""Loader dispatch and load-time refusals that need neither TensorRT nor a GPU.

torch2trt files are built here in torch2trt's own layout (with fake engine bytes) and parsed for
real; the TensorRT and version checks are tested on their pure functions with specs.
"""

from __future__ import annotations

import collections
import json
import warnings
from dataclasses import asdict, replace
from pathlib import Path

import pytest
import torch

from engines.base import EngineError, EngineSpec, metadata_path
from engines.loader import KNOWN_SUFFIXES, load_engine, read_spec
from engines.tensorrt_engine import check_plan_metadata, check_plan_shape, current_setup, rebuild_hint
from engines.torch2trt_file import is_torch2trt_file, parse_torch2trt
from engines.torch_engine import TorchEngine
from engines.versions import check_compatible
from tests.conftest import tiny_checkpoint

try:
    import tensorrt  # noqa: F401

    HAVE_TENSORRT = True
except Exception:
    HAVE_TENSORRT = False

needs_no_tensorrt = pytest.mark.skipif(HAVE_TENSORRT,
                                       reason="TensorRT is installed: the missing-TensorRT message cannot show")

FAKE_ENGINE = b"\x00fake serialized TensorRT engine\xff" * 10


def _torch2trt_file(path: Path, prefix: str = "", as_tensor: bool = False) -> Path:
    """Write what `torch.save(TRTModule.state_dict())` writes (torch2trt >= 0.4 layout)."""
    state = collections.OrderedDict()
    engine = torch.frombuffer(bytearray(FAKE_ENGINE), dtype=torch.uint8) if as_tensor else bytearray(FAKE_ENGINE)
    state[f"{prefix}engine"] = engine
    state[f"{prefix}input_names"] = ["input_0"]
    state[f"{prefix}output_names"] = ["output_0"]
    state[f"{prefix}input_flattener"] = {"schema": [0], "size": 1}
    state[f"{prefix}output_flattener"] = {"schema": 0, "size": 1}
    torch.save(state, path)
    return path


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny.pt")


# -- torch2trt files -----------------------------------------------------------------------------


@pytest.mark.parametrize("prefix, as_tensor", [("", False), ("module.", False), ("", True)])
def test_torch2trt_file_is_parsed(tmp_path: Path, prefix: str, as_tensor: bool) -> None:
    path = _torch2trt_file(tmp_path / "unet_trt.pth", prefix, as_tensor)
    assert is_torch2trt_file(path)
    parsed = parse_torch2trt(path)
    assert parsed.engine_bytes == FAKE_ENGINE
    assert parsed.input_names == ["input_0"] and parsed.output_names == ["output_0"]


def test_checkpoint_is_not_a_torch2trt_file(tiny_ckpt: Path, tmp_path: Path) -> None:
    assert not is_torch2trt_file(tiny_ckpt)
    assert not is_torch2trt_file(tmp_path / "missing.pth")
    with pytest.raises(EngineError, match="not a torch2trt file"):
        parse_torch2trt(tiny_ckpt)


class _Evil:
    def __reduce__(self):
        return (Path.touch, (Path(__file__).parent / "never-created-by-a-load",))


def test_torch2trt_parse_never_unpickles_code(tmp_path: Path) -> None:
    marker = Path(__file__).parent / "never-created-by-a-load"
    path = tmp_path / "evil.pth"
    torch.save({"engine": bytearray(b"x"), "input_names": ["a"], "output_names": ["b"], "hook": _Evil()}, path)
    assert not is_torch2trt_file(path)
    with pytest.raises(EngineError, match="not a safely readable"):
        parse_torch2trt(path)
    assert not marker.exists()


def test_torch2trt_bad_entries_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "bad.pth"
    torch.save({"engine": bytearray(b"x"), "input_names": [], "output_names": ["o"]}, path)
    with pytest.raises(EngineError, match="input_names"):
        parse_torch2trt(path)
    torch.save({"engine": "text", "input_names": ["i"], "output_names": ["o"]}, path)
    with pytest.raises(EngineError, match="engine entry"):
        parse_torch2trt(path)
    two = {f"{p}{k}": v for p in ("a.", "b.") for k, v in
           (("engine", bytearray(b"x")), ("input_names", ["i"]), ("output_names", ["o"]))}
    torch.save(two, path)
    with pytest.raises(EngineError, match="2 TensorRT engines"):
        parse_torch2trt(path)


def test_torch2trt_spec_from_json_or_defaults(tmp_path: Path) -> None:
    path = _torch2trt_file(tmp_path / "unet_trt.pth")
    assert read_spec(path).precision == "unknown"
    spec = EngineSpec(height=256, width=256, precision="fp16")
    metadata_path(path).write_text(spec.to_json())
    assert read_spec(path) == spec


@needs_no_tensorrt
def test_torch2trt_file_needs_tensorrt(tmp_path: Path) -> None:
    path = _torch2trt_file(tmp_path / "unet_trt.pth")
    with pytest.raises(EngineError, match=r"TensorRT is not installed here: `import tensorrt` failed"):
        load_engine(path, device="cuda")


# -- TensorRT plans ------------------------------------------------------------------------------


def _plan_spec(**built: str) -> EngineSpec:
    record = {"tensorrt": "10.13.0", "gpu": "NVIDIA H200", "compute_capability": "9.0", "source": "unet_fp16.onnx"}
    record.update(built)
    return EngineSpec(height=512, width=512, max_batch=8, precision="fp16", built_with=record)


@needs_no_tensorrt
def test_plan_without_tensorrt_says_so(tmp_path: Path) -> None:
    plan = tmp_path / "unet.trt"
    plan.write_bytes(b"plan")
    metadata_path(plan).write_text(_plan_spec().to_json())
    for device in ("cpu", "cuda"):
        with pytest.raises(EngineError, match=r"TensorRT is not installed here: `import tensorrt` failed \("):
            load_engine(plan, device=device)
    assert read_spec(plan).precision == "fp16"  # `engines info` still works without TensorRT


def test_plan_missing_file_names_it(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="unet.engine: TensorRT plan file not found"):
        load_engine(tmp_path / "unet.engine", device="cuda")


HERE = {"tensorrt": "10.13.0", "gpu": "NVIDIA H200", "compute_capability": "9.0"}


def test_plan_metadata_matching_this_machine_passes() -> None:
    check_plan_metadata("unet.trt", _plan_spec(), dict(HERE))


@pytest.mark.parametrize(
    "key, value, shown",
    [
        ("gpu", "NVIDIA H100 80GB HBM3", "gpu 'NVIDIA H100 80GB HBM3' (here: 'NVIDIA H200')"),
        ("compute_capability", "8.0", "compute_capability '8.0' (here: '9.0')"),
        ("tensorrt", "11.4.0", "tensorrt '11.4.0' (here: '10.13.0')"),
    ],
)
def test_plan_metadata_mismatch_names_what_to_rebuild(key: str, value: str, shown: str) -> None:
    with pytest.raises(EngineError) as info:
        check_plan_metadata("models/unet.trt", _plan_spec(**{key: value}), dict(HERE))
    message = str(info.value)
    assert shown in message
    assert "`engines build unet_fp16.onnx -o unet.trt`" in message


def test_plan_metadata_without_versions_is_refused() -> None:
    spec = EngineSpec(built_with={"source": "m.onnx"})
    with pytest.raises(EngineError, match="tensorrt not recorded"):
        check_plan_metadata("unet.plan", spec, dict(HERE))


def test_plan_shape_must_match_its_metadata() -> None:
    spec = _plan_spec()
    check_plan_shape("unet.trt", spec, (-1, 1, 512, 512), (1, 8), 2)
    wrong_json = replace(spec, height=256)
    with pytest.raises(EngineError, match=r"plan input height is 512, its metadata says 256\. Rebuild"):
        check_plan_shape("unet.trt", wrong_json, (-1, 1, 512, 512), (1, 8), 2)
    with pytest.raises(EngineError, match="channels is 3"):
        check_plan_shape("unet.trt", spec, (-1, 3, 512, 512), (1, 8), 2)
    with pytest.raises(EngineError, match="accepts batches 1..4"):
        check_plan_shape("unet.trt", spec, (-1, 1, 512, 512), (1, 4), 2)
    with pytest.raises(EngineError, match="3 classes"):
        check_plan_shape("unet.trt", spec, (-1, 1, 512, 512), (1, 8), 3)
    with pytest.raises(EngineError, match="NCHW"):
        check_plan_shape("unet.trt", spec, (1, 512, 512), (1, 8), 2)
    assert "engines build unet_fp16.onnx -o unet.trt" in rebuild_hint("unet.trt", spec)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_current_setup_reads_this_gpu() -> None:
    setup = current_setup("10.x")
    assert setup["gpu"] == torch.cuda.get_device_name() and "." in setup["compute_capability"]


# -- generic checks and dispatch -----------------------------------------------------------------


def test_check_compatible_lists_every_mismatch() -> None:
    recorded = {"torch": "2.11.0", "gpu": "A"}
    check_compatible("x", recorded, {"torch": "2.11.0"}, "rebuild")
    with pytest.raises(EngineError) as info:
        check_compatible("x.ptc", recorded, {"torch": "2.13.0", "gpu": "B", "triton": "3.6"}, "Do this.")
    message = str(info.value)
    assert "torch '2.11.0' (here: '2.13.0')" in message and "gpu 'A' (here: 'B')" in message
    assert "triton not recorded" in message and message.endswith("Do this.")
    check_compatible("x", recorded, {"triton": "3.6"}, "rebuild", required=False)


def test_known_suffixes_and_unknown_file(tmp_path: Path) -> None:
    assert {".onnx", ".pt", ".pth", ".ptc", ".trt", ".engine", ".plan"} <= set(KNOWN_SUFFIXES)
    odd = tmp_path / "model.tflite"
    odd.write_bytes(b"x")
    with pytest.raises(EngineError, match=r"unknown engine file type '.tflite' \(known: .*\.ptc"):
        load_engine(odd)


def test_torch_amp_needs_cuda(tiny_ckpt: Path) -> None:
    with pytest.raises(EngineError, match="amp needs a CUDA device"):
        TorchEngine(tiny_ckpt, precision="amp")
    with pytest.raises(EngineError, match="precision must be one of"):
        TorchEngine(tiny_ckpt, precision="bf16")


def test_pth_checkpoint_still_loads_as_torch(tiny_ckpt: Path, tmp_path: Path) -> None:
    pth = tmp_path / "tiny.pth"
    pth.write_bytes(tiny_ckpt.read_bytes())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with load_engine(pth) as engine:
            assert isinstance(engine, TorchEngine)
    assert read_spec(pth).height == 64
    assert json.loads(EngineSpec().to_json())["precision"] == "fp32"
    assert asdict(read_spec(pth))["max_batch"] == 4


def test_batches_in_flight_are_set_for_cuda_engines_only(tiny_ckpt: Path, tmp_path: Path) -> None:
    with pytest.raises(EngineError, match=r"tiny\.pt: the number of batches in flight can be set for CUDA engines"):
        load_engine(tiny_ckpt, slots=3)
    onnx = tmp_path / "model.onnx"
    onnx.write_bytes(b"not read: refused before loading")
    with pytest.raises(EngineError, match=r"model\.onnx: .*CUDA engines only"):
        load_engine(onnx, device="cuda", slots=3)
    with load_engine(tiny_ckpt) as engine:  # left unset, every engine keeps its own
        assert engine.slots == 2


def test_cuda_slots_need_at_least_one() -> None:
    from engines.cuda_slots import CudaSlots

    with pytest.raises(EngineError, match="at least one batch must be allowed in flight, got 0"):
        CudaSlots(torch.device("cpu"), 8, 64, 64, "unet.cudnn", count=0)
