"""Export a U-Net checkpoint to FP32 ONNX with a dynamic batch dimension, checked against torch.

The graph takes "image": float32 (N, 1, H, W), already normalized, and returns "logits": float32
(N, 2, H, W); H and W are fixed at export, N is dynamic in 1..max_batch. The exporter is torch's
torch.export-based one (`dynamo=True`): on torch 2.13 it gives a clean graph (BatchNorm folded into
Conv, no Identity nodes) where the legacy TorchScript exporter leaves Identity nodes and is
deprecated. The U-Net refuses sizes that are not multiples of 16, so the graph never has a Pad node.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from engines.base import EngineError, EngineSpec, metadata_path
from engines.checkpoint import load_model
from engines.unet import UNet, check_size
from engines.versions import built_with
from toolchain.onnx_checks import check_onnx, op_counts

PARITY_TOLERANCE = 1e-3  #: max abs logit difference allowed between ONNX Runtime and torch


@dataclass(frozen=True)
class ExportResult:
    """What `export_onnx` wrote: the ONNX file, its metadata file and spec, and the parity check.

    max_abs_diff: largest |logit_onnx - logit_torch| on random input (float, logits units).
    ops: ONNX operator counts, e.g. {"Conv": 19, "Relu": 18, ...}.
    """

    path: Path
    metadata: Path
    spec: EngineSpec
    max_abs_diff: float
    ops: dict[str, int]


@contextlib.contextmanager
def _quiet_exporter():
    """Silence the exporter's progress prints, warnings and optional-package log lines."""
    loggers = [logging.getLogger(name) for name in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with contextlib.redirect_stdout(None):
                yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def export_onnx(
    source: Path | str | UNet,
    out_path: Path | str,
    height: int = 512,
    width: int = 512,
    max_batch: int = 8,
    opset: int = 17,
    spec: EngineSpec | None = None,
) -> ExportResult:
    """Export a checkpoint file or a UNet to FP32 ONNX at `out_path`, plus `<out>.json` metadata.

    height/width: fixed input size in pixels (multiples of 16). max_batch: largest batch (>= 1);
    the graph accepts 1..max_batch. opset: ONNX opset of the written file. spec: base spec for a
    bare model (normalization); a checkpoint's own spec is used otherwise. Checks onnx.checker, the
    absence of Pad nodes, and ONNX Runtime vs torch parity (max abs logit difference below 1e-3 on
    random input); raises EngineError on any failure, naming the file.
    """
    import onnx

    try:
        check_size(height, width)
    except ValueError as exc:
        raise EngineError(str(exc)) from None
    if max_batch < 1:
        raise EngineError(f"max_batch must be >= 1, got {max_batch}")
    if isinstance(source, UNet):
        model, base_spec, origin = source, spec or EngineSpec(), "in-memory model"
    else:
        model, ckpt = load_model(source)
        base_spec, origin = spec or ckpt.spec, Path(source).name
    model = model.to("cpu").eval()
    out = Path(out_path)
    out.parent.mkdir(parents=True, exist_ok=True)

    example = torch.rand(min(2, max_batch), model.config.in_channels, height, width)
    kwargs: dict = {}
    if max_batch > 1:
        kwargs["dynamic_shapes"] = ({0: torch.export.Dim("batch", min=1, max=max_batch)},)
    try:
        with _quiet_exporter(), torch.inference_mode(False), torch.no_grad():
            torch.onnx.export(
                model,
                (example,),
                str(out),
                input_names=["image"],
                output_names=["logits"],
                opset_version=opset,
                dynamo=True,
                external_data=False,
                verbose=False,
                **kwargs,
            )
    except Exception as exc:
        raise EngineError(f"{out}: ONNX export failed ({type(exc).__name__}: {str(exc)[:300]})") from None

    graph = onnx.load(str(out))
    check_onnx(graph, out, "exported")
    ops = op_counts(graph)
    if "Pad" in ops:
        raise EngineError(f"{out}: exported graph has {ops['Pad']} Pad node(s); the U-Net should have none")
    written_opset = next((o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")), opset)

    diff = _parity(model, out, example)
    if not diff < PARITY_TOLERANCE:
        raise EngineError(f"{out}: ONNX Runtime differs from torch by {diff:.3g} (limit {PARITY_TOLERANCE})")

    final = replace(
        base_spec,
        input_name="image",
        height=height,
        width=width,
        channels=model.config.in_channels,
        classes=model.config.classes,
        min_batch=1,
        max_batch=max_batch,
        precision="fp32",
        built_with=built_with(
            "cpu", exporter="torch.onnx.export(dynamo=True)", opset=str(written_opset), source=origin,
            unet_width=str(model.config.width),
        ),
    )
    meta = metadata_path(out)
    meta.write_text(final.to_json() + "\n")
    return ExportResult(path=out, metadata=meta, spec=final, max_abs_diff=diff, ops=ops)


def _parity(model: UNet, onnx_path: Path, example: torch.Tensor) -> float:
    """Max abs difference between torch and ONNX Runtime logits on `example` (float32 NCHW)."""
    import onnxruntime as ort

    with torch.inference_mode():
        expected = model(example).numpy()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(["logits"], {"image": example.numpy()})[0]
    if got.shape != expected.shape:
        raise EngineError(f"{onnx_path}: ONNX output shape {got.shape} != torch {expected.shape}")
    return float(np.max(np.abs(got - expected)))
